package soak

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
)

const serverPkg = "github.com/envoy-docker-shim/envoy-docker-shim/services/cmd/envoy-docker-server"

// serverProc is envoy-docker-server run as its own binary. In-process, its /metrics would count
// the test's goroutines and memory with the server's (the Go collector reports the whole
// process), and the test's own state grows with every cycle: before/after figures would measure
// the harness. A process of its own has figures that are the server's alone.
type serverProc struct {
	HTTPAddr string
	XDSAddr  string
	LogPath  string

	pid     int
	waitErr error // how it ended, set before exited is closed
	exited  chan struct{}
}

// startServer runs the server for d's shims, which register on shimSocket, logging to a file that
// is printed if the test fails, and stops it with SIGTERM when the test ends.
func startServer(t testing.TB, d *testbed.Daemon, shimSocket string) *serverProc {
	t.Helper()
	bin := testbed.BuildStatic(t, serverPkg, "envoy-docker-server")
	s := &serverProc{
		HTTPAddr: net.JoinHostPort("127.0.0.1", strconv.Itoa(testbed.FreePort(t))),
		XDSAddr:  net.JoinHostPort("127.0.0.1", strconv.Itoa(testbed.FreePort(t))),
		LogPath:  filepath.Join(t.TempDir(), "server.log"),
		exited:   make(chan struct{}),
	}
	logf, err := os.Create(s.LogPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := d.Command(bin)
	cmd.Env = append(cmd.Env,
		"EDS_SHIM_SOCKET="+shimSocket,
		"EDS_SOCKET="+filepath.Join(filepath.Dir(s.LogPath), "server.sock"),
		"EDS_XDS_ADDR="+s.XDSAddr,
		"EDS_HTTP_ADDR="+s.HTTPAddr,
		"DOCKER_HOST="+d.Host,
		// Nothing to restore: answer Envoy at once.
		"EDS_RESTART_GRACE=0s",
		// Thousands of access-log lines would only cost Envoy CPU that the soak shares.
		"EDS_ACCESS_LOG=false",
		"EDS_LOG_LEVEL=info",
	)
	cmd.Env = append(cmd.Env, testbed.ServerHostEnv(t, d)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own process group: a ^C meant for go test must not stop it before the cleanup does.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", bin, err)
	}
	s.pid = cmd.Process.Pid
	go func() {
		s.waitErr = cmd.Wait()
		close(s.exited)
	}()
	t.Cleanup(func() {
		s.stop(t)
		if t.Failed() {
			b, _ := os.ReadFile(s.LogPath)
			t.Logf("server log %s (last 6 KiB):\n%s", s.LogPath, tail(string(b), 6<<10))
		}
	})
	testbed.WaitFor(t, 15*time.Second, "the server's shim socket and HTTP endpoint", func() error {
		select {
		case <-s.exited:
			t.Fatalf("envoy-docker-server exited during start (%v); its log:\n%s", s.waitErr, readTail(s.LogPath))
		default:
		}
		c, err := net.Dial("unixpacket", shimSocket)
		if err != nil {
			return err
		}
		c.Close()
		_, err = s.scrape(context.Background())
		return err
	})
	return s
}

// stop sends SIGTERM and waits, with SIGKILL after 10 s: after the churn, the server must still
// stop as docker stop stops it, with exit 0.
func (s *serverProc) stop(t testing.TB) {
	select {
	case <-s.exited:
		return
	default:
	}
	_ = syscall.Kill(s.pid, syscall.SIGTERM)
	select {
	case <-s.exited:
		if s.waitErr != nil {
			t.Errorf("envoy-docker-server exited on SIGTERM with %v, want exit 0; the end of its log:\n%s", s.waitErr, tail(readTail(s.LogPath), 3<<10))
		}
	case <-time.After(10 * time.Second):
		t.Errorf("envoy-docker-server ignored SIGTERM for 10s; killing it")
		_ = syscall.Kill(s.pid, syscall.SIGKILL)
		<-s.exited
	}
}

// serverSample is what the server's /metrics says about its own process.
type serverSample struct {
	Goroutines int
	HeapInuse  int64 // bytes: go_memstats_heap_inuse_bytes
	RSS        int64 // bytes: process_resident_memory_bytes
	HeapAlloc  int64 // bytes: go_memstats_heap_alloc_bytes
	NextGC     int64 // bytes: go_memstats_next_gc_bytes
	GCs        int64 // completed GC cycles
	Live       int   // eds_registrations
}

func (s *serverProc) scrape(ctx context.Context) (serverSample, error) {
	status, body, err := testbed.HTTPGet(ctx, "http://"+s.HTTPAddr+"/metrics")
	if err != nil {
		return serverSample{}, err
	}
	if status != http.StatusOK {
		return serverSample{}, fmt.Errorf("GET /metrics: status %d: %.200s", status, body)
	}
	return parseSample(strings.NewReader(body))
}

// parseSample reads the figures out of a Prometheus text exposition.
func parseSample(r io.Reader) (serverSample, error) {
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(r)
	if err != nil {
		return serverSample{}, fmt.Errorf("parsing /metrics: %w", err)
	}
	value := func(name string) (float64, error) {
		f, ok := families[name]
		if !ok || len(f.GetMetric()) != 1 {
			return 0, fmt.Errorf("/metrics has no single %s", name)
		}
		m := f.GetMetric()[0]
		switch f.GetType() {
		case dto.MetricType_GAUGE:
			return m.GetGauge().GetValue(), nil
		case dto.MetricType_COUNTER:
			return m.GetCounter().GetValue(), nil
		case dto.MetricType_SUMMARY:
			return float64(m.GetSummary().GetSampleCount()), nil
		}
		return 0, fmt.Errorf("/metrics: %s is a %v", name, f.GetType())
	}
	var s serverSample
	var errs []error
	for _, v := range []struct {
		name string
		set  func(float64)
	}{
		{"go_goroutines", func(f float64) { s.Goroutines = int(f) }},
		{"go_memstats_heap_inuse_bytes", func(f float64) { s.HeapInuse = int64(f) }},
		{"process_resident_memory_bytes", func(f float64) { s.RSS = int64(f) }},
		{"go_memstats_heap_alloc_bytes", func(f float64) { s.HeapAlloc = int64(f) }},
		{"go_memstats_next_gc_bytes", func(f float64) { s.NextGC = int64(f) }},
		{"go_gc_duration_seconds", func(f float64) { s.GCs = int64(f) }},
		{"eds_registrations", func(f float64) { s.Live = int(f) }},
	} {
		f, err := value(v.name)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		v.set(f)
	}
	return s, errors.Join(errs...)
}

// sampleAfterGC returns the median of gcSamples samples, each taken just after a garbage
// collection that started after the call. An idle server collects only every two minutes; its
// heap would otherwise include whatever garbage the cycles left, and say nothing about what it
// keeps. The scrapes themselves allocate, so scraping brings a collection on in a fraction of a
// second; a pause after each lets the background sweeper free what the collection found dead.
func (s *serverProc) sampleAfterGC(ctx context.Context) (serverSample, error) {
	cur, err := s.scrape(ctx)
	if err != nil {
		return serverSample{}, err
	}
	deadline := time.Now().Add(60 * time.Second)
	var samples []serverSample
	// The first collection seen may have begun before the call; the next cannot.
	skip := true
	for seen := cur.GCs; len(samples) < gcSamples; {
		if time.Now().After(deadline) {
			return serverSample{}, fmt.Errorf("the server ran %d of %d garbage collections within 60s of scraping /metrics", len(samples), gcSamples)
		}
		if cur, err = s.scrape(ctx); err != nil {
			return serverSample{}, err
		}
		if cur.GCs == seen {
			continue
		}
		seen = cur.GCs
		if skip {
			skip = false
			continue
		}
		time.Sleep(gcSettle)
		if cur, err = s.scrape(ctx); err != nil {
			return serverSample{}, err
		}
		samples = append(samples, cur)
		seen = cur.GCs
	}
	return medianSample(samples), nil
}

const (
	gcSamples = 9
	gcSettle  = 50 * time.Millisecond
)

// medianSample takes the median of each figure on its own.
func medianSample(samples []serverSample) serverSample {
	med := func(f func(serverSample) int64) int64 {
		v := make([]int64, len(samples))
		for i, s := range samples {
			v[i] = f(s)
		}
		slices.Sort(v)
		return v[len(v)/2]
	}
	last := samples[len(samples)-1]
	return serverSample{
		Goroutines: int(med(func(s serverSample) int64 { return int64(s.Goroutines) })),
		HeapInuse:  med(func(s serverSample) int64 { return s.HeapInuse }),
		HeapAlloc:  med(func(s serverSample) int64 { return s.HeapAlloc }),
		NextGC:     med(func(s serverSample) int64 { return s.NextGC }),
		RSS:        med(func(s serverSample) int64 { return s.RSS }),
		GCs:        last.GCs,
		Live:       last.Live,
	}
}

// registrations is the number of registrations the server lists.
func (s *serverProc) registrations(ctx context.Context) (int, error) {
	status, body, err := testbed.HTTPGet(ctx, "http://"+s.HTTPAddr+"/registrations")
	if err != nil {
		return 0, err
	}
	if status != http.StatusOK {
		return 0, fmt.Errorf("GET /registrations: status %d: %.200s", status, body)
	}
	var list struct {
		Registrations []json.RawMessage `json:"registrations"`
	}
	if err := json.Unmarshal([]byte(body), &list); err != nil {
		return 0, fmt.Errorf("GET /registrations: %w", err)
	}
	return len(list.Registrations), nil
}

func readTail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	return tail(string(b), 6<<10)
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}
