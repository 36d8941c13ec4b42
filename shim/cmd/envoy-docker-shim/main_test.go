// Contract tests: the shim binary, started exactly as dockerd starts its userland proxy (see
// shimtest), against a fake registration server. Each test names the clause of
// docs/docker-proxy-contract.md (or of issue 4) it checks.
package main_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/internal/mapping"
	"github.com/envoy-docker-shim/envoy-docker-shim/internal/shimlink"
	"github.com/envoy-docker-shim/envoy-docker-shim/shim/idle"
	"github.com/envoy-docker-shim/envoy-docker-shim/shim/shimtest"
	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
)

var shimBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "envoy-docker-shim-test")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	shimBin = filepath.Join(dir, "envoy-docker-shim")
	goBin, err := exec.LookPath("go")
	if err == nil {
		build := exec.Command(goBin, "build", "-ldflags="+idle.LinkFlag, "-o", shimBin, ".")
		build.Env = append(os.Environ(), "CGO_ENABLED=0")
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		err = build.Run()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "building the shim:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

var loopback = netip.MustParseAddr("127.0.0.1")

// harness is one test's world: a socket path for the fake server and the shims started.
type harness struct {
	t    *testing.T
	sock string
}

func newHarness(t *testing.T) *harness {
	t.Parallel()
	return &harness{t: t, sock: filepath.Join(t.TempDir(), "server.sock")}
}

// server starts the fake registration server (nil answer: always Ready).
func (h *harness) server(answer shimtest.Answer) *shimtest.Registrar {
	return shimtest.StartRegistrar(h.t, h.sock, answer)
}

// start execs the shim as dockerd would, with EDS_SHIM_SOCKET set and extra environment.
func (h *harness) start(args []string, env []string, listen *os.File, extra ...*os.File) *shimtest.Proxy {
	h.t.Helper()
	p, err := shimtest.StartProxy(shimBin, args, append([]string{"EDS_SHIM_SOCKET=" + h.sock}, env...), listen, extra...)
	if err != nil {
		h.t.Fatal(err)
	}
	h.t.Cleanup(p.Kill)
	return p
}

func (h *harness) status(p *shimtest.Proxy) shimtest.Status {
	h.t.Helper()
	st, err := p.ReadStatus()
	if err != nil {
		h.t.Fatal(err)
	}
	return st
}

// expectReady checks "0\n" and that fd 3 was closed right after it.
func (h *harness) expectReady(p *shimtest.Proxy) shimtest.Status {
	h.t.Helper()
	st := h.status(p)
	if !st.OK {
		h.t.Fatalf("status %q, want \"0\\n\"", st.Raw)
	}
	if !p.StatusPipeClosed(time.Second) {
		h.t.Error("fd 3 still open after \"0\\n\"")
	}
	return st
}

// startTCPReady starts a TCP shim for host as dockerd would (with -use-listen-fd: a listening socket
// on fd 4, whose copy it then closes, as dockerd does after a successful start), and expects ready.
func (h *harness) startTCPReady(host, container netip.AddrPort, useListenFD bool) (*shimtest.Proxy, shimtest.Status) {
	h.t.Helper()
	var sock *os.File
	if useListenFD {
		var err error
		if sock, err = shimtest.ListenTCP(host); err != nil {
			h.t.Fatal(err)
		}
	}
	p := h.start(shimtest.Args("tcp", host, container, useListenFD), nil, sock)
	st := h.expectReady(p)
	if sock != nil {
		sock.Close()
	}
	return p, st
}

// expectFailure checks "1\n<message containing want>", a non-zero exit, and that the shim is gone.
func (h *harness) expectFailure(p *shimtest.Proxy, within time.Duration, want ...string) shimtest.Status {
	h.t.Helper()
	st := h.status(p)
	if st.OK || len(st.Raw) < 3 || string(st.Raw[:2]) != "1\n" {
		h.t.Fatalf("status %q, want \"1\\n<reason>\"", st.Raw)
	}
	for _, w := range want {
		if !strings.Contains(st.Message, w) {
			h.t.Errorf("reason %q does not contain %q", st.Message, w)
		}
	}
	if st.After > within {
		h.t.Errorf("failure reported after %s, want within %s", st.After, within)
	}
	code, _, err := p.Wait(2 * time.Second)
	if err != nil {
		h.t.Fatalf("shim left running after its failure: %v", err)
	}
	if code == 0 {
		h.t.Error("exit code 0 after a failure")
	}
	return st
}

// stop sends sig and checks the exit: code 0 within 1 s.
func (h *harness) stop(p *shimtest.Proxy, sig os.Signal) {
	h.t.Helper()
	if err := p.Signal(sig); err != nil {
		h.t.Fatal(err)
	}
	code, took, err := p.Wait(time.Second)
	if err != nil {
		h.t.Fatalf("after %v: %v", sig, err)
	}
	if code != 0 {
		h.t.Errorf("exit code %d after %v, want 0", code, sig)
	}
	h.t.Logf("exited %d, %s after %v", code, took.Round(time.Millisecond), sig)
}

func freePort(t *testing.T) uint16 {
	t.Helper()
	return uint16(testbed.FreePort(t))
}

func tcpArgs(t *testing.T, useListenFD bool) ([]string, netip.AddrPort) {
	host := netip.AddrPortFrom(loopback, freePort(t))
	return shimtest.Args("tcp", host, netip.MustParseAddrPort("172.17.0.2:80"), useListenFD), host
}

// --- Readiness handshake ---

// Contract: "Write 0\n in one write(2)" once ready; stopping: "SIGINT ... Exit 0, promptly", and
// the flow's "the shim ends its registration".
func TestReadyHandshakeZeroNewlineThenSIGINTExitsZeroAndDeregisters(t *testing.T) {
	h := newHarness(t)
	srv := h.server(nil)
	args, host := tcpArgs(t, false)
	p := h.start(args, nil, nil)
	st := h.expectReady(p)
	t.Logf("ready after %s", st.After)
	opens := srv.Opens()
	if len(opens) != 1 || len(srv.Live()) != 1 {
		t.Fatalf("%d opens, %d live", len(opens), len(srv.Live()))
	}
	o := opens[0]
	want := mapping.Mapping{Key: mapping.Key{Proto: mapping.TCP, HostIP: host.Addr(), HostPort: host.Port()}, ContainerIP: netip.MustParseAddr("172.17.0.2"), ContainerPort: 80}
	if o.Mapping != want || o.PID != p.Cmd.Process.Pid || o.Version == "" || o.ProxiesItself {
		t.Errorf("Open = %v", o)
	}
	h.stop(p, os.Interrupt)
	if !srv.WaitFor(time.Second, func(r *shimtest.Registrar) bool { return len(r.Live()) == 0 }) {
		t.Error("registration still live after the shim exited")
	}
	expectStoppingLog(t, srv, "interrupt")
}

// expectStoppingLog checks that the shim said it was stopping, and why, where its logs go.
func expectStoppingLog(t *testing.T, srv *shimtest.Registrar, signal string) {
	t.Helper()
	for _, l := range srv.Logs() {
		if strings.HasPrefix(l.Message, "msg=stopping ") && strings.Contains(l.Message, "signal="+signal) {
			return
		}
	}
	t.Errorf("no \"stopping\" log line naming signal %s; logs: %v", signal, srv.Logs())
}

// Contract: "Pdeathsig = SIGTERM: handle SIGTERM like SIGINT."
func TestSIGTERMIsHandledLikeSIGINT(t *testing.T) {
	h := newHarness(t)
	srv := h.server(nil)
	args, _ := tcpArgs(t, false)
	p := h.start(args, nil, nil)
	h.expectReady(p)
	h.stop(p, syscall.SIGTERM)
	if !srv.WaitFor(time.Second, func(r *shimtest.Registrar) bool { return len(r.Live()) == 0 }) {
		t.Error("registration still live")
	}
	expectStoppingLog(t, srv, "terminated")
}

// Issue 4: "SIGINT/SIGTERM: deregister and exit 0 within 1 s, even when the server is gone."
func TestSIGINTWhenServerIsGoneExitsZeroWithin1s(t *testing.T) {
	h := newHarness(t)
	srv := h.server(nil)
	args, _ := tcpArgs(t, false)
	p := h.start(args, nil, nil)
	h.expectReady(p)
	srv.Stop()
	time.Sleep(200 * time.Millisecond) // the shim is now retrying
	h.stop(p, os.Interrupt)
}

// Contract: the daemon "sends SIGINT and then waits": a shim stopped while waiting for the server
// exits 0 at once and still leaves a reason on fd 3.
func TestSIGINTWhileRegisteringExitsZero(t *testing.T) {
	h := newHarness(t)
	h.server(func(context.Context, *shimlink.Open) shimlink.Message { return nil })
	args, _ := tcpArgs(t, false)
	p := h.start(args, nil, nil)
	time.Sleep(300 * time.Millisecond)
	h.stop(p, os.Interrupt)
	if st := h.status(p); st.OK || !strings.Contains(st.Message, "stopped") {
		t.Errorf("status %q", st.Raw)
	}
}

// Contract: "Report ready only when traffic ... will actually reach the container" and
// "On failure write 1\n<clear message>": the server's Failed reason reaches fd 3 verbatim.
func TestServerFailedReasonReachesFD3(t *testing.T) {
	h := newHarness(t)
	reason := "listen tcp4 127.0.0.1:8080: bind: address already in use (envoy: cannot bind to 127.0.0.1:8080)"
	h.server(func(context.Context, *shimlink.Open) shimlink.Message {
		return shimtest.Failed(reason)
	})
	args, _ := tcpArgs(t, false)
	st := h.expectFailure(h.start(args, nil, nil), 2*time.Second)
	if st.Message != reason {
		t.Errorf("reason %q, want %q", st.Message, reason)
	}
}

// Contract: "The daemon sends SIGINT ... Exit 0, promptly" also when it comes right after "0\n".
func TestSIGINTRightAfterReadyExitsZero(t *testing.T) {
	h := newHarness(t)
	host := netip.AddrPortFrom(loopback, freePort(t))
	p := h.start(shimtest.Args("udp", host, netip.MustParseAddrPort("127.0.0.1:9"), false), nil, nil)
	h.expectReady(p)
	h.stop(p, os.Interrupt)
}

// Issue 4: "Server stopped: docker run -p fails within 10 s with a message naming the server socket".
func TestServerNotRunningFailsNamingTheSocket(t *testing.T) {
	h := newHarness(t)
	args, _ := tcpArgs(t, false)
	h.expectFailure(h.start(args, nil, nil), 3*time.Second, h.sock, "not running")
}

// Contract: "Defaults must work with an empty environment": the default socket path is used and named.
func TestEmptyEnvironmentUsesDefaultSocket(t *testing.T) {
	t.Parallel()
	const def = "/run/envoy-docker-shim/shim.sock"
	if _, err := os.Stat(def); err == nil {
		t.Skip(def + " exists on this host")
	}
	args, _ := tcpArgs(t, false)
	p, err := shimtest.StartProxy(shimBin, args, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Kill()
	h := &harness{t: t}
	h.expectFailure(p, 3*time.Second, def)
}

// Contract: "every wait is bounded well inside the daemon's 16 s" (issue 4: fail by ~10 s at
// worst): a server that never answers, with the default EDS_SHIM_TIMEOUT and with a shorter one.
func TestServerThatNeverAnswersFailsWithinTheTimeout(t *testing.T) {
	for _, tc := range []struct {
		name     string
		env      []string
		min, max time.Duration
	}{
		{"default 10s", nil, 9 * time.Second, 10 * time.Second},
		{"EDS_SHIM_TIMEOUT=2s", []string{"EDS_SHIM_TIMEOUT=2s"}, 1500 * time.Millisecond, 2 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if testing.Short() && tc.env == nil {
				t.Skip("takes the full 10 s; skipped with -short")
			}
			h := newHarness(t)
			h.server(func(context.Context, *shimlink.Open) shimlink.Message { return nil })
			args, _ := tcpArgs(t, false)
			st := h.expectFailure(h.start(args, tc.env, nil), tc.max, "did not answer", h.sock)
			if st.After < tc.min {
				t.Errorf("gave up after %s, want about %s", st.After, tc.max)
			}
		})
	}
}

func TestInvalidEnvironmentFailsClearly(t *testing.T) {
	h := newHarness(t)
	args, _ := tcpArgs(t, false)
	h.expectFailure(h.start(args, []string{"EDS_SHIM_TIMEOUT=20s"}, nil), time.Second, "EDS_SHIM_TIMEOUT")
	h.expectFailure(h.start(args, []string{"EDS_SHIM_TIMEOUT=ten"}, nil), time.Second, "EDS_SHIM_TIMEOUT")
}

// --- Invocation ---

// Issue 4: "Invalid values (port out of range, bad IP, unknown protocol) fail at once with a clear message."
func TestBadArgumentsFailAtOnce(t *testing.T) {
	ok := []string{"-proto", "tcp", "-host-ip", "127.0.0.1", "-host-port", "8080", "-container-ip", "172.17.0.2", "-container-port", "80"}
	set := func(flag, value string) []string {
		out := append([]string(nil), ok...)
		for i := range out {
			if out[i] == flag {
				out[i+1] = value
			}
		}
		return out
	}
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"host port out of range", set("-host-port", "65536"), `invalid -host-port "65536": port out of range`},
		{"container port zero", set("-container-port", "0"), `invalid -container-port "0": port out of range`},
		{"bad host IP", set("-host-ip", "256.0.0.1"), `invalid -host-ip "256.0.0.1": not an IP address`},
		{"bad container IP", set("-container-ip", "::g"), `invalid -container-ip "::g"`},
		{"unknown protocol", set("-proto", "icmp"), `unsupported protocol "icmp"`},
		{"missing flags", []string{"-proto", "tcp"}, "missing -host-port"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			srv := h.server(nil)
			p := h.start(tc.args, nil, nil)
			h.expectFailure(p, time.Second, tc.want)
			if code := p.Cmd.ProcessState.ExitCode(); code != 2 {
				t.Errorf("exit code %d, want 2 (usage)", code)
			}
			if len(srv.Opens()) != 0 {
				t.Error("registered despite bad arguments")
			}
		})
	}
}

