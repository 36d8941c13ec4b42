package soak

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata")

func TestConfigValidate(t *testing.T) {
	good := config{Cycles: 20, Parallel: 2, HostPorts: "leased", SteadyClients: 2, SteadyInterval: 20 * time.Millisecond, Settle: 30 * time.Second}
	tests := []struct {
		name    string
		change  func(*config)
		wantErr string
	}{
		{"defaults", func(*config) {}, ""},
		{"long run", func(c *config) {
			c.Cycles, c.Parallel, c.DelayMax, c.HostPorts = 1000, 4, 300*time.Millisecond, "docker"
		}, ""},
		{"no cycles", func(c *config) { c.Cycles = 0 }, "SOAK_CYCLES=0"},
		{"fewer cycles than workers", func(c *config) { c.Cycles, c.Parallel = 3, 4 }, "SOAK_CYCLES >= SOAK_PARALLEL"},
		{"too parallel", func(c *config) { c.Cycles, c.Parallel = 100, 33 }, "SOAK_PARALLEL <= 32"},
		{"negative delay", func(c *config) { c.DelayMax = -time.Millisecond }, "SOAK_DELAY_MAX=-1ms"},
		{"delay too long", func(c *config) { c.DelayMax = 11 * time.Second }, "SOAK_DELAY_MAX=11s"},
		{"unknown host ports", func(c *config) { c.HostPorts = "random" }, `SOAK_HOST_PORTS="random"`},
		{"no steady clients", func(c *config) { c.SteadyClients = 0 }, "SOAK_STEADY_CLIENTS=0"},
		{"steady interval zero", func(c *config) { c.SteadyInterval = 0 }, "SOAK_STEADY_INTERVAL=0s"},
		{"no settle", func(c *config) { c.Settle = 0 }, "SOAK_SETTLE=0s"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := good
			tt.change(&c)
			err := c.validate()
			switch {
			case tt.wantErr == "" && err != nil:
				t.Fatalf("validate: %v", err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Fatalf("validate: %v, want an error naming %s", err, tt.wantErr)
			}
		})
	}
}

func TestConfigFromEnv(t *testing.T) {
	t.Setenv("SOAK_CYCLES", "1000")
	t.Setenv("SOAK_PARALLEL", "4")
	t.Setenv("SOAK_DELAY_MAX", "300ms")
	t.Setenv("SOAK_RACE", "true")
	c, err := configFromEnv()
	if err != nil {
		t.Fatal(err)
	}
	if c.Cycles != 1000 || c.Parallel != 4 || c.DelayMax != 300*time.Millisecond || !c.Race || c.HostPorts != "leased" {
		t.Errorf("configFromEnv = %+v", c)
	}
	t.Setenv("SOAK_CYCLES", "many")
	if _, err := configFromEnv(); err == nil || !strings.Contains(err.Error(), "CYCLES") {
		t.Errorf("SOAK_CYCLES=many: %v, want an error naming it", err)
	}
}

func TestErrorKind(t *testing.T) {
	tests := []struct {
		err  error
		want string
	}{
		{fmt.Errorf("GET http://127.0.0.1:20001/first: %w", io.EOF), "closed without an answer (EOF)"},
		{&net.OpError{Op: "read", Err: os.NewSyscallError("read", syscall.ECONNRESET)}, "connection reset"},
		{fmt.Errorf("tcp echo 127.0.0.1:20002: half-close: %w", &net.OpError{Op: "close", Err: os.NewSyscallError("shutdown", syscall.ENOTCONN)}), "closed before the request was sent"},
		{fmt.Errorf("udp echo: %w", context.DeadlineExceeded), "timeout"},
		{errors.New(`status 503: "upstream connect error or disconnect/reset before headers"`), "status 503"},
		{errors.New("docker run -d --name soak-http-17 -p 127.0.0.1:20003:80/tcp: exit status 125: Error response from daemon: driver failed programming external connectivity on endpoint soak-http-17 (0123456789ab)"),
			"docker run -d --name … -p …/tcp: exit status 125: Error response from daemon: driver failed programming external connectivity on endpoint … (…)"},
	}
	for _, tt := range tests {
		if got := errorKind(tt.err); got != tt.want {
			t.Errorf("errorKind(%v) =\n%q, want\n%q", tt.err, got, tt.want)
		}
	}
}

// cleanResult is an arm that met every target.
func cleanResult() *armResult {
	r := newArmResult("envoy-docker-shim", true)
	for i := range 6 {
		r.add(cycleResult{mode: modes[i%3].name, startDur: time.Second, firstDur: 5 * time.Millisecond, rmDur: 300 * time.Millisecond})
	}
	r.Steady = steadyResult{Requests: 1000, Kinds: map[string]int{}}
	r.Before = serverSample{Goroutines: 27, HeapInuse: 8 << 20, RSS: 32 << 20}
	r.After = serverSample{Goroutines: 27 + goroutineMargin, HeapInuse: 8<<20 + heapMargin, RSS: 34 << 20}
	r.Wall = time.Minute
	return r
}

