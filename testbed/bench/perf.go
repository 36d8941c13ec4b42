package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Profiler records where a proxy's CPU time goes while a load runs, with Linux perf: one
// profile per path and load, kept as perf's own report (shared objects and symbols, kernel
// included) under ResultsDir. It is how a figure that misses its target is explained: how much of
// the proxy's time is the kernel's TCP stack, how much its own code.
type Profiler struct {
	dir string
}

// NewProfiler makes a profiler writing under ResultsDir/perf-<time>/; perf must be installed.
func NewProfiler() (*Profiler, error) {
	if _, err := exec.LookPath("perf"); err != nil {
		return nil, fmt.Errorf("BENCH_PERF needs Linux perf (Debian: linux-perf): %w", err)
	}
	base, err := ResultsDirectory()
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(base, "perf-"+time.Now().Format("20060102-150405"))
	return &Profiler{dir: dir}, os.MkdirAll(dir, 0o755)
}

// Dir is where the profiles go.
func (p *Profiler) Dir() string { return p.dir }

// Record samples the processes pids lists while f runs, and writes name.txt: the report by
// shared object and symbol, and a first line with the kernel's share of the samples.
func (p *Profiler) Record(ctx context.Context, name string, pids []int, f func() error) error {
	if len(pids) == 0 {
		return f()
	}
	ids := make([]string, len(pids))
	for i, pid := range pids {
		ids[i] = strconv.Itoa(pid)
	}
	data := filepath.Join(p.dir, name+".data")
	var stderr bytes.Buffer
	rec := exec.CommandContext(ctx, "perf", "record", "--quiet", "-F", "1999", "-p", strings.Join(ids, ","), "-o", data)
	rec.Stderr = &stderr
	if err := rec.Start(); err != nil {
		return fmt.Errorf("perf record: %w", err)
	}
	// perf attaches asynchronously; give it a moment so the load's start is sampled too.
	time.Sleep(200 * time.Millisecond)
	ferr := f()
	_ = rec.Process.Signal(syscall.SIGINT)
	if err := rec.Wait(); err != nil && !stoppedBy(err, syscall.SIGINT) && ferr == nil {
		return fmt.Errorf("perf record: %w: %s", err, stderr.String())
	}
	if ferr != nil {
		return ferr
	}
	defer os.Remove(data)
	byDSO, err := perfReport(ctx, data, "dso")
	if err != nil {
		return err
	}
	bySymbol, err := perfReport(ctx, data, "dso,sym")
	if err != nil {
		return err
	}
	text := fmt.Sprintf("# %s: kernel %.0f%% of the samples\n\n%s\n%s", name, kernelShare(byDSO), byDSO, bySymbol)
	return os.WriteFile(filepath.Join(p.dir, name+".txt"), []byte(text), 0o644)
}

// stoppedBy reports whether err is the exit of a process that a signal ended: perf writes its
// data on SIGINT, then ends itself with the same signal.
func stoppedBy(err error, sig syscall.Signal) bool {
	var exit *exec.ExitError
	if !errors.As(err, &exit) {
		return false
	}
	ws, ok := exit.Sys().(syscall.WaitStatus)
	return ok && ws.Signaled() && ws.Signal() == sig
}

func perfReport(ctx context.Context, data, sort string) (string, error) {
	out, err := exec.CommandContext(ctx, "perf", "report", "--stdio", "--no-children", "-i", data,
		"--sort", sort, "--percent-limit", "0.5").Output()
	if err != nil {
		return "", fmt.Errorf("perf report --sort %s: %w", sort, err)
	}
	return string(out), nil
}

// kernelShare sums the percentages of the kernel's lines in a report sorted by shared object.
func kernelShare(report string) float64 {
	var total float64
	for line := range strings.SplitSeq(report, "\n") {
		f := strings.Fields(line)
		if len(f) < 2 || strings.HasPrefix(f[0], "#") || !strings.Contains(line, "[kernel") {
			continue
		}
		if v, err := strconv.ParseFloat(strings.TrimSuffix(f[0], "%"), 64); err == nil {
			total += v
		}
	}
	return total
}