// Contract: "ignore (with a log line) any flag added by a future daemon rather than dying on it".
func TestUnknownExtraFlagIsLoggedAndIgnored(t *testing.T) {
	h := newHarness(t)
	srv := h.server(nil)
	args, _ := tcpArgs(t, false)
	p := h.start(append(args, "-future-flag", "-future-option", "value"), nil, nil)
	h.expectReady(p)
	if !srv.WaitFor(2*time.Second, func(r *shimtest.Registrar) bool {
		n := 0
		for _, l := range r.Logs() {
			if strings.Contains(l.Message, "-future-flag") || strings.Contains(l.Message, "-future-option value") {
				n++
			}
		}
		return n == 2
	}) {
		t.Errorf("the ignored flags were not logged to the server; logs: %v", srv.Logs())
	}
	h.stop(p, os.Interrupt)
}

// Invocation: "-version".
func TestVersion(t *testing.T) {
	t.Parallel()
	r, w, _ := os.Pipe()
	defer r.Close()
	cmd := exec.Command(shimBin, "-version")
	cmd.Env = []string{}
	cmd.ExtraFiles = []*os.File{w}
	out, err := cmd.Output()
	w.Close()
	if err != nil || !strings.HasPrefix(string(out), "envoy-docker-shim version ") {
		t.Fatalf("-version: %q, %v", out, err)
	}
	if b, _ := io.ReadAll(r); len(b) != 0 {
		t.Errorf("-version wrote %q on fd 3", b)
	}
}