// TestProblems: every count off target is a problem, each named, and a clean run has none.
func TestProblems(t *testing.T) {
	boom := errors.New("boom")
	tests := []struct {
		name   string
		change func(*armResult)
		want   string // "" for no problem
	}{
		{"clean", func(*armResult) {}, ""},
		{"failed start", func(r *armResult) { r.add(cycleResult{mode: "http", startErr: boom}) }, "1 failed starts: boom ×1"},
		{"failed first request", func(r *armResult) { r.add(cycleResult{mode: "tcp", firstErr: boom}) }, "1 failed first requests: tcp: boom ×1"},
		{"failed remove", func(r *armResult) { r.add(cycleResult{mode: "udp", rmErr: boom}) }, "1 failed removes"},
		{"steady error", func(r *armResult) { r.Steady.Errors = 1 }, "steady load: 1 errors"},
		{"steady reconnect", func(r *armResult) { r.Steady.Reconnects = 1 }, "0 errors, 1 reconnects"},
		{"no steady load", func(r *armResult) { r.Steady.Requests = 0 }, "the steady load sent no request"},
		{"leftover proxy", func(r *armResult) { r.Leftovers.Proxies = 1 }, "leftovers"},
		{"leftover listener", func(r *armResult) { r.Leftovers.Listeners = 1 }, "leftovers"},
		{"leftover cluster", func(r *armResult) { r.Leftovers.Clusters = 1 }, "leftovers"},
		{"leftover registration", func(r *armResult) { r.Leftovers.Registrations = 1 }, "leftovers"},
		{"leftover container", func(r *armResult) { r.Leftovers.Containers = 1 }, "leftovers"},
		{"leftover port", func(r *armResult) { r.Leftovers.PortsBound = 1 }, "leftovers"},
		{"goroutines", func(r *armResult) { r.After.Goroutines++ }, "server goroutines 32 after, 27 before"},
		{"heap", func(r *armResult) { r.After.HeapInuse++ }, "server heap in use"},
		{"not measured", func(r *armResult) { r.SampleErr = "after: no GC" }, "server figures: after: no GC"},
		{"aborted", func(r *armResult) { r.Aborted = "20 consecutive failed starts" }, "stopped early"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := cleanResult()
			tt.change(r)
			got := r.problems()
			switch {
			case tt.want == "" && len(got) > 0:
				t.Fatalf("problems of a clean run: %q", got)
			case tt.want != "" && (len(got) == 0 || !strings.Contains(strings.Join(got, "\n"), tt.want)):
				t.Fatalf("problems = %q, want one containing %q", got, tt.want)
			}
		})
	}
	r := cleanResult()
	r.add(cycleResult{i: 7, mode: "http", port: 20001, delay: 120 * time.Millisecond, firstErr: boom})
	if got, want := r.report(), "the first errors in full: cycle 7 (http, port 20001, listen delay 120ms) first request: boom"; len(got) != 2 || got[1] != want {
		t.Errorf("report = %q, want the problem and then %q", got, want)
	}
	// docker-proxy has no server: its figures are not judged.
	r = newArmResult("docker-proxy", false)
	r.Steady.Requests = 1
	r.After.Goroutines = 1000
	if p := r.problems(); len(p) != 0 {
		t.Errorf("problems of an arm without a server's figures: %q", p)
	}
}

// TestTable renders a fixed pair of arms; testdata/table.md shows what a run prints.
func TestTable(t *testing.T) {
	ours := cleanResult()
	theirs := newArmResult("docker-proxy", false)
	for i := range 6 {
		c := cycleResult{mode: modes[i%3].name, startDur: 700 * time.Millisecond, firstDur: 2 * time.Millisecond, rmDur: 250 * time.Millisecond, resends: i % 3 / 2}
		if i == 0 {
			c.firstErr = io.EOF
		}
		theirs.add(c)
	}
	theirs.Steady = steadyResult{Requests: 990, Kinds: map[string]int{}}
	theirs.Wall = 50 * time.Second
	cfg := config{Cycles: 6, Parallel: 2, DelayMax: 300 * time.Millisecond, Race: true, HostPorts: "leased", SteadyClients: 2, SteadyInterval: 20 * time.Millisecond, Seed: 42}
	got := table(cfg, []*armResult{ours, theirs})
	golden := filepath.Join("testdata", "table.md")
	if *update {
		if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (run go test -run TestTable -update to create it)", err)
	}
	if got != string(want) {
		t.Errorf("table differs from %s (go test -run TestTable -update rewrites it):\n%s", golden, got)
	}
}

