// Package e2e runs envoy-docker-shim the way users do: as the userland proxy of a real dockerd
// (the private test daemon), with the real server and a real Envoy.
package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	pb "github.com/envoy-docker-shim/envoy-docker-shim/services/registration/registrationpb"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/server"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/udpstats"
	"github.com/envoy-docker-shim/envoy-docker-shim/shim/registration"
	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
	"github.com/envoy-docker-shim/envoy-docker-shim/testbed/stack"
)

const shimPkg = "github.com/envoy-docker-shim/envoy-docker-shim/shim/cmd/envoy-docker-shim"

// recorder wraps the shim to record its exit status for the test, forwarding dockerd's signals.
// /bin/sh starts it in the background with SIGINT ignored; the shim's signal.Notify re-enables it.
// A trapped signal cuts wait short with a status above 128 of its own, and by then the shell may
// already have reaped a shim that exited at once (so kill -0 cannot tell the two apart: 130 was
// recorded for a shim that exited 0): after a cut, wait again, which gives the shim's status, or
// 127 when the first wait had given it after all.
const recorder = `#!/bin/sh
"$EDS_TEST_SHIM" "$@" &
child=$!
trap 'cut=1; kill -INT $child 2>/dev/null' INT
trap 'cut=1; kill -TERM $child 2>/dev/null' TERM
rc=
while :; do
	cut=
	wait $child
	status=$?
	[ "$status" -eq 127 ] && [ -n "$rc" ] && break
	rc=$status
	[ -n "$cut" ] || break
done
echo "$rc $*" >> "$EDS_TEST_SHIM_STATUS"
exit $rc
`

type setup struct {
	daemon *testbed.Daemon
	stack  *stack.Stack
	shim   string
	status string
}

func start(t *testing.T, gen testbed.Generation) *setup { return startB(t, gen) }

func startB(t testing.TB, gen testbed.Generation) *setup { return startOpts(t, gen, stack.Options{}) }

// startOpts starts a daemon of generation gen running the shim, and the stack (server and Envoy)
// shaped by opts; the daemon's and the socket's options are the setup's own.
func startOpts(t testing.TB, gen testbed.Generation, opts stack.Options) *setup {
	testbed.RequireDocker(t)
	dir := t.TempDir()
	s := &setup{shim: testbed.BuildStatic(t, shimPkg, "envoy-docker-shim"), status: filepath.Join(dir, "exits")}
	wrapper := filepath.Join(dir, "envoy-docker-shim-recorder")
	if err := os.WriteFile(wrapper, []byte(recorder), 0o755); err != nil {
		t.Fatal(err)
	}
	socket := filepath.Join(dir, "shim.sock")
	s.daemon = testbed.StartDaemon(t, testbed.DaemonOptions{
		Generation:        gen,
		UserlandProxyPath: wrapper,
		Env:               []string{"EDS_SHIM_SOCKET=" + socket, "EDS_TEST_SHIM=" + s.shim, "EDS_TEST_SHIM_STATUS=" + s.status},
	})
	opts.DockerHost, opts.ShimSocket = s.daemon.Host, socket
	s.stack = stack.Start(t, opts)
	return s
}

// shims lists the running shim processes of this test that serve host port port (0: any): by
// their command line, which an idle shim keeps (its executable is then the idle program's memfd).
func (s *setup) shims(port int) []int {
	return procsServing(port, func(_ int, argv0 string) bool { return argv0 == s.shim })
}

// procsServing lists the processes that is accepts and whose command line has -host-port port
// (any port when port is 0).
func procsServing(port int, is func(pid int, argv0 string) bool) []int {
	var pids []int
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil || len(cmdline) == 0 {
			continue
		}
		argv0, _, _ := strings.Cut(string(cmdline), "\x00")
		if !is(pid, argv0) {
			continue
		}
		if port == 0 || strings.Contains(string(cmdline), "\x00-host-port\x00"+strconv.Itoa(port)+"\x00") {
			pids = append(pids, pid)
		}
	}
	return pids
}