// Contract: "Without the flag, fd 4 is not ours: never touch it" and "other fds ... must be left alone".
func TestFD4AndOtherInheritedFDsLeftAloneWithoutFlag(t *testing.T) {
	h := newHarness(t)
	h.server(nil)
	r4, w4, _ := os.Pipe()
	r5, w5, _ := os.Pipe()
	defer r4.Close()
	defer r5.Close()
	args, _ := tcpArgs(t, false)
	p := h.start(args, nil, w4, w5) // fd 4 and fd 5, no -use-listen-fd
	w4.Close()
	w5.Close()
	h.expectReady(p)
	for fd, r := range map[int]*os.File{4: r4, 5: r5} {
		target, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%d", p.Cmd.Process.Pid, fd))
		if err != nil || !strings.HasPrefix(target, "pipe:") {
			t.Errorf("fd %d in the shim: %q, %v", fd, target, err)
		}
		r.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		if n, err := r.Read(make([]byte, 1)); n != 0 || !os.IsTimeout(err) {
			t.Errorf("fd %d was written or closed: %d, %v", fd, n, err)
		}
	}
	h.stop(p, os.Interrupt)
}

// --- Server restart ---

// Issue 4: "if the server restarts, the shim reconnects and re-registers on its own (with
// backoff) without disturbing the port".
func TestServerRestartReregisters(t *testing.T) {
	h := newHarness(t)
	srv := h.server(nil)
	args, _ := tcpArgs(t, false)
	p := h.start(args, nil, nil)
	h.expectReady(p)
	srv.Stop()
	time.Sleep(500 * time.Millisecond)
	if p.Exited() {
		t.Fatal("the shim exited when the server went away")
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	if !srv.WaitFor(5*time.Second, func(r *shimtest.Registrar) bool { return len(r.Opens()) == 2 && len(r.Live()) == 1 }) {
		t.Fatalf("not re-registered: %d opens, %d live", len(srv.Opens()), len(srv.Live()))
	}
	h.stop(p, os.Interrupt)
}

// --- fd 4, TCP ---

// Contract (daemon 28+): "the socket on fd 4 is bound; TCP already listening" and the shim must
// not drop what queues on it: with a server that says Ready but no Envoy on the port, the shim
// keeps serving the port itself, including a connection queued before it started.
func TestTCPListenFDIsServedUntilEnvoyTakesOver(t *testing.T) {
	h := newHarness(t)
	srv := h.server(nil)
	echo := tcpEcho(t)
	host := netip.AddrPortFrom(loopback, freePort(t))
	sock, err := shimtest.ListenTCP(host)
	if err != nil {
		t.Fatal(err)
	}
	early, err := net.Dial("tcp", host.String()) // queued before the proxy exists
	if err != nil {
		t.Fatal(err)
	}
	defer early.Close()
	p := h.start(shimtest.Args("tcp", host, echo, true), nil, sock)
	h.expectReady(p)
	sock.Close() // "The daemon closes its own copy after a successful start."
	if err := echoRoundTrip(early, "queued before start"); err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		if err := dialEcho(host, fmt.Sprint("after ready ", i)); err != nil {
			t.Fatal(err)
		}
	}
	if len(srv.Live()) != 1 {
		t.Fatal("not registered")
	}
	h.stop(p, os.Interrupt)
	if _, err := net.DialTimeout("tcp", host.String(), time.Second); err == nil {
		t.Error("port still open after the shim exited")
	}
}

