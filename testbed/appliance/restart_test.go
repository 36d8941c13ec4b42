package appliance

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
)

// TestE2EApplianceRestarts: on the compose appliance (one per daemon generation, started once per
// process and reused by every run under -count=N), under a steady load on an HTTP, a TCP and a
// UDP published port:
//   - kill -9 of the server container's process: no request fails; the restart policy brings it
//     back and within 5 s it lists the live mappings again; a container stopped while it was
//     down is gone from Envoy afterwards;
//   - a restart of the Envoy container: UDP (the shim's own) never fails, and every port is
//     served again within 5 s;
//   - and afterwards nothing leaks: the same registrations, Envoy listeners and shim processes
//     as before, no shim holding more file descriptors than it did.
func TestE2EApplianceRestarts(t *testing.T) {
	for _, gen := range testbed.Generations(t) {
		t.Run(string(gen), func(t *testing.T) {
			start := time.Now()
			f := sharedFixture(t, gen)
			f.checkSettled(t)
			f.restarts(t)
			f.checkSettled(t)
			t.Logf("restarts and checks in %s", time.Since(start).Round(100*time.Millisecond))
		})
	}
}

// restartFixture is an appliance serving three long-lived published ports.
type restartFixture struct {
	a                         *Appliance
	web, echo, dgram          *testbed.Container
	httpURL, tcpAddr, udpAddr string
	mappings                  []Registration
	listeners                 []string
	shims                     map[int]int // pid of each shim: its open file descriptors at the start
}

func newRestartFixture(tb testing.TB, gen testbed.Generation) *restartFixture {
	tb.Helper()
	f := &restartFixture{a: startShared(tb, Options{Generation: gen})}
	d := f.a.Daemon
	httpPort, tcpPort, udpPort := testbed.FreePort(tb), testbed.FreePort(tb), testbed.FreePort(tb)
	f.web = d.Run(tb, testbed.RunOptions{
		Publish: []string{fmt.Sprintf("127.0.0.1:%d:80", httpPort)},
		Labels:  map[string]string{"ServiceName": "web", "EnvironmentName": "restart"},
	})
	f.echo = d.Run(tb, testbed.RunOptions{
		Publish: []string{fmt.Sprintf("127.0.0.1:%d:7", tcpPort)},
		Labels:  map[string]string{"ServiceName": "echo", "EnvironmentName": "restart", "ProxyMode": "tcp"},
	})
	f.dgram = d.Run(tb, testbed.RunOptions{
		Publish: []string{fmt.Sprintf("127.0.0.1:%d:7/udp", udpPort)},
		Labels:  map[string]string{"ServiceName": "dgram", "EnvironmentName": "restart"},
	})
	f.httpURL = fmt.Sprintf("http://127.0.0.1:%d/", httpPort)
	f.tcpAddr = fmt.Sprintf("127.0.0.1:%d", tcpPort)
	f.udpAddr = fmt.Sprintf("127.0.0.1:%d", udpPort)
	for _, p := range f.probes() {
		testbed.WaitFor(tb, 15*time.Second, p.name+" served", func() error { return p.do(context.Background()) })
	}
	f.mappings = f.a.Registrations(tb)
	if len(f.mappings) != 3 {
		tb.Fatalf("registrations %+v, want web, echo and dgram", f.mappings)
	}
	f.listeners = f.a.Listeners(tb)
	if len(f.listeners) != 2 {
		tb.Fatalf("Envoy's listeners %q, want web's and echo's", f.listeners)
	}
	f.shims = map[int]int{}
	for _, pid := range d.Processes("envoy-docker-shim") {
		f.shims[pid] = openFDs(pid)
	}
	if len(f.shims) != 3 {
		tb.Fatalf("shims %v, want one per published port", f.shims)
	}
	return f
}

// probes are the requests of the steady load, one per published port.
func (f *restartFixture) probes() []probe {
	return []probe{
		{"http", func(ctx context.Context) error {
			ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
			defer cancel()
			status, body, err := testbed.HTTPGet(ctx, f.httpURL)
			if err == nil && (status != 200 || !strings.Contains(body, `"`+f.web.Name+`"`)) {
				err = fmt.Errorf("status %d body %.80q, want the echo server %s", status, body, f.web.Name)
			}
			return err
		}},
		{"tcp", func(ctx context.Context) error {
			ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
			defer cancel()
			got, err := testbed.TCPEcho(ctx, f.tcpAddr, []byte("WHOAMI\n"))
			if err == nil && string(got) != f.echo.Name+"\n" {
				err = fmt.Errorf("tcp %s answered %q, want %s", f.tcpAddr, got, f.echo.Name)
			}
			return err
		}},
		{"udp", func(ctx context.Context) error {
			ctx, cancel := context.WithTimeout(ctx, time.Second)
			defer cancel()
			got, err := testbed.UDPEcho(ctx, f.udpAddr, []byte("WHOAMI"))
			if err == nil && strings.TrimSpace(string(got)) != f.dgram.Name {
				err = fmt.Errorf("udp %s answered %q, want %s", f.udpAddr, got, f.dgram.Name)
			}
			return err
		}},
	}
}

