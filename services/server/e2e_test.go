package server_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/services/envoyconfig"
	pb "github.com/envoy-docker-shim/envoy-docker-shim/services/registration/registrationpb"
	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
	"github.com/envoy-docker-shim/envoy-docker-shim/testbed/stack"
)

// TestE2EServer drives the real server and a real Envoy with a gRPC client in the shim's place,
// against containers of a private dockerd of each generation (labels are read from its API).
func TestE2EServer(t *testing.T) {
	testbed.RequireDocker(t)
	for _, gen := range testbed.Generations(t) {
		t.Run(string(gen), func(t *testing.T) { testE2EServer(t, gen) })
	}
}

func testE2EServer(t *testing.T, gen testbed.Generation) {
	daemon := testbed.StartDaemon(t, testbed.DaemonOptions{Generation: gen})
	web := daemon.Run(t, testbed.RunOptions{
		Labels: map[string]string{"ServiceName": "web", "EnvironmentName": "test"},
		Env:    map[string]string{"ECHO_NAME": "web-echo"},
	})
	db := daemon.Run(t, testbed.RunOptions{
		Labels: map[string]string{"ServiceName": "pg", "EnvironmentName": "test", "ProxyMode": "tcp"},
		Env:    map[string]string{"ECHO_NAME": "pg-echo"},
	})

	st := stack.Start(t, stack.Options{DockerHost: daemon.Host, AccessLog: true})
	t.Run("http mode serves the very next request and counts it under the labels", func(t *testing.T) {
		testHTTPMode(t, st, web)
	})
	t.Run("tcp mode echoes and counts bytes", func(t *testing.T) { testTCPMode(t, st, db) })
	t.Run("closing the registration closes the port within 1s", func(t *testing.T) { testClose(t, st, web) })
	t.Run("a clean deregistration ends once Envoy has let the port go", func(t *testing.T) { testCleanDeregistration(t, st, web) })
	t.Run("port in use is reported and leaves nothing behind", func(t *testing.T) { testPortInUse(t, st, web) })
	t.Run("0.0.0.0 and :: on one port coexist", func(t *testing.T) { testDualStack(t, st, web) })
	t.Run("long-lived connection survives 100 other ports coming and going", func(t *testing.T) {
		testLongLived(t, st, db, web)
	})
	t.Run("a connection the app refuses is retried while it starts, within the window", func(t *testing.T) {
		testConnectRetries(t, st, daemon, web, db)
	})
	t.Run("tcp mode: bytes sent while the app starts reach it, beyond Envoy's early-data buffer", func(t *testing.T) {
		testEarlyData(t, st, daemon, db)
	})
}

func ready(t testing.TB, resp *pb.RegisterResponse) *pb.Registration {
	t.Helper()
	r := resp.GetReady().GetRegistration()
	if r == nil {
		t.Fatalf("registration not ready: %v", resp)
	}
	return r
}

func testHTTPMode(t *testing.T, st *stack.Stack, web *testbed.Container) {
	port := testbed.FreePort(t)
	r := ready(t, first(st.Register(t, stack.TCP(port, web.IP.String(), 80))))
	// The very next request, with no retry: ready must mean served.
	status, body, err := testbed.HTTPGet(context.Background(), fmt.Sprintf("http://127.0.0.1:%d/hello", port))
	if err != nil || status != http.StatusOK || !strings.Contains(body, `"web-echo"`) {
		t.Fatalf("first request: %d %q %v", status, body, err)
	}
	if r.GetService() != "web-test" || r.GetMode() != pb.Mode_MODE_HTTP || r.GetContainerId() != web.ID {
		t.Fatalf("registration %v", r)
	}
	for _, stat := range []string{"http.web-test.downstream_rq_total", "cluster.web-test.upstream_rq_total"} {
		testbed.WaitFor(t, 5*time.Second, stat, func() error {
			if v, ok := st.Envoy.Stat(t, stat); !ok || v < 1 {
				return fmt.Errorf("%s = %d (present %v)", stat, v, ok)
			}
			return nil
		})
	}
}