func TestTCPListenFDWrongSocketFails(t *testing.T) {
	h := newHarness(t)
	h.server(nil)
	host := netip.AddrPortFrom(loopback, freePort(t))
	udp, err := shimtest.BindUDP(host)
	if err != nil {
		t.Fatal(err)
	}
	defer udp.Close()
	h.expectFailure(h.start(shimtest.Args("tcp", host, netip.MustParseAddrPort("172.17.0.2:80"), true), nil, udp), time.Second, "fd 4 is not a TCP socket")
}

// --- UDP ---

// Issue 4: "UDP: -p P:P/udp echoes 1,000 datagrams, also with the server stopped", in both eras
// (bind-yourself, and the fd 4 socket that "comes with PKTINFO set").
func TestUDPEchoesThousandDatagrams(t *testing.T) {
	for _, tc := range []struct {
		name        string
		server      bool
		useListenFD bool
		host        string
	}{
		{"bind-yourself with server", true, false, "127.0.0.1"},
		{"bind-yourself without server", false, false, "127.0.0.1"},
		{"fd 4 with server", true, true, "127.0.0.1"},
		{"fd 4 without server", false, true, "127.0.0.1"},
		{"fd 4 ipv6", true, true, "::1"},
		{"bind-yourself ipv6 to ipv4 container", true, false, "::1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			var srv *shimtest.Registrar
			if tc.server {
				srv = h.server(nil)
			}
			echo := udpEcho(t)
			ip := netip.MustParseAddr(tc.host)
			host := netip.AddrPortFrom(ip, freePort(t))
			var sock *os.File
			var err error
			if tc.useListenFD {
				if sock, err = shimtest.BindUDP(host); err != nil {
					t.Fatal(err)
				}
			}
			p := h.start(shimtest.Args("udp", host, echo, tc.useListenFD), nil, sock)
			st := h.expectReady(p)
			if sock != nil {
				sock.Close()
			}
			if st.After > time.Second {
				t.Errorf("UDP ready after %s; it must not wait for the server", st.After)
			}
			udpRoundTrips(t, host, 1000)
			if srv != nil {
				if !srv.WaitFor(2*time.Second, func(r *shimtest.Registrar) bool { return len(r.Live()) == 1 }) {
					t.Fatal("UDP port not registered")
				}
				if !srv.Live()[0].ProxiesItself {
					t.Error("UDP registered without proxies_itself")
				}
			}
			h.stop(p, os.Interrupt)
			if srv != nil { // the shim's last report, on its way out, counts every datagram
				bytes := uint64(0)
				for i := range 1000 {
					bytes += uint64(len(fmt.Sprint("datagram ", i)))
				}
				want := shimlink.Stats{InDatagrams: 1000, InBytes: bytes, OutDatagrams: 1000, OutBytes: bytes, FlowsTotal: 1}
				reports := srv.Stats()
				if len(reports) == 0 {
					t.Fatal("no report of the shim's counters")
				}
				last := *reports[len(reports)-1]
				last.Flows = 0 // the flow may or may not have ended yet: the server drops live flows at the end anyway
				if last != want {
					t.Errorf("%d reports, the last %+v; want %+v", len(reports), last, want)
				}
			}
		})
	}
}