// exits returns the recorded exit codes of the shims that served port.
func (s *setup) exits(t *testing.T, port int) []int {
	t.Helper()
	f, err := os.Open(s.status)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var codes []int
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		for i, field := range fields {
			if field == "-host-port" && i+1 < len(fields) && fields[i+1] == strconv.Itoa(port) {
				code, _ := strconv.Atoi(fields[0])
				codes = append(codes, code)
			}
		}
	}
	return codes
}

func (s *setup) listed(t *testing.T, port int) []*pb.Registration {
	t.Helper()
	list, err := s.stack.Client.List(context.Background(), &pb.ListRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var out []*pb.Registration
	for _, r := range list.GetRegistrations() {
		if int(r.GetMapping().GetHostPort()) == port {
			out = append(out, r)
		}
	}
	return out
}

func echoName(body string) string {
	const key = `"name":"`
	i := strings.Index(body, key)
	if i < 0 {
		return ""
	}
	rest := body[i+len(key):]
	return rest[:strings.IndexByte(rest, '"')]
}

// freeRange finds n consecutive free loopback ports.
func freeRange(t *testing.T, n int) int {
	t.Helper()
	for range 50 {
		base := testbed.FreePort(t)
		ok := true
		for i := 1; i < n && ok; i++ {
			l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", base+i))
			if err != nil {
				ok = false
				break
			}
			l.Close()
		}
		if ok {
			return base
		}
	}
	t.Fatalf("no %d consecutive free ports", n)
	return 0
}

// TestE2EShimUnderDockerd runs the shim under each daemon generation: 20.10, where the shim binds
// the published port, and 29, which binds it and passes it on fd 4.
func TestE2EShimUnderDockerd(t *testing.T) {
	for _, gen := range testbed.Generations(t) {
		t.Run(string(gen), func(t *testing.T) { testShimUnderDockerd(t, gen) })
	}
}

func testShimUnderDockerd(t *testing.T, gen testbed.Generation) {
	s := start(t, gen)
	d := s.daemon

	t.Run("1,000 requests right after docker run are answered and counted under the labels", func(t *testing.T) {
		port := testbed.FreePort(t)
		c := d.Run(t, testbed.RunOptions{
			Publish: []string{fmt.Sprintf("127.0.0.1:%d:80", port)},
			Labels:  map[string]string{"ServiceName": "web", "EnvironmentName": "test"},
		})
		// No retry: docker run returned, so the port must serve, from the first request on.
		const requests = 1000
		for i := range requests {
			status, body, err := testbed.HTTPGet(context.Background(), fmt.Sprintf("http://127.0.0.1:%d/%d", port, i))
			if err != nil || status != 200 || echoName(body) != c.Name {
				t.Fatalf("request %d of %d: %d %q %v", i+1, requests, status, body, err)
			}
		}
		// The server found the container while dockerd was starting it: labels, not its IP.
		for _, r := range s.listed(t, port) {
			if r.GetService() != "web-test" || r.GetMode() != pb.Mode_MODE_HTTP || r.GetContainerId() != c.ID {
				t.Fatalf("registration %v; want service web-test, http mode, container %s", r, c.ID)
			}
		}
		testbed.WaitFor(t, 5*time.Second, "stats named web-test", func() error {
			if v, _ := s.stack.Envoy.Stat(t, "http.web-test.downstream_rq_total"); v < requests {
				return fmt.Errorf("http.web-test.downstream_rq_total = %d, want %d", v, requests)
			}
			return nil
		})

		d.Stop(t, c)
		testbed.WaitFor(t, 5*time.Second, "shim gone, port closed, registration gone", func() error {
			if pids := s.shims(port); len(pids) != 0 {
				return fmt.Errorf("shims still running: %v", pids)
			}
			if _, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), time.Second); !errors.Is(err, syscall.ECONNREFUSED) {
				return fmt.Errorf("port not closed: %v", err)
			}
			if l := s.listed(t, port); len(l) != 0 {
				return fmt.Errorf("server still lists %v", l)
			}
			return nil
		})
		codes := s.exits(t, port)
		if len(codes) == 0 {
			t.Fatal("no shim exit recorded")
		}
		for _, code := range codes {
			if code != 0 {
				t.Fatalf("shim exit codes %v, want all 0", codes)
			}
		}
	})

	t.Run("ProxyMode=tcp is honoured", func(t *testing.T) {
		port := testbed.FreePort(t)
		d.Run(t, testbed.RunOptions{
			Publish: []string{fmt.Sprintf("127.0.0.1:%d:7", port)},
			Labels:  map[string]string{"ServiceName": "db", "EnvironmentName": "test", "ProxyMode": "tcp"},
		})
		for _, r := range s.listed(t, port) {
			if r.GetService() != "db-test" || r.GetMode() != pb.Mode_MODE_TCP {
				t.Fatalf("registration %v; want service db-test in tcp mode", r)
			}
		}
		payload := []byte(strings.Repeat("tcp-mode ", 500))
		got, err := testbed.TCPEcho(context.Background(), fmt.Sprintf("127.0.0.1:%d", port), payload)
		if err != nil || string(got) != string(payload) {
			t.Fatalf("echo: %v", err)
		}
		testbed.WaitFor(t, 5*time.Second, "tcp stats named db-test", func() error {
			if v, _ := s.stack.Envoy.Stat(t, "tcp.db-test.downstream_cx_total"); v < 1 {
				return fmt.Errorf("tcp.db-test.downstream_cx_total = %d", v)
			}
			return nil
		})
	})

	t.Run("tight connection loop while the port is published: none refused or reset once it is open", func(t *testing.T) {
		testConnectionLoop(t, s)
	})

	t.Run("port range", func(t *testing.T) {
		base := freeRange(t, 3)
		c := d.Run(t, testbed.RunOptions{
			Publish: []string{fmt.Sprintf("127.0.0.1:%d-%d:8000-8002", base, base+2)},
			Env:     map[string]string{"ECHO_HTTP_PORTS": "8000-8002"},
		})
		for p := base; p <= base+2; p++ {
			status, body, err := testbed.HTTPGet(context.Background(), fmt.Sprintf("http://127.0.0.1:%d/", p))
			if err != nil || status != 200 || echoName(body) != c.Name {
				t.Fatalf("port %d: %d %q %v", p, status, body, err)
			}
		}
	})

	t.Run("0.0.0.0 and :: publications", func(t *testing.T) {
		port := testbed.FreePort(t)
		c := d.Run(t, testbed.RunOptions{Publish: []string{fmt.Sprintf("%d:80", port)}})
		hosts := map[string]bool{}
		for _, r := range s.listed(t, port) {
			hosts[r.GetMapping().GetHostIp()] = true
		}
		if !hosts["0.0.0.0"] {
			t.Fatalf("no 0.0.0.0 registration for -p %d:80: %v", port, hosts)
		}
		targets := []string{"127.0.0.1"}
		if hosts["::"] {
			targets = append(targets, "[::1]")
		} else {
			t.Logf("dockerd did not publish on :: (IPv6 off for this daemon); tested 0.0.0.0 only")
		}
		for _, h := range targets {
			status, body, err := testbed.HTTPGet(context.Background(), fmt.Sprintf("http://%s:%d/", h, port))
			if err != nil || status != 200 || echoName(body) != c.Name {
				t.Fatalf("via %s: %d %q %v", h, status, body, err)
			}
		}
	})

	t.Run("port in use fails docker run like docker-proxy", func(t *testing.T) {
		port := testbed.FreePort(t)
		blocker, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err != nil {
			t.Fatal(err)
		}
		defer blocker.Close()
		_, err = d.RunErr(context.Background(), testbed.RunOptions{Publish: []string{fmt.Sprintf("127.0.0.1:%d:80", port)}})
		if err == nil || !strings.Contains(err.Error(), "address already in use") {
			t.Fatalf("docker run: %v; want an error containing \"address already in use\"", err)
		}
		testbed.WaitFor(t, 5*time.Second, "no shim left for the port", func() error {
			if pids := s.shims(port); len(pids) != 0 {
				return fmt.Errorf("shims still running: %v", pids)
			}
			return nil
		})
	})

	t.Run("kill -9 of a shim drops its mapping within 2s", func(t *testing.T) {
		port := testbed.FreePort(t)
		d.Run(t, testbed.RunOptions{Publish: []string{fmt.Sprintf("127.0.0.1:%d:80", port)}})
		pids := s.shims(port)
		if len(pids) != 1 || len(s.listed(t, port)) != 1 {
			t.Fatalf("shims %v, listed %v", pids, s.listed(t, port))
		}
		killed := time.Now()
		if err := syscall.Kill(pids[0], syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		for len(s.listed(t, port)) != 0 {
			if time.Since(killed) > 2*time.Second {
				t.Fatalf("mapping still listed %v after kill -9", time.Since(killed))
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Logf("mapping dropped %v after kill -9", time.Since(killed).Round(time.Millisecond))
	})

	udpEcho := func(t *testing.T) {
		port := testbed.FreePort(t)
		d.Run(t, testbed.RunOptions{Publish: []string{fmt.Sprintf("127.0.0.1:%d:7/udp", port)}})
		addr := fmt.Sprintf("127.0.0.1:%d", port)
		for i := range 1000 {
			msg := []byte(fmt.Sprintf("datagram %d", i))
			got, err := testbed.UDPEcho(context.Background(), addr, msg)
			if err != nil || string(got) != string(msg) {
				t.Fatalf("datagram %d: %q %v", i, got, err)
			}
		}
	}
	t.Run("udp echoes 1000 datagrams", udpEcho)
	t.Run("udp traffic is counted on the server's /metrics and /ports under the service's name", func(t *testing.T) {
		testUDPCounted(t, s)
	})

	s.stack.StopServer(t)
	t.Run("server stopped: docker run -p fails within 10s naming the socket", func(t *testing.T) {
		port := testbed.FreePort(t)
		started := time.Now()
		_, err := d.RunErr(context.Background(), testbed.RunOptions{Publish: []string{fmt.Sprintf("127.0.0.1:%d:80", port)}})
		took := time.Since(started)
		if err == nil || !strings.Contains(err.Error(), s.stack.Config.ShimSocket) {
			t.Fatalf("docker run: %v; want an error naming %s", err, s.stack.Config.ShimSocket)
		}
		if took > 10*time.Second {
			t.Fatalf("docker run took %v to fail", took)
		}
		t.Logf("docker run failed after %v: %v", took.Round(time.Millisecond), err)
		if pids := s.shims(port); len(pids) != 0 {
			t.Fatalf("shims left running: %v", pids)
		}
	})
	t.Run("udp echoes 1000 datagrams with the server stopped", udpEcho)
}

// testUDPCounted echoes 1,000 datagrams through a UDP port the shim proxies itself: the shim's
// periodic report makes them 1,000 in and 1,000 out on the server's /metrics and /ports, under
// the service's name and the published address. 500 more just before docker stop reach the
// server in the shim's last report, so the port's totals keep them after it is gone.
func testUDPCounted(t *testing.T, s *setup) {
	port := testbed.FreePort(t)
	c := s.daemon.Run(t, testbed.RunOptions{
		Publish: []string{fmt.Sprintf("127.0.0.1:%d:7/udp", port)},
		Labels:  map[string]string{"ServiceName": "udpcount", "EnvironmentName": "test"},
	})
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	conn, err := testbed.Dial(context.Background(), "udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	bytes := 0
	echo := func(from, to int) {
		buf := make([]byte, 2048)
		for i := from; i < to; i++ {
			msg := fmt.Sprintf("datagram %d", i)
			conn.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := conn.Write([]byte(msg)); err != nil {
				t.Fatal(err)
			}
			n, err := conn.Read(buf)
			if err != nil || string(buf[:n]) != msg {
				t.Fatalf("datagram %d: %q %v", i, buf[:n], err)
			}
			bytes += n
		}
	}
	series := func(datagrams, bytes int) []string {
		var out []string
		for _, dir := range []string{"in", "out"} {
			labels := fmt.Sprintf(`{address="%s",direction="%s",service="udpcount-test"}`, addr, dir)
			out = append(out, fmt.Sprintf("eds_udp_datagrams_total%s %d", labels, datagrams), fmt.Sprintf("eds_udp_bytes_total%s %d", labels, bytes))
		}
		return out
	}
	metrics := func() string {
		status, body, err := testbed.HTTPGet(context.Background(), "http://"+s.stack.Config.HTTPAddr+"/metrics")
		if err != nil || status != 200 {
			t.Fatalf("/metrics: %d %v", status, err)
		}
		return body
	}
	missing := func(body string, want []string) error {
		for _, w := range want {
			if !strings.Contains(body, w+"\n") {
				return fmt.Errorf("/metrics lacks %q", w)
			}
		}
		return nil
	}

	echo(0, 1000)
	start := time.Now()
	testbed.WaitFor(t, 3*registration.DefaultStatsEvery, "1,000 datagrams each way on /metrics", func() error {
		return missing(metrics(), series(1000, bytes))
	})
	t.Logf("counted on /metrics %v after the last datagram", time.Since(start).Round(time.Millisecond))
	if err := missing(metrics(), []string{fmt.Sprintf(`eds_udp_flows{address="%s",service="udpcount-test"} 1`, addr),
		fmt.Sprintf(`eds_udp_flows_total{address="%s",service="udpcount-test"} 1`, addr)}); err != nil {
		t.Error(err)
	}
	status, body, err := testbed.HTTPGet(context.Background(), "http://"+s.stack.Config.HTTPAddr+"/ports")
	var ports struct{ Ports []server.Port }
	if err != nil || status != 200 || json.Unmarshal([]byte(body), &ports) != nil {
		t.Fatalf("/ports: %d %v %.300s", status, err, body)
	}
	want := server.Port{Proto: "udp", Published: addr, Container: netip.AddrPortFrom(c.IP, 7).String(), ContainerID: c.ID,
		ContainerName: c.Name, Image: testbed.EchoImageTag, Service: "udpcount-test", Mode: "shim",
		UDP: &udpstats.Counters{InDatagrams: 1000, InBytes: uint64(bytes), OutDatagrams: 1000, OutBytes: uint64(bytes), Flows: 1, FlowsTotal: 1}}
	found := false
	for _, p := range ports.Ports {
		if p.Published == addr {
			found = true
			if p.UDP != nil {
				if age := time.Since(time.UnixMilli(p.UDP.UpdatedUnixMs)); age < 0 || age > 3*registration.DefaultStatsEvery {
					t.Errorf("udp counters updated %v ago", age)
				}
				p.UDP.UpdatedUnixMs = 0
			}
			if !reflect.DeepEqual(p, want) {
				t.Errorf("/ports lists %+v %+v\nwant %+v %+v", p, p.UDP, want, want.UDP)
			}
		}
	}
	if !found {
		t.Errorf("/ports does not list %s: %s", addr, body)
	}

	echo(1000, 1500)
	s.daemon.Stop(t, c)
	testbed.WaitFor(t, 5*time.Second, "the port deregistered", func() error {
		if l := s.listed(t, port); len(l) != 0 {
			return fmt.Errorf("still listed: %v", l)
		}
		return nil
	})
	if err := missing(metrics(), series(1500, bytes)); err != nil {
		t.Errorf("after docker stop: %v", err)
	}
}