func testTCPMode(t *testing.T, st *stack.Stack, db *testbed.Container) {
	port := testbed.FreePort(t)
	r := ready(t, first(st.Register(t, stack.TCP(port, db.IP.String(), 7))))
	if r.GetService() != "pg-test" || r.GetMode() != pb.Mode_MODE_TCP {
		t.Fatalf("registration %v", r)
	}
	payload := []byte(strings.Repeat("0123456789", 100))
	got, err := testbed.TCPEcho(context.Background(), fmt.Sprintf("127.0.0.1:%d", port), payload)
	if err != nil || string(got) != string(payload) {
		t.Fatalf("echo: %q, %v", got, err)
	}
	testbed.WaitFor(t, 5*time.Second, "tcp stats for pg-test", func() error {
		cx, _ := st.Envoy.Stat(t, "tcp.pg-test.downstream_cx_total")
		rx, _ := st.Envoy.Stat(t, "tcp.pg-test.downstream_cx_rx_bytes_total")
		tx, _ := st.Envoy.Stat(t, "tcp.pg-test.downstream_cx_tx_bytes_total")
		if cx < 1 || rx < int64(len(payload)) || tx < int64(len(payload)) {
			return fmt.Errorf("cx=%d rx=%d tx=%d", cx, rx, tx)
		}
		return nil
	})
}

func testClose(t *testing.T, st *stack.Stack, web *testbed.Container) {
	port := testbed.FreePort(t)
	resp, deregister := st.Register(t, stack.TCP(port, web.IP.String(), 80))
	ready(t, resp)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	if status, _, err := testbed.HTTPGet(context.Background(), "http://"+addr+"/"); err != nil || status != 200 {
		t.Fatalf("before closing: %d %v", status, err)
	}
	closed := time.Now()
	deregister()
	for {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err != nil && errors.Is(err, syscall.ECONNREFUSED) {
			break
		}
		if c != nil {
			c.Close()
		}
		if time.Since(closed) > time.Second {
			t.Fatalf("port still accepts connections %v after the registration closed", time.Since(closed))
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("port refused %v after the registration closed", time.Since(closed).Round(time.Millisecond))
}

// testCleanDeregistration: a stopping shim closes its side and waits for the server to end the
// stream; by then Envoy has acknowledged the listener's removal (its workers close the socket
// moments later), so that dockerd 28+, which binds the port itself, can soon bind it again.
func testCleanDeregistration(t *testing.T, st *stack.Stack, web *testbed.Container) {
	port := testbed.FreePort(t)
	stream, err := st.Client.Register(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&pb.RegisterRequest{Request: &pb.RegisterRequest_Open{Open: &pb.Open{Mapping: stack.TCP(port, web.IP.String(), 80)}}}); err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	ready(t, resp)
	if err := stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("stream end: %v", err)
	}
	name := fmt.Sprintf("tcp_127.0.0.1_%d", port)
	if l := string(st.Envoy.Admin(t, "/listeners")); strings.Contains(l, name) {
		t.Fatalf("listener %s still active in Envoy when the server ended the stream", name)
	}
}

func testPortInUse(t *testing.T, st *stack.Stack, web *testbed.Container) {
	port := testbed.FreePort(t)
	blocker, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		t.Fatal(err)
	}
	resp, _ := st.Register(t, stack.TCP(port, web.IP.String(), 80))
	reason := resp.GetFailed().GetReason()
	if !strings.Contains(reason, "address already in use") {
		blocker.Close()
		t.Fatalf("want a failure naming \"address already in use\", got %v", resp)
	}
	name := fmt.Sprintf("tcp_127.0.0.1_%d", port)
	testbed.WaitFor(t, 5*time.Second, "no half-configured listener or cluster", func() error {
		if l := string(st.Envoy.Admin(t, "/listeners")); strings.Contains(l, name) {
			return fmt.Errorf("listener %s still in Envoy: %s", name, l)
		}
		if c := string(st.Envoy.Admin(t, "/clusters")); strings.Contains(c, name+"::") {
			return fmt.Errorf("cluster %s still in Envoy", name)
		}
		list, err := st.Client.List(context.Background(), &pb.ListRequest{})
		if err != nil {
			return err
		}
		for _, r := range list.GetRegistrations() {
			if r.GetListener() == name {
				return fmt.Errorf("server still lists %s", name)
			}
		}
		return nil
	})
	blocker.Close()
	// The next valid registration works, on that very port too now that it is free.
	ready(t, first(st.Register(t, stack.TCP(port, web.IP.String(), 80))))
	if status, _, err := testbed.HTTPGet(context.Background(), fmt.Sprintf("http://127.0.0.1:%d/", port)); err != nil || status != 200 {
		t.Fatalf("after freeing the port: %d %v", status, err)
	}
}