// Issue 4: the server restarting never disturbs a port: UDP echoes before, while the server is
// away, and after it is back, and the shim re-registers.
func TestUDPUndisturbedByServerRestart(t *testing.T) {
	h := newHarness(t)
	srv := h.server(nil)
	echo := udpEcho(t)
	host := netip.AddrPortFrom(loopback, freePort(t))
	p := h.start(shimtest.Args("udp", host, echo, false), nil, nil)
	h.expectReady(p)
	udpRoundTrips(t, host, 100)
	srv.WaitFor(2*time.Second, func(r *shimtest.Registrar) bool { return len(r.Live()) == 1 })
	srv.Stop()
	udpRoundTrips(t, host, 100)
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	if !srv.WaitFor(5*time.Second, func(r *shimtest.Registrar) bool { return len(r.Live()) == 1 && len(r.Opens()) >= 2 }) {
		t.Fatal("not re-registered")
	}
	udpRoundTrips(t, host, 100)
	h.stop(p, os.Interrupt)
}

// Contract (daemon 27 and earlier): "A prompt 1\n... on EADDRINUSE lets a daemon given a
// host-port range retry another port."
func TestUDPPortInUseFailsPromptly(t *testing.T) {
	h := newHarness(t)
	h.server(nil)
	taken, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	host := netip.MustParseAddrPort(taken.LocalAddr().String())
	h.expectFailure(h.start(shimtest.Args("udp", host, netip.MustParseAddrPort("172.17.0.2:53"), false), nil, nil),
		time.Second, "failed to listen on "+host.String(), "address already in use")
}

// Contract (daemon 27 and earlier): the TCP shim binds the host port itself, as docker-proxy does,
// so a port in use fails at once with the reason, before anything is registered.
func TestTCPPortInUseFailsPromptly(t *testing.T) {
	h := newHarness(t)
	srv := h.server(nil)
	taken, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	host := netip.MustParseAddrPort(taken.Addr().String())
	h.expectFailure(h.start(shimtest.Args("tcp", host, netip.MustParseAddrPort("172.17.0.2:80"), false), nil, nil),
		time.Second, "failed to listen on "+host.String(), "address already in use")
	if n := len(srv.Opens()); n != 0 {
		t.Errorf("%d registrations of a port the shim could not bind", n)
	}
}

// --- SCTP ---

// Contract: "SCTP: docker-proxy supports it; Envoy does not." Without EDS_SCTP_PROXY the shim
// refuses with a message naming SCTP and what to do, in both eras.
func TestSCTPRefusedWithAnExplanation(t *testing.T) {
	for _, useListenFD := range []bool{false, true} {
		t.Run(fmt.Sprint("use-listen-fd=", useListenFD), func(t *testing.T) {
			h := newHarness(t)
			srv := h.server(nil)
			host := netip.AddrPortFrom(loopback, freePort(t))
			var fd4 *os.File
			if useListenFD { // 29.x passes SCTP sockets too; any socket will do to check it is left alone
				var err error
				if fd4, err = shimtest.ListenTCP(host); err != nil {
					t.Fatal(err)
				}
				defer fd4.Close()
			}
			h.expectFailure(h.start(shimtest.Args("sctp", host, netip.MustParseAddrPort("172.17.0.2:9"), useListenFD), nil, fd4),
				time.Second, "SCTP", "EDS_SCTP_PROXY")
			if len(srv.Opens()) != 0 {
				t.Error("SCTP port registered")
			}
		})
	}
}

// With EDS_SCTP_PROXY the shim becomes that proxy: same argv, environment, fd 3 and fd 4.
func TestSCTPDelegatedToStockProxy(t *testing.T) {
	h := newHarness(t)
	dir := t.TempDir()
	record := filepath.Join(dir, "record")
	script := filepath.Join(dir, "docker-proxy")
	// A stand-in for docker-proxy: records what it got, reports ready on fd 3, exits 0 on SIGINT.
	os.WriteFile(script, []byte(`#!/bin/sh
{ echo "args: $*"; echo "env: $EDS_SCTP_PROXY"; ls -l /proc/$$/fd/4 2>&1; } > `+record+`
trap 'exit 0' INT TERM
printf '0\n' >&3
exec 3>&-
while :; do sleep 0.05; done
`), 0o755)
	host := netip.AddrPortFrom(loopback, freePort(t))
	fd4, err := shimtest.ListenTCP(host)
	if err != nil {
		t.Fatal(err)
	}
	defer fd4.Close()
	args := append(shimtest.Args("sctp", host, netip.MustParseAddrPort("172.17.0.2:9"), true), "-future-flag")
	p := h.start(args, []string{"EDS_SCTP_PROXY=" + script}, fd4)
	h.expectReady(p)
	rec, _ := os.ReadFile(record)
	if !strings.Contains(string(rec), "args: "+strings.Join(args, " ")) || !strings.Contains(string(rec), "env: "+script) || !strings.Contains(string(rec), "socket:") {
		t.Errorf("the delegate got:\n%s", rec)
	}
	h.stop(p, os.Interrupt)
}