// checkSettled: the appliance is healthy and holds exactly the fixture's ports: the same
// registrations, Envoy listeners and shim processes, and no shim holds more descriptors than at
// the start (a connection to the server or a socket left behind by each restart would show).
func (f *restartFixture) checkSettled(t *testing.T) {
	t.Helper()
	f.a.WaitHealthy(t, 30*time.Second, "server", "envoy")
	testbed.WaitFor(t, 10*time.Second, "the server lists the fixture's mappings", func() error {
		got, err := f.a.registrationsErr()
		if err == nil && !sameMappings(got, f.mappings) {
			err = fmt.Errorf("lists %+v, want %+v", got, f.mappings)
		}
		return err
	})
	testbed.WaitFor(t, 10*time.Second, "Envoy holds the fixture's listeners", func() error {
		if got := f.a.Listeners(t); !slices.Equal(got, f.listeners) {
			return fmt.Errorf("listeners %q, want %q", got, f.listeners)
		}
		return nil
	})
	testbed.WaitFor(t, 10*time.Second, "the fixture's shims, and no descriptor more", func() error {
		pids := f.a.Daemon.Processes("envoy-docker-shim")
		if len(pids) != len(f.shims) {
			return fmt.Errorf("shim processes %v, want %d", pids, len(f.shims))
		}
		for _, pid := range pids {
			base, ok := f.shims[pid]
			if !ok {
				return fmt.Errorf("shim %d is not one of the fixture's %v", pid, f.shims)
			}
			if n := openFDs(pid); n > base {
				return fmt.Errorf("shim %d holds %d descriptors, %d at the start", pid, n, base)
			}
		}
		return nil
	})
	if ids := strings.Fields(f.a.Daemon.MustDocker(t, "ps", "-a", "-q", "--filter", "label=eds-test=gone")); len(ids) != 0 {
		t.Fatalf("containers of earlier runs left: %q", ids)
	}
}

// restarts runs the server's kill -9 and Envoy's restart under the steady load.
func (f *restartFixture) restarts(t *testing.T) {
	t.Helper()
	a := f.a
	// A fourth port, stopped while the server is down: nobody re-registers it.
	gonePort := testbed.FreePort(t)
	gone := a.Daemon.Run(t, testbed.RunOptions{
		Publish: []string{fmt.Sprintf("127.0.0.1:%d:80", gonePort)},
		Labels:  map[string]string{"ServiceName": "gone", "EnvironmentName": "restart", "eds-test": "gone"},
	})
	t.Cleanup(func() { a.Daemon.Remove(t, gone) })
	var goneListener string
	testbed.WaitFor(t, 10*time.Second, "gone registered", func() error {
		regs, err := a.registrationsErr()
		for _, r := range regs {
			if r.ContainerID == gone.ID {
				goneListener = r.Listener
			}
		}
		if err == nil && goneListener == "" {
			err = fmt.Errorf("no registration of %s in %+v", gone.ID, regs)
		}
		return err
	})

	load := startLoad(f.probes(), 10*time.Millisecond, 2*time.Minute)
	defer load.Stop()
	time.Sleep(300 * time.Millisecond) // the load runs before anything restarts

	// The server: kill -9, brought back by its restart policy.
	serverDown := time.Now()
	server := a.Container(t, "server")
	pid := a.Daemon.MustDocker(t, "inspect", "-f", "{{.State.Pid}}", server)
	if err := exec.Command("kill", "-9", pid).Run(); err != nil {
		t.Fatalf("kill -9 %s: %v", pid, err)
	}
	a.Daemon.Stop(t, gone)
	var restarted time.Time
	testbed.WaitFor(t, 30*time.Second, "the server restarted by its restart policy", func() error {
		state := a.Daemon.MustDocker(t, "inspect", "-f", "{{.State.Running}} {{.State.Pid}}", server)
		if f := strings.Fields(state); len(f) != 2 || f[0] != "true" || f[1] == pid || f[1] == "0" {
			return fmt.Errorf("server state %q", state)
		}
		restarted = time.Now()
		return nil
	})
	testbed.WaitFor(t, 5*time.Second, "the restarted server lists the live mappings", func() error {
		got, err := a.registrationsErr()
		if err == nil && !sameMappings(got, f.mappings) {
			err = fmt.Errorf("lists %+v, want %+v", got, f.mappings)
		}
		return err
	})
	t.Logf("registry rebuilt %v after the server's restart", time.Since(restarted).Round(time.Millisecond))
	testbed.WaitFor(t, 20*time.Second, "the stopped container's listener gone from Envoy", func() error {
		if slices.Contains(a.Listeners(t), goneListener) {
			return fmt.Errorf("%s still in Envoy", goneListener)
		}
		return nil
	})
	time.Sleep(200 * time.Millisecond)
	serverPhase := load.window(serverDown, time.Now())

	// Envoy: restarted.
	envoyDown := time.Now()
	a.Daemon.MustDocker(t, "restart", "-t", "2", a.Container(t, "envoy"))
	restartedEnvoy := time.Now()
	testbed.WaitFor(t, 5*time.Second, "every port served again after Envoy's restart", func() error {
		for _, p := range f.probes() {
			if err := p.do(context.Background()); err != nil {
				return err
			}
		}
		return nil
	})
	t.Logf("every port served again %v after Envoy's restart", time.Since(restartedEnvoy).Round(time.Millisecond))
	time.Sleep(300 * time.Millisecond)
	envoyPhase := load.window(envoyDown, time.Now())
	load.Stop()

	t.Logf("server kill -9: %s", serverPhase)
	t.Logf("envoy restart: %s", envoyPhase)
	if serverPhase.failedAll() != 0 || serverPhase.okAll() == 0 {
		t.Errorf("through the server's kill -9 and restart, requests failed: %s", serverPhase)
	}
	if r := envoyPhase["udp"]; r.failed != 0 || r.ok == 0 {
		t.Errorf("UDP (proxied by the shim) failed through Envoy's restart: %s", envoyPhase)
	}
	for name, r := range envoyPhase {
		if r.ok == 0 {
			t.Errorf("%s: nothing served through Envoy's restart", name)
		}
	}
}