// testDualStack: dockerd publishes -p P:80 twice, on 0.0.0.0 and on :: (with an IPv4 container
// address); the IPv6 listener is v6-only, so both bind and each family reaches the container.
func testDualStack(t *testing.T, st *stack.Stack, web *testbed.Container) {
	port := testbed.FreePort(t)
	v4 := stack.TCP(port, web.IP.String(), 80)
	v4.HostIp = "0.0.0.0"
	v6 := stack.TCP(port, web.IP.String(), 80)
	v6.HostIp = "::"
	if r := ready(t, first(st.Register(t, v4))); r.GetListener() != fmt.Sprintf("tcp_0.0.0.0_%d", port) {
		t.Fatalf("listener %q", r.GetListener())
	}
	if r := ready(t, first(st.Register(t, v6))); r.GetListener() != fmt.Sprintf("tcp_[::]_%d", port) {
		t.Fatalf("listener %q", r.GetListener())
	}
	for _, host := range []string{"127.0.0.1", "[::1]"} {
		status, body, err := testbed.HTTPGet(context.Background(), fmt.Sprintf("http://%s:%d/", host, port))
		if err != nil || status != 200 || !strings.Contains(body, `"web-echo"`) {
			t.Fatalf("via %s: %d %q %v", host, status, body, err)
		}
	}
}

func testLongLived(t *testing.T, st *stack.Stack, db, web *testbed.Container) {
	portA := testbed.FreePort(t)
	ready(t, first(st.Register(t, stack.TCP(portA, db.IP.String(), 7))))
	conn, err := testbed.Dial(context.Background(), "tcp", fmt.Sprintf("127.0.0.1:%d", portA))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	roundTrip := func(i int) error {
		msg := fmt.Sprintf("ping %d\n", i)
		_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := conn.Write([]byte(msg)); err != nil {
			return err
		}
		buf := make([]byte, len(msg))
		if _, err := io.ReadFull(conn, buf); err != nil {
			return err
		}
		if string(buf) != msg {
			return fmt.Errorf("echo %q, want %q", buf, msg)
		}
		return nil
	}
	if err := roundTrip(0); err != nil {
		t.Fatal(err)
	}

	// Keep the connection busy while 100 other ports are added and removed.
	stop := make(chan struct{})
	var trips atomic.Int64
	errc := make(chan error, 1)
	go func() {
		for i := 1; ; i++ {
			select {
			case <-stop:
				errc <- nil
				return
			case <-time.After(10 * time.Millisecond):
			}
			if err := roundTrip(i); err != nil {
				errc <- fmt.Errorf("round trip %d: %w", i, err)
				return
			}
			trips.Add(1)
		}
	}()
	var deregister []func()
	for range 100 {
		resp, end := st.Register(t, stack.TCP(testbed.FreePort(t), web.IP.String(), 80))
		ready(t, resp)
		deregister = append(deregister, end)
	}
	for _, end := range deregister {
		end()
	}
	testbed.WaitFor(t, 10*time.Second, "the 100 ports removed", func() error {
		if n := st.Server.Registry().Len(); n != 1 {
			return fmt.Errorf("%d registrations left", n)
		}
		return nil
	})
	close(stop)
	if err := <-errc; err != nil {
		t.Fatalf("long-lived connection broke during the churn: %v", err)
	}
	if err := roundTrip(-1); err != nil {
		t.Fatalf("long-lived connection broken after the churn: %v", err)
	}
	t.Logf("%d round trips on the long-lived connection during the churn", trips.Load())
}

func first(resp *pb.RegisterResponse, _ func()) *pb.RegisterResponse { return resp }

// TestE2EThousandRegistrations: 1,000 registrations in a row all become ready and all are served.
func TestE2EThousandRegistrations(t *testing.T) {
	st := stack.Start(t, stack.Options{})
	upstream := stack.LoopbackHTTP(t)
	ports := make([]int, 1000)
	for i := range ports {
		ports[i] = testbed.FreePort(t)
		ready(t, first(st.Register(t, stack.TCP(ports[i], "127.0.0.1", upstream))))
	}
	if v, _ := st.Envoy.Stat(t, "listener_manager.total_listeners_active"); v != 1000 {
		t.Fatalf("Envoy has %d active listeners, want 1000", v)
	}
	for _, i := range []int{0, 1, 499, 998, 999} {
		if status, _, err := testbed.HTTPGet(context.Background(), fmt.Sprintf("http://127.0.0.1:%d/", ports[i])); err != nil || status != 200 {
			t.Fatalf("port #%d: %d %v", i, status, err)
		}
	}
}