func TestSCTPDelegateMissing(t *testing.T) {
	h := newHarness(t)
	host := netip.AddrPortFrom(loopback, freePort(t))
	h.expectFailure(h.start(shimtest.Args("sctp", host, netip.MustParseAddrPort("172.17.0.2:9"), false), []string{"EDS_SCTP_PROXY=/nonexistent/docker-proxy"}, nil),
		time.Second, "EDS_SCTP_PROXY=/nonexistent/docker-proxy", "no such file")
}

// --- helpers: "containers" on loopback ---

func tcpEcho(t *testing.T) netip.AddrPort {
	t.Helper()
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	var served atomic.Int64
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			served.Add(1)
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	return netip.MustParseAddrPort(l.Addr().String())
}

func echoRoundTrip(c net.Conn, msg string) error {
	c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := fmt.Fprintln(c, msg); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if strings.TrimSpace(line) != msg {
		return fmt.Errorf("echo of %q: %q", msg, line)
	}
	return nil
}

func dialEcho(addr netip.AddrPort, msg string) error {
	c, err := net.DialTimeout("tcp", addr.String(), 3*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	return echoRoundTrip(c, msg)
}

func udpEcho(t *testing.T) netip.AddrPort {
	t.Helper()
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	go func() {
		buf := make([]byte, 65507)
		for {
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			c.WriteToUDPAddrPort(buf[:n], from)
		}
	}()
	return netip.MustParseAddrPort(c.LocalAddr().String())
}

func udpRoundTrips(t *testing.T, host netip.AddrPort, n int) {
	t.Helper()
	c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(host))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 100)
	for i := range n {
		msg := fmt.Sprint("datagram ", i)
		c.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := c.Write([]byte(msg)); err != nil {
			t.Fatalf("datagram %d: %v", i, err)
		}
		k, err := c.Read(buf)
		if err != nil || string(buf[:k]) != msg {
			t.Fatalf("datagram %d: %q, %v", i, buf[:k], err)
		}
	}
}

// Issue 4 (idle memory at docker-proxy's level): a shim that stays in Go (UDP) runs with one P,
// set through GOMAXPROCS by re-executing itself in the same process (dockerd keeps waiting on the
// PID it started, and gets its status on the fd 3 it passed); an operator's GOMAXPROCS wins, also
// in a TCP shim gone idle (package idle), which the shim then resumes with.
func TestOneProcessor(t *testing.T) {
	for _, tc := range []struct {
		name  string
		proto string
		env   []string
		want  string // GOMAXPROCS in the running shim's environment
	}{
		{"udp", "udp", nil, "1"},
		{"tcp, operator's setting", "tcp", []string{"GOMAXPROCS=2"}, "2"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			h.server(nil)
			echo := tcpEcho(t)
			if tc.proto == "udp" {
				echo = udpEcho(t)
			}
			p := h.start(shimtest.Args(tc.proto, netip.AddrPortFrom(loopback, freePort(t)), echo, false), tc.env, nil)
			h.expectReady(p) // from the PID dockerd started: the exec kept it and fd 3
			environ, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", p.Cmd.Process.Pid))
			if err != nil {
				t.Fatal(err)
			}
			var got string
			for _, kv := range strings.Split(string(environ), "\x00") {
				if v, ok := strings.CutPrefix(kv, "GOMAXPROCS="); ok {
					got = v
				}
			}
			if got != tc.want {
				t.Errorf("GOMAXPROCS = %q, want %q", got, tc.want)
			}
			h.stop(p, os.Interrupt)
		})
	}
}

// Issues 12 and 14: once Envoy serves its port, a TCP shim holds its registration and the port's
// socket in the idle program, a few KiB instead of the Go runtime's hundreds, under the same PID
// and command line. When Envoy goes away (restart, upgrade, kill -9), the next connection reaches
// the shim's socket, wakes it, and the shim serves the port in Go until Envoy is back; then it
// goes idle again. It still stops as the contract says (exit 0 within 1 s of SIGINT,
// deregistered). Both daemon generations: the shim's own socket (before 28) and fd 4.
func TestTCPShimGoesIdleOnceReady(t *testing.T) {
	if !idle.Supported() {
		t.Skipf("no idle program on %s", runtime.GOARCH)
	}
	for _, useListenFD := range []bool{false, true} {
		t.Run(fmt.Sprintf("use-listen-fd=%v", useListenFD), func(t *testing.T) {
			h := newHarness(t)
			srv := h.server(nil)
			echo := tcpEcho(t)
			host := netip.AddrPortFrom(loopback, freePort(t))
			args := shimtest.Args("tcp", host, echo, useListenFD)
			p, _ := h.startTCPReady(host, echo, useListenFD)
			pid := p.Cmd.Process.Pid
			// No Envoy on the port yet: the shim serves it, and with nothing to do it goes idle
			// all the same; the next connection wakes it and it serves that too.
			if err := dialEcho(host, "before Envoy"); err != nil {
				t.Fatal(err)
			}
			waitIdle(t, pid)
			if err := dialEcho(host, "waking the idle shim"); err != nil {
				t.Fatalf("a connection to the idle shim's socket: %v", err)
			}
			waitIdle(t, pid)
			cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
			if want := strings.Join(append([]string{shimBin}, args...), "\x00") + "\x00"; string(cmdline) != want {
				t.Errorf("idle shim's command line %q, want %q", cmdline, want)
			}
			if kib := pssKiB(t, pid); kib > 64 {
				t.Errorf("idle shim PSS %d KiB, want at most 64", kib)
			}

			// Envoy comes: every connection succeeds, and once one has reached the shim's socket
			// the shim steers the port to Envoy's sockets and goes idle again.
			envoy := startReusePortServer(t, host, 2, "envoy")
			waitSteeredToEnvoy(t, host, pid)

			// Envoy goes away: the shim takes every connection, none refused.
			envoy.close()
			for i := range 20 {
				if err := dialEcho(host, fmt.Sprint("Envoy away ", i)); err != nil {
					t.Fatalf("connection %d while Envoy is away: %v", i, err)
				}
			}
			// Envoy is back: steered to it, and idle again.
			startReusePortServer(t, host, 2, "envoy")
			waitSteeredToEnvoy(t, host, pid)
			if len(srv.Live()) != 1 || len(srv.Opens()) != 1 {
				t.Fatalf("%d live registrations after %d opens, want 1 and 1", len(srv.Live()), len(srv.Opens()))
			}
			h.stop(p, os.Interrupt)
			if !srv.WaitFor(time.Second, func(r *shimtest.Registrar) bool { return len(r.Live()) == 0 }) {
				t.Error("the idle shim stopped without ending its registration")
			}
		})
	}
}