// probe is one request of the steady load.
type probe struct {
	name string
	do   func(context.Context) error
}

// attempt is one request of the steady load and its outcome.
type attempt struct {
	start, end time.Time
	err        error
}

// load sends each probe back to back (one client per probe, a pause between requests) until
// stopped, for at most limit.
type load struct {
	mu       sync.Mutex
	attempts map[string][]attempt
	cancel   context.CancelFunc
	wg       sync.WaitGroup
}

func startLoad(probes []probe, pause, limit time.Duration) *load {
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	l := &load{attempts: map[string][]attempt{}, cancel: cancel}
	for _, p := range probes {
		l.wg.Go(func() {
			for ctx.Err() == nil {
				a := attempt{start: time.Now()}
				a.err = p.do(ctx)
				a.end = time.Now()
				if ctx.Err() != nil {
					return // cut by Stop: neither a success nor a failure
				}
				l.mu.Lock()
				l.attempts[p.name] = append(l.attempts[p.name], a)
				l.mu.Unlock()
				select {
				case <-ctx.Done():
				case <-time.After(pause):
				}
			}
		})
	}
	return l
}

// Stop ends the load and waits for it (idempotent).
func (l *load) Stop() {
	l.cancel()
	l.wg.Wait()
}

// loadResult is what one probe's requests in a time window came to.
type loadResult struct {
	ok, failed, refused int
	// outage spans the failed requests: from the start of the first to the end of the last.
	outage   time.Duration
	examples []string
}

type phaseResult map[string]loadResult

// window sums up the requests that started in [from, to).
func (l *load) window(from, to time.Time) phaseResult {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := phaseResult{}
	for name, as := range l.attempts {
		var r loadResult
		var first, last time.Time
		for _, a := range as {
			if a.start.Before(from) || !a.start.Before(to) {
				continue
			}
			if a.err == nil {
				r.ok++
				continue
			}
			r.failed++
			if errors.Is(a.err, syscall.ECONNREFUSED) {
				r.refused++
			}
			if first.IsZero() {
				first = a.start
			}
			last = a.end
			if len(r.examples) < 3 {
				r.examples = append(r.examples, a.err.Error())
			}
		}
		if !first.IsZero() {
			r.outage = last.Sub(first)
		}
		out[name] = r
	}
	return out
}

func (p phaseResult) okAll() (n int) {
	for _, r := range p {
		n += r.ok
	}
	return n
}

func (p phaseResult) failedAll() (n int) {
	for _, r := range p {
		n += r.failed
	}
	return n
}

func (p phaseResult) String() string {
	var parts []string
	for _, name := range slices.Sorted(maps.Keys(p)) {
		r := p[name]
		s := fmt.Sprintf("%s %d ok, %d failed (%d refused)", name, r.ok, r.failed, r.refused)
		if r.failed > 0 {
			s += fmt.Sprintf(" over %v, e.g. %q", r.outage.Round(time.Millisecond), r.examples)
		}
		parts = append(parts, s)
	}
	return strings.Join(parts, "; ")
}

// openFDs counts a process's open file descriptors (0 if it is gone).
func openFDs(pid int) int {
	entries, _ := os.ReadDir(filepath.Join("/proc", strconv.Itoa(pid), "fd"))
	return len(entries)
}