// BenchmarkRegisterToReady reports register-to-ready latency (p50, p99) with 10, 100 and 1,000
// ports live: at each level, 200 extra registrations each become ready and are then closed, so the
// live count stays at the level. Targets: p99 <= 100 ms at 1,000; p50 at 1,000 <= 2x p50 at 10.
func BenchmarkRegisterToReady(b *testing.B) {
	st := stack.Start(b, stack.Options{})
	upstream := stack.LoopbackHTTP(b)
	// One measured pass: the levels build on each other, so the body must not repeat with b.N.
	live := 0
	var p50At10 time.Duration
	{
		for _, level := range []int{10, 100, 1000} {
			for ; live < level; live++ {
				ready(b, first(st.Register(b, stack.TCP(testbed.FreePort(b), "127.0.0.1", upstream))))
			}
			var samples []time.Duration
			ports := make([]int, 200)
			for i := range ports {
				ports[i] = testbed.FreePort(b)
			}
			for _, port := range ports {
				start := time.Now()
				resp, end := st.Register(b, stack.TCP(port, "127.0.0.1", upstream))
				samples = append(samples, time.Since(start))
				ready(b, resp)
				end()
			}
			slices.Sort(samples)
			p50, p99 := samples[len(samples)/2], samples[len(samples)*99/100]
			if level == 10 {
				p50At10 = p50
			}
			b.ReportMetric(float64(p50.Microseconds())/1000, "p50-ms-at-"+strconv.Itoa(level))
			b.ReportMetric(float64(p99.Microseconds())/1000, "p99-ms-at-"+strconv.Itoa(level))
			b.Logf("%4d live ports: p50 %v p99 %v (p50 ratio to 10 ports: %.2f)", level, p50, p99, float64(p50)/float64(p50At10))
		}
	}
}

// TestE2EServerRestartLosesNothing: Envoy keeps serving while the server is down and while the
// restarted server waits for its registry to be rebuilt; a mapping nobody restores is removed
// only once the server answers Envoy again. Both orders of the two reconnections are forced here;
// the narrow one CI met (the registration lands between Envoy's stream opening and Envoy saying
// what it holds) is reproduced exactly by the tracker's TestTrackerReconnectAfterClaim.
func TestE2EServerRestartLosesNothing(t *testing.T) {
	for _, tc := range []struct {
		name       string
		envoyFirst bool
	}{{"shim re-registers first", false}, {"envoy reconnects first", true}} {
		t.Run(tc.name, func(t *testing.T) { serverRestartLosesNothing(t, tc.envoyFirst) })
	}
}