// waitSteeredToEnvoy connects until the shim has steered the port to Envoy's sockets: 20
// connections in a row answered by Envoy, the shim idle all along. Every connection must succeed.
func waitSteeredToEnvoy(t *testing.T, host netip.AddrPort, pid int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for inARow := 0; inARow < 20; {
		if time.Now().After(deadline) {
			t.Fatalf("the port was not steered to Envoy within 10 s (%d answers in a row from Envoy, idle %v)", inARow, idle.Running(pid))
		}
		if who := answeredBy(t, host); who == "envoy" && idle.Running(pid) {
			inARow++
		} else {
			inARow = 0
			time.Sleep(10 * time.Millisecond)
		}
	}
}

func waitIdle(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !idle.Running(pid) {
		if time.Now().After(deadline) {
			exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
			t.Fatalf("the shim did not go idle: its executable is %q", exe)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func pssKiB(t *testing.T, pid int) int {
	t.Helper()
	rollup, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.SplitSeq(string(rollup), "\n") {
		if v, ok := strings.CutPrefix(line, "Pss:"); ok {
			kib, _ := strconv.Atoi(strings.Fields(v)[0])
			return kib
		}
	}
	t.Fatalf("no Pss in smaps_rollup:\n%s", rollup)
	return 0
}

// reusePortServer stands in for Envoy's workers: n sockets on addr with SO_REUSEPORT, each
// answering every connection with its name and a newline, then closing.
type reusePortServer struct{ ls []net.Listener }

func startReusePortServer(t *testing.T, addr netip.AddrPort, n int, name string) *reusePortServer {
	t.Helper()
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		c.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, 0xf /* SO_REUSEPORT */, 1) })
		return serr
	}}
	lc.SetMultipathTCP(false)
	s := &reusePortServer{}
	for range n {
		l, err := lc.Listen(context.Background(), "tcp4", addr.String())
		if err != nil {
			t.Fatal(err)
		}
		s.ls = append(s.ls, l)
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				fmt.Fprintln(c, name)
				c.Close()
			}
		}()
	}
	t.Cleanup(s.close)
	return s
}

func (s *reusePortServer) close() {
	for _, l := range s.ls {
		l.Close()
	}
}

// answeredBy connects to addr and says who answered: the reuse-port server's name, or the line
// the echo behind the shim sent back.
func answeredBy(t *testing.T, addr netip.AddrPort) string {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr.String(), 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	fmt.Fprintln(c, "echo")
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(line)
}

// --- The fast start (package idle, start_amd64.s) ---

// Issue 12: "every millisecond between shim started and ready is paid a thousand times". dockerd's
// usual TCP invocation registers and reports ready without starting the Go runtime, and the shim
// is idle at once: one thread, the shim's own executable (the shim in Go would have gone idle
// through the idle program's memfd), in the idle program. What it registers is what the shim in Go
// registers, with Serving and WantsServed; it still serves the port (a connection wakes it) and
// stops as the contract says. Each way the shim gets the port's socket, both address families.
func TestFastStart(t *testing.T) {
	if idle.LinkFlag == "" {
		t.Skipf("no fast start on %s", runtime.GOARCH)
	}
	for _, tc := range []struct {
		name        string
		ip          string
		useListenFD bool
	}{
		{"IPv4, bound by the shim (before dockerd 28)", "127.0.0.1", false},
		{"IPv6 ::1, bound by the shim", "::1", false},
		{"IPv4, fd 4", "127.0.0.1", true},
		{"IPv6 ::1, fd 4", "::1", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			srv := h.server(nil)
			echo := tcpEcho(t)
			host := netip.AddrPortFrom(netip.MustParseAddr(tc.ip), freePort(t))
			p, st := h.startTCPReady(host, echo, tc.useListenFD)
			pid := p.Cmd.Process.Pid
			waitIdle(t, pid) // the few instructions from "0\n" to the idle program's ppoll
			if exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid)); exe != shimBin {
				t.Fatalf("ready after %s and idle, but through the shim in Go: the executable is %q", st.After, exe)
			}
			t.Logf("ready after %s; idle; PSS %d KiB", st.After, pssKiB(t, pid))
			opens := srv.Opens()
			if len(opens) != 1 {
				t.Fatalf("%d opens, want 1", len(opens))
			}
			want := shimlink.Open{Mapping: mapping.Mapping{Key: mapping.Key{Proto: mapping.TCP, HostIP: host.Addr(), HostPort: host.Port()},
				ContainerIP: echo.Addr(), ContainerPort: echo.Port()}, PID: pid, Version: opens[0].Version, Serving: true, WantsServed: true}
			if *opens[0] != want || opens[0].Version == "" {
				t.Errorf("Open = %+v, want %+v with a version", *opens[0], want)
			}
			if err := dialEcho(host, "to the idle shim"); err != nil {
				t.Fatalf("a connection to the idle shim's port: %v", err)
			}
			waitIdle(t, pid)
			h.stop(p, os.Interrupt)
			if !srv.WaitFor(time.Second, func(r *shimtest.Registrar) bool { return len(r.Live()) == 0 }) {
				t.Error("registration still live after the shim exited")
			}
			expectStoppingLog(t, srv, "interrupt")
		})
	}
}