func TestParseSample(t *testing.T) {
	const exposition = `# HELP go_goroutines Number of goroutines that currently exist.
# TYPE go_goroutines gauge
go_goroutines 27
# TYPE go_gc_duration_seconds summary
go_gc_duration_seconds{quantile="0.5"} 0.0001
go_gc_duration_seconds_sum 0.002
go_gc_duration_seconds_count 14
# TYPE go_memstats_heap_inuse_bytes gauge
go_memstats_heap_inuse_bytes 8.265728e+06
# TYPE go_memstats_heap_alloc_bytes gauge
go_memstats_heap_alloc_bytes 5.721376e+06
# TYPE go_memstats_next_gc_bytes gauge
go_memstats_next_gc_bytes 1.1714538e+07
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 3.2231424e+07
# TYPE eds_registrations gauge
eds_registrations 1
`
	got, err := parseSample(strings.NewReader(exposition))
	if err != nil {
		t.Fatal(err)
	}
	want := serverSample{Goroutines: 27, HeapInuse: 8265728, HeapAlloc: 5721376, NextGC: 11714538, RSS: 32231424, GCs: 14, Live: 1}
	if got != want {
		t.Errorf("parseSample = %+v, want %+v", got, want)
	}
	if _, err := parseSample(strings.NewReader("go_goroutines 3\n")); err == nil || !strings.Contains(err.Error(), "eds_registrations") {
		t.Errorf("parseSample of a partial exposition: %v, want an error naming what is missing", err)
	}
}

func TestMedianSample(t *testing.T) {
	got := medianSample([]serverSample{
		{Goroutines: 27, HeapInuse: 9, RSS: 1, GCs: 5},
		{Goroutines: 29, HeapInuse: 7, RSS: 3, GCs: 6},
		{Goroutines: 28, HeapInuse: 30, RSS: 2, GCs: 7, Live: 1},
	})
	if want := (serverSample{Goroutines: 28, HeapInuse: 9, RSS: 2, GCs: 7, Live: 1}); got != want {
		t.Errorf("medianSample = %+v, want %+v", got, want)
	}
}

// TestUDPExchange: a datagram sent before the app listens is lost, the exchange resends until
// the app answers, and gives up once the bound has passed.
func TestUDPExchange(t *testing.T) {
	port := testbed.FreePort(t)
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	go func() {
		time.Sleep(350 * time.Millisecond) // an app that starts late
		pc, err := net.ListenPacket("udp", addr)
		if err != nil {
			t.Error(err)
			return
		}
		defer pc.Close()
		buf := make([]byte, 64)
		n, from, err := pc.ReadFrom(buf)
		if err != nil || string(buf[:n]) != "WHOAMI" {
			t.Errorf("app got %q, %v", buf[:n], err)
			return
		}
		_, _ = pc.WriteTo([]byte("late-app"), from)
	}()
	resends, err := udpExchange(t.Context(), addr, "late-app", 2*time.Second)
	if err != nil || resends < 2 {
		t.Fatalf("udpExchange with an app listening after 350ms: %d resends, %v; want an answer after at least 2 resends", resends, err)
	}

	silent := net.JoinHostPort("127.0.0.1", strconv.Itoa(testbed.FreePort(t)))
	began := time.Now()
	if _, err := udpExchange(t.Context(), silent, "nobody", 500*time.Millisecond); err == nil || !strings.Contains(err.Error(), "no answer") {
		t.Fatalf("udpExchange with nothing listening: %v, want no answer", err)
	}
	if took := time.Since(began); took > time.Second {
		t.Errorf("udpExchange gave up after %v, bound 500ms", took)
	}
}

// keepAliveServer answers every request on a connection with the echo server's JSON, and after
// closeAfter requests (0: never) closes the connection, as a proxy draining a listener would.
func keepAliveServer(t *testing.T, name string, closeAfter int) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				br := bufio.NewReader(c)
				for n := 1; ; n++ {
					req, err := http.ReadRequest(br)
					if err != nil {
						return
					}
					_, _ = io.Copy(io.Discard, req.Body)
					body := fmt.Sprintf(`{"name":%q}`, name)
					fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
					if n == closeAfter {
						return
					}
				}
			}()
		}
	}()
	return ln.Addr().String()
}

// TestSteadyLoad: kept-alive requests count as such, and a proxy that closes the connection
// shows as errors and reconnects, which net/http would have hidden.
func TestSteadyLoad(t *testing.T) {
	tests := []struct {
		name       string
		closeAfter int
		answerAs   string
		wantErrors bool
	}{
		{"kept alive", 0, "steady", false},
		{"closed under the client", 5, "steady", true},
		{"another container answers", 0, "someone-else", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := runSteady(t, keepAliveServer(t, tt.answerAs, tt.closeAfter), "steady", 2, 5*time.Millisecond)
			time.Sleep(300 * time.Millisecond)
			s.Stop()
			r := s.result()
			if r.Requests < 20 {
				t.Fatalf("only %d requests in 300ms at 2 clients x 1 per 5ms", r.Requests)
			}
			if gotErrors := r.Errors > 0; gotErrors != tt.wantErrors {
				t.Fatalf("%+v: errors %v, want %v", r, gotErrors, tt.wantErrors)
			}
			if tt.closeAfter > 0 && r.Reconnects == 0 {
				t.Errorf("%+v: no reconnect counted", r)
			}
			if !tt.wantErrors && r.Reconnects != 0 {
				t.Errorf("%+v: reconnects on a kept-alive connection", r)
			}
		})
	}
}
