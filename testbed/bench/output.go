package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
)

// ResultsDir is where reports go: bench-results/ at the top of the repository, which git ignores.
const ResultsDir = "bench-results"

// ConfigFromEnv is the run's shape: BENCH_ROUNDS (3), BENCH_DURATION of each wrk run (6s) and
// BENCH_BULK_MIB (512), so that a developer can make short runs; wrk always uses one thread, 32
// keep-alive connections and 16 for a new connection per request.
func ConfigFromEnv(t testing.TB) Config {
	t.Helper()
	// Progress goes to stdout: go test keeps only the first lines of a benchmark's log.
	logf := func(format string, args ...any) { fmt.Printf("bench: "+format+"\n", args...) }
	cfg := Config{Rounds: 3, Duration: 6 * time.Second, KeepAliveConns: 32, CloseConns: 16, BulkSize: 512 << 20, Logf: logf}
	if v := os.Getenv("BENCH_ROUNDS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("BENCH_ROUNDS=%q: want a positive number", v)
		}
		cfg.Rounds = n
	}
	if v := os.Getenv("BENCH_DURATION"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < time.Second || d > time.Minute {
			t.Fatalf("BENCH_DURATION=%q: want a duration from 1s to 1m", v)
		}
		cfg.Duration = d
	}
	if v := os.Getenv("BENCH_BULK_MIB"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 16<<10 {
			t.Fatalf("BENCH_BULK_MIB=%q: want 1 to 16384", v)
		}
		cfg.BulkSize = int64(n) << 20
	}
	if v := os.Getenv("BENCH_PERF"); v != "" {
		on, err := strconv.ParseBool(v)
		if err != nil {
			t.Fatalf("BENCH_PERF=%q: want true or false", v)
		}
		if on {
			if cfg.Profiler, err = NewProfiler(); err != nil {
				t.Fatal(err)
			}
			logf("profiles of the first round go to %s", cfg.Profiler.Dir())
		}
	}
	return cfg
}

// Machine describes the host for a report: CPUs and kernel.
func Machine() string {
	model := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.SplitSeq(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				model = strings.TrimSpace(v)
				break
			}
		}
	}
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return fmt.Sprintf("%d CPUs (%s), Linux %s", runtime.NumCPU(), model, strings.TrimSpace(string(kernel)))
}

// LoadAverage is the 1, 5 and 15 minute load average.
func LoadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

// Write puts the report (title, the machine and its load, details, the table of the medians) and
// its chart under ResultsDir as name-<time>.md and .png, prints the report, and returns the
// markdown file's path.
func Write(t testing.TB, name, title, details string, cfg Config, run Outcome) string {
	t.Helper()
	summaries := Summarize(cfg, run.Results)
	table := Markdown(summaries, cfg.Reference)
	var doc bytes.Buffer
	fmt.Fprintf(&doc, "# %s\n\nMachine: %s; load average (1, 5, 15 min) %s before the run, %s after.\n\n%s\n\n"+
		"%d rounds, medians; wrk -t1, %d keep-alive connections, %d with `Connection: close`, %s each; bulk: one %d MiB download; ratios against %s.\n\n%s",
		title, Machine(), run.LoadBefore, run.LoadAfter, details, cfg.Rounds, cfg.KeepAliveConns, cfg.CloseConns, cfg.Duration, cfg.BulkSize>>20, cfg.Reference, table)
	fmt.Printf("\n%s\n", doc.String())
	dir, err := ResultsDirectory()
	if err != nil {
		t.Logf("report not written: %v", err)
		return ""
	}
	stamp := time.Now().Format("20060102-150405")
	md := filepath.Join(dir, name+"-"+stamp+".md")
	if err := os.WriteFile(md, doc.Bytes(), 0o644); err != nil {
		t.Logf("report not written: %v", err)
		return ""
	}
	chart, err := Chart(title, summaries, cfg.Reference, DefaultPanels())
	if err == nil {
		err = os.WriteFile(strings.TrimSuffix(md, ".md")+".png", chart, 0o644)
	}
	if err != nil {
		t.Logf("chart not written: %v", err)
	}
	fmt.Printf("report: %s (and .png)\n", md)
	return md
}

// EnvoyWorkers is the worker count of the Envoy whose admin interface is at adminAddr, as it
// reports it.
func EnvoyWorkers(adminAddr string) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	status, body, err := testbed.HTTPGet(ctx, "http://"+adminAddr+"/server_info")
	if err != nil {
		return 0, err
	}
	var info struct {
		Options struct {
			Concurrency int `json:"concurrency"`
		} `json:"command_line_options"`
	}
	if err := json.Unmarshal([]byte(body), &info); err != nil || status != 200 {
		return 0, fmt.Errorf("envoy /server_info: %d %v", status, err)
	}
	if info.Options.Concurrency < 1 {
		return 0, fmt.Errorf("envoy reports %d workers", info.Options.Concurrency)
	}
	return info.Options.Concurrency, nil
}

// ResultsDirectory finds the repository above the working directory and makes its ResultsDir.
func ResultsDirectory() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if b, err := os.ReadFile(filepath.Join(dir, "go.mod")); err == nil && bytes.Contains(b, []byte("module github.com/envoy-docker-shim/envoy-docker-shim\n")) {
			out := filepath.Join(dir, ResultsDir)
			return out, os.MkdirAll(out, 0o755)
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no envoy-docker-shim go.mod above %s", dir)
		}
		dir = parent
	}
}