// A shim that went idle from the fast start has not steered its port to Envoy (Envoy did not have
// it yet). The server's Served wakes it: it steers the port to Envoy's sockets and goes idle
// again, so that Envoy (its metrics, logs and traces) gets every connection from the first one
// on, rather than the shim getting its share until one lands on it.
func TestServedSteersAFastStartedShim(t *testing.T) {
	if idle.LinkFlag == "" {
		t.Skipf("no fast start on %s", runtime.GOARCH)
	}
	for _, useListenFD := range []bool{false, true} {
		t.Run(fmt.Sprintf("use-listen-fd=%v", useListenFD), func(t *testing.T) {
			h := newHarness(t)
			srv := h.server(nil)
			echo := tcpEcho(t)
			host := netip.AddrPortFrom(loopback, freePort(t))
			p, _ := h.startTCPReady(host, echo, useListenFD)
			pid := p.Cmd.Process.Pid
			waitIdle(t, pid)
			startReusePortServer(t, host, 2, "envoy")
			if n := srv.TellServed(); n != 1 {
				t.Fatalf("Served sent on %d registrations, want 1", n)
			}
			// Woken, steered, idle again: now through the idle program's memfd.
			deadline := time.Now().Add(5 * time.Second)
			for {
				exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
				if idle.Running(pid) && strings.Contains(exe, "memfd:") {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("the shim did not wake, steer and go idle again after Served: idle %v, executable %q", idle.Running(pid), exe)
				}
				time.Sleep(10 * time.Millisecond)
			}
			expectSteeredOnce(t, srv, host)
			h.stop(p, os.Interrupt)
		})
	}
}

// The shim in Go (here because an EDS_SHIM_ setting besides the socket turns the fast start
// away) asks for Served too. With no Envoy on the port it goes idle unsteered after
// unsteeredIdleAfter; the server's Served then wakes it, and it steers the port to Envoy's
// sockets and goes idle again, with no connection having reached the shim: Envoy gets the port's
// connections from the first one on.
func TestServedSteersAGoShimThatWentIdle(t *testing.T) {
	if !idle.Supported() {
		t.Skipf("no idle program on %s", runtime.GOARCH)
	}
	h := newHarness(t)
	srv := h.server(nil)
	echo := tcpEcho(t)
	host := netip.AddrPortFrom(loopback, freePort(t))
	p := h.start(shimtest.Args("tcp", host, echo, false), []string{"EDS_SHIM_TIMEOUT=9s"}, nil)
	h.expectReady(p)
	pid := p.Cmd.Process.Pid
	if opens := srv.Opens(); len(opens) != 1 || !opens[0].WantsServed {
		t.Fatalf("Opens %+v, want one that asks for Served", opens)
	}
	waitIdle(t, pid)
	if exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid)); !strings.Contains(exe, "memfd:") {
		t.Fatalf("idle, but not through the shim in Go: the executable is %q", exe)
	}
	startReusePortServer(t, host, 2, "envoy")
	if n := srv.TellServed(); n != 1 {
		t.Fatalf("Served sent on %d registrations, want 1", n)
	}
	if !srv.WaitFor(5*time.Second, loggedHandover) {
		t.Fatalf("the shim did not steer the port after Served; logs: %v", srv.Logs())
	}
	waitIdle(t, pid)
	expectSteeredOnce(t, srv, host)
	h.stop(p, os.Interrupt)
}

// loggedHandover reports whether a shim logged that it handed its port over to Envoy.
func loggedHandover(r *shimtest.Registrar) bool {
	for _, l := range r.Logs() {
		if strings.Contains(l.Message, "port handed over to Envoy") {
			return true
		}
	}
	return false
}

// expectSteeredOnce checks that Envoy answers 30 connections in a row to host (the port was
// steered before them) and that the shim registered once and holds that registration.
func expectSteeredOnce(t *testing.T, srv *shimtest.Registrar, host netip.AddrPort) {
	t.Helper()
	for i := range 30 {
		if who := answeredBy(t, host); who != "envoy" {
			t.Fatalf("connection %d answered by %q, want Envoy: the port was not steered before it", i, who)
		}
	}
	if len(srv.Live()) != 1 || len(srv.Opens()) != 1 {
		t.Fatalf("%d live registrations after %d opens, want 1 and 1", len(srv.Live()), len(srv.Opens()))
	}
}