func serverRestartLosesNothing(t *testing.T, envoyFirst bool) {
	// A grace period far longer than the test: only resync may open it.
	st := stack.Start(t, stack.Options{RestartGrace: 5 * time.Minute})
	upstream := stack.LoopbackHTTP(t)
	kept, gone := testbed.FreePort(t), testbed.FreePort(t)
	respKept, endKept := st.Register(t, stack.TCP(kept, "127.0.0.1", upstream))
	respGone, endGone := st.Register(t, stack.TCP(gone, "127.0.0.1", upstream))
	ready(t, respKept)
	ready(t, respGone)

	// A bounded load loop against both ports for the whole restart.
	stop := make(chan struct{})
	var ok, failed atomic.Int64
	loopDone := make(chan struct{})
	go func() {
		defer close(loopDone)
		deadline := time.Now().Add(60 * time.Second)
		for time.Now().Before(deadline) {
			select {
			case <-stop:
				return
			default:
			}
			for _, p := range []int{kept, gone} {
				status, _, err := testbed.HTTPGet(context.Background(), fmt.Sprintf("http://127.0.0.1:%d/", p))
				if err != nil || status != 200 {
					failed.Add(1)
					t.Logf("request to %d failed: %d %v", p, status, err)
				} else {
					ok.Add(1)
				}
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()

	time.Sleep(200 * time.Millisecond)
	st.StopServer(t)
	endKept()
	endGone() // its shim is gone: nobody will re-register or restore it
	time.Sleep(500 * time.Millisecond)
	restarted := time.Now()
	st.StartServer(t)
	if envoyFirst {
		testbed.WaitFor(t, 10*time.Second, "envoy's stream to the restarted server", func() error {
			return metricIs("http://"+st.Config.HTTPAddr+"/metrics", "eds_xds_streams", "1")
		})
	}

	// The surviving shim reconnects; its registration waits until the registry is complete.
	registered := make(chan *pb.RegisterResponse, 1)
	stream, err := st.Client.Register(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = stream.CloseSend() }()
	if err := stream.Send(&pb.RegisterRequest{Request: &pb.RegisterRequest_Open{Open: &pb.Open{Mapping: stack.TCP(kept, "127.0.0.1", upstream)}}}); err != nil {
		t.Fatal(err)
	}
	go func() {
		resp, err := stream.Recv()
		if err != nil {
			resp = &pb.RegisterResponse{Response: &pb.RegisterResponse_Failed{Failed: &pb.Failed{Reason: err.Error()}}}
		}
		registered <- resp
	}()
	time.Sleep(300 * time.Millisecond)
	if got := st.Server.Registry().Len(); got != 1 {
		t.Fatalf("registry holds %d after the shim re-registered, want 1", got)
	}
	// Envoy served both all along: the restarted server has not answered it yet.
	close(stop)
	<-loopDone
	if failed.Load() != 0 || ok.Load() == 0 {
		t.Fatalf("while the server was down and warming up: %d requests ok, %d failed", ok.Load(), failed.Load())
	}
	t.Logf("%d requests served while the server was down and warming up", ok.Load())
	resp := st.Resync(t, []*pb.Open{{Mapping: stack.TCP(kept, "127.0.0.1", upstream)}})
	if len(resp.GetResults()) != 1 || resp.GetResults()[0].GetOutcome() != pb.Restored_OUTCOME_ALREADY_REGISTERED {
		t.Fatalf("restore: %v", resp)
	}
	select {
	case r := <-registered:
		ready(t, r)
	case <-time.After(5 * time.Second):
		t.Fatal("re-registration not ready after resync")
	}
	t.Logf("registry rebuilt %v after the restart", time.Since(restarted).Round(time.Millisecond))
	goneListener := fmt.Sprintf("tcp_127.0.0.1_%d", gone)
	testbed.WaitFor(t, 5*time.Second, "the unrestored mapping removed from Envoy", func() error {
		if strings.Contains(string(st.Envoy.Admin(t, "/listeners")), goneListener) {
			return fmt.Errorf("%s still in Envoy", goneListener)
		}
		return nil
	})
	if status, _, err := testbed.HTTPGet(context.Background(), fmt.Sprintf("http://127.0.0.1:%d/", kept)); err != nil || status != 200 {
		t.Fatalf("kept port after the restart: %d %v", status, err)
	}
}

// metricIs checks one unlabelled series of a Prometheus text page.
func metricIs(url, name, want string) error {
	status, body, err := testbed.HTTPGet(context.Background(), url)
	if err != nil || status != 200 {
		return fmt.Errorf("%s: %d %v", url, status, err)
	}
	for _, line := range strings.Split(body, "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			if v != want {
				return fmt.Errorf("%s = %s, want %s", name, v, want)
			}
			return nil
		}
	}
	return fmt.Errorf("%s not on %s", name, url)
}

// testConnectRetries: a client arriving while the container's app is not listening yet waits for
// it instead of failing (HTTP and TCP mode); an app that never listens fails within the window
// (EDS_CONNECT_RETRY_WINDOW, 3 s by default, on average; see envoyconfig.ConnectRetries), and
// Envoy's flags say why.
func testConnectRetries(t *testing.T, st *stack.Stack, daemon *testbed.Daemon, web, db *testbed.Container) {
	const lateBy = 300 * time.Millisecond
	window := st.Config.ConnectRetryWindow
	for _, tc := range []struct {
		mode      string
		container *testbed.Container
		appEnv    string // the echo server's variable for the late app's port
		request   func(addr string) error
	}{
		{"http", web, "ECHO_HTTP_PORTS", func(addr string) error {
			status, body, err := testbed.HTTPGet(context.Background(), "http://"+addr+"/")
			if err == nil && status != http.StatusOK {
				err = fmt.Errorf("HTTP %d %q", status, body)
			}
			return err
		}},
		{"tcp", db, "ECHO_TCP_PORTS", func(addr string) error {
			payload := []byte("hello, late app")
			got, err := testbed.TCPEcho(context.Background(), addr, payload)
			if err == nil && string(got) != string(payload) {
				err = fmt.Errorf("echo %q", got)
			}
			return err
		}},
	} {
		t.Run(tc.mode+" app starting late", func(t *testing.T) {
			port := testbed.FreePort(t)
			appPort := testbed.FreePort(t) // a port number no earlier run left an app on in the container
			ready(t, first(st.Register(t, stack.TCP(port, tc.container.IP.String(), appPort))))
			// The app: a second echo server in the same container, started before the request and
			// listening lateBy after it started (ECHO_LISTEN_DELAY). The delay is the app's own:
			// how long `docker exec` takes on a loaded machine must not add to it.
			args := []string{"exec", "-d", "-e", "ECHO_LISTEN_DELAY=" + lateBy.String()}
			for _, env := range []string{"ECHO_HTTP_PORTS", "ECHO_TCP_PORTS", "ECHO_UDP_PORTS"} {
				if env == tc.appEnv {
					args = append(args, "-e", fmt.Sprintf("%s=%d", env, appPort))
				} else {
					args = append(args, "-e", env+"=")
				}
			}
			started := time.Now()
			if _, err := daemon.Docker(context.Background(), append(args, tc.container.ID, "/echoserver")...); err != nil {
				t.Fatalf("starting the late app: %v", err)
			}
			start := time.Now()
			if err := tc.request(fmt.Sprintf("127.0.0.1:%d", port)); err != nil {
				t.Fatalf("first request, sent while the app was not listening yet: %v", err)
			}
			if took := time.Since(started); took < lateBy {
				t.Fatalf("answered %v after the app started, before it listened (%v): the app was not late", took, lateBy)
			}
			t.Logf("answered %v after the request, the app listening after %v", time.Since(start).Round(time.Millisecond), lateBy)
		})
		t.Run(tc.mode+" app never listening", func(t *testing.T) {
			port := testbed.FreePort(t)
			ready(t, first(st.Register(t, stack.TCP(port, tc.container.IP.String(), 9))))
			start := time.Now()
			err := tc.request(fmt.Sprintf("127.0.0.1:%d", port))
			took := time.Since(start)
			if err == nil {
				t.Fatal("a request to an app that never listens succeeded")
			}
			// The retries' backoffs add up to the window on average, and to at most
			// LongestConnectRetries; a second more covers the connection attempts themselves.
			if longest := envoyconfig.LongestConnectRetries(window); took > longest+time.Second {
				t.Fatalf("failed after %v, want within the longest retries of the window %v (%v) + 1 s", took, window, longest)
			}
			t.Logf("failed after %v (window %v): %v", took.Round(time.Millisecond), window, err)
			if tc.mode == "http" && !strings.Contains(err.Error(), "HTTP 503") {
				t.Fatalf("want a 503, got %v", err)
			}
			listener := fmt.Sprintf("listener=tcp_127.0.0.1_%d", port)
			// Envoy flushes its access log every 10 s (--file-flush-interval-msec) or when its buffer fills.
			testbed.WaitFor(t, 15*time.Second, "the access-log line saying why", func() error {
				log, _ := os.ReadFile(st.Envoy.LogPath)
				for _, line := range strings.Split(string(log), "\n") {
					if strings.Contains(line, listener) {
						if !strings.Contains(line, "URX") || !strings.Contains(line, "UF") {
							return fmt.Errorf("access log without the retry flags URX and UF: %s", line)
						}
						t.Logf("access log: %s", line)
						return nil
					}
				}
				return fmt.Errorf("no access-log line for %s", listener)
			})
			retries := "cluster." + map[string]string{"http": "web-test", "tcp": "pg-test"}[tc.mode] + ".upstream_cx_connect_fail"
			if v, _ := st.Envoy.Stat(t, retries); v < 2 {
				t.Fatalf("%s = %d: the connection was not retried", retries, v)
			}
		})
	}
}
