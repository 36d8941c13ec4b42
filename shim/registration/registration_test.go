package registration

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/internal/mapping"
	"github.com/envoy-docker-shim/envoy-docker-shim/internal/shimlink"
	"github.com/envoy-docker-shim/envoy-docker-shim/shim/logging"

	"github.com/envoy-docker-shim/envoy-docker-shim/shim/shimtest"
)

func open() shimlink.Open {
	return shimlink.Open{
		Mapping: mapping.Mapping{Key: mapping.Key{Proto: mapping.TCP, HostIP: netip.MustParseAddr("127.0.0.1"), HostPort: 8080}, ContainerIP: netip.MustParseAddr("172.17.0.2"), ContainerPort: 80},
		PID:     42, Version: "test",
	}
}

func newClient(socket string, out *logging.Relay) *Client {
	return New(Options{Socket: socket, Open: open(), Log: logging.Discard(), Relay: out})
}

func socketPath(t *testing.T) string { return filepath.Join(t.TempDir(), "server.sock") }

func TestRegisterReadyHoldAndDeregister(t *testing.T) {
	sock := socketPath(t)
	srv := shimtest.StartRegistrar(t, sock, nil)
	out := logging.NewRelay(8)
	c := newClient(sock, out)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	reg, err := c.Register(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if reg.Service != "fake-test" {
		t.Errorf("registration = %+v", reg)
	}
	if o := srv.Opens()[0]; o.Mapping.HostPort != 8080 || o.PID != 42 {
		t.Errorf("the server got %+v", o)
	}
	holdCtx, stop := context.WithCancel(context.Background())
	held := make(chan error)
	go func() { held <- c.Hold(holdCtx) }()

	logger := logging.NewWriter(io.Discard, out)
	logger.Info("hello server")
	if !srv.WaitFor(2*time.Second, func(r *shimtest.Registrar) bool { return len(r.Logs()) == 1 }) {
		t.Fatal("log line did not reach the server")
	}
	if got := srv.Logs()[0]; got.Level != "INFO" || got.Message != "msg=\"hello server\"" {
		t.Errorf("server got log %v", got)
	}

	start := time.Now()
	stop()
	<-held
	if took := time.Since(start); took > 500*time.Millisecond {
		t.Errorf("deregistration took %s", took)
	}
	if !srv.WaitFor(time.Second, func(r *shimtest.Registrar) bool { return len(r.Live()) == 0 }) {
		t.Fatal("server still holds the registration after Hold returned")
	}
}

// The counters of a port the shim proxies itself: sent when the registration opens, then every
// period only while they change, and once more at the deregistration, before the shim's side ends.
func TestStatsReports(t *testing.T) {
	sock := socketPath(t)
	srv := shimtest.StartRegistrar(t, sock, nil)
	var mu sync.Mutex
	now := shimlink.Stats{InDatagrams: 1, InBytes: 10}
	set := func(s shimlink.Stats) { mu.Lock(); now = s; mu.Unlock() }
	const period = 50 * time.Millisecond
	udp := open()
	udp.Mapping.Proto, udp.ProxiesItself = mapping.UDP, true
	c := New(Options{Socket: sock, Open: udp, Log: logging.Discard(), StatsEvery: period,
		Stats: func() shimlink.Stats { mu.Lock(); defer mu.Unlock(); return now }})
	if _, err := c.Register(context.Background()); err != nil {
		t.Fatal(err)
	}
	holdCtx, stop := context.WithCancel(context.Background())
	held := make(chan error)
	go func() { held <- c.Hold(holdCtx) }()
	reports := func(n int) []shimlink.Stats {
		t.Helper()
		if !srv.WaitFor(2*time.Second, func(r *shimtest.Registrar) bool { return len(r.Stats()) >= n }) {
			t.Fatalf("%d reports, want %d", len(srv.Stats()), n)
		}
		var out []shimlink.Stats
		for _, s := range srv.Stats() {
			out = append(out, *s)
		}
		return out
	}
	if got := reports(1); got[0] != now {
		t.Fatalf("first report %+v, want %+v", got[0], now)
	}
	time.Sleep(5 * period) // unchanged: nothing more is sent
	if got := srv.Stats(); len(got) != 1 {
		t.Fatalf("%d reports of unchanged counters, want 1", len(got))
	}
	second := shimlink.Stats{InDatagrams: 2, InBytes: 20, OutDatagrams: 1, OutBytes: 10, Flows: 1, FlowsTotal: 1}
	set(second)
	if got := reports(2); got[1] != second {
		t.Fatalf("second report %+v, want %+v", got[1], second)
	}
	// Changed just before the stop: the period has not come, the last report still carries it.
	last := shimlink.Stats{InDatagrams: 3, InBytes: 30, OutDatagrams: 3, OutBytes: 30, FlowsTotal: 1}
	set(last)
	stop()
	<-held
	got := reports(3)
	if got[len(got)-1] != last {
		t.Fatalf("reports %+v: the last is not %+v", got, last)
	}
}

// A server of an earlier release does not ask for counters, and would end a registration that
// sent them (an unknown message): it gets none.
func TestNoStatsUnlessAsked(t *testing.T) {
	sock := socketPath(t)
	srv := shimtest.StartRegistrar(t, sock, func(_ context.Context, o *shimlink.Open) shimlink.Message {
		r := shimtest.Ready(o)
		r.WantsStats = false
		return r
	})
	udp := open()
	udp.Mapping.Proto, udp.ProxiesItself = mapping.UDP, true
	c := New(Options{Socket: sock, Open: udp, Log: logging.Discard(), StatsEvery: time.Millisecond,
		Stats: func() shimlink.Stats { return shimlink.Stats{InDatagrams: 1} }})
	if _, err := c.Register(context.Background()); err != nil {
		t.Fatal(err)
	}
	holdCtx, stop := context.WithCancel(context.Background())
	held := make(chan error)
	go func() { held <- c.Hold(holdCtx) }()
	time.Sleep(50 * time.Millisecond)
	stop()
	<-held
	if !srv.WaitFor(time.Second, func(r *shimtest.Registrar) bool { return len(r.Live()) == 0 }) {
		t.Fatal("the registration did not end")
	}
	if got := srv.Stats(); len(got) != 0 {
		t.Fatalf("the server got %d reports it did not ask for", len(got))
	}
}

func TestRegisterFailedCarriesTheServersReason(t *testing.T) {
	sock := socketPath(t)
	reason := "listen tcp4 127.0.0.1:8080: bind: address already in use (envoy: cannot bind)"
	shimtest.StartRegistrar(t, sock, func(context.Context, *shimlink.Open) shimlink.Message {
		return shimtest.Failed(reason)
	})
	_, err := newClient(sock, nil).Register(context.Background())
	var f *shimlink.Failed
	if !errors.As(err, &f) || err.Error() != reason {
		t.Fatalf("err = %v, want the server's reason", err)
	}
}

func TestRegisterWithoutServerNamesTheSocketQuickly(t *testing.T) {
	sock := socketPath(t)
	start := time.Now()
	_, err := newClient(sock, nil).Register(context.Background())
	if err == nil || !strings.Contains(err.Error(), sock) || !strings.Contains(err.Error(), "not running") {
		t.Fatalf("err = %v", err)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("took %s to report a missing server", took)
	}
}

func TestRegisterSocketWithoutListener(t *testing.T) {
	sock := socketPath(t)
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close() // the file stays, nobody listens: connection refused
	_, err = newClient(sock, nil).Register(context.Background())
	if err == nil || !strings.Contains(err.Error(), "nothing accepts connections") || !strings.Contains(err.Error(), sock) {
		t.Fatalf("err = %v", err)
	}
}

// EDS_SHIM_SOCKET pointing at the server's other socket (its gRPC API) is named as the mistake.
func TestRegisterOnASocketOfAnotherKind(t *testing.T) {
	sock := socketPath(t)
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	_, err = newClient(sock, nil).Register(context.Background())
	if err == nil || !strings.Contains(err.Error(), "not envoy-docker-server's shim socket") || !strings.Contains(err.Error(), "EDS_SHIM_SOCKET") {
		t.Fatalf("err = %v", err)
	}
}

func TestRegisterBoundedByDeadlineWhenServerNeverAnswers(t *testing.T) {
	sock := socketPath(t)
	shimtest.StartRegistrar(t, sock, func(context.Context, *shimlink.Open) shimlink.Message { return nil })
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := newClient(sock, nil).Register(ctx)
	if err == nil || !strings.Contains(err.Error(), "did not answer") {
		t.Fatalf("err = %v", err)
	}
	if took := time.Since(start); took > time.Second {
		t.Errorf("took %s", took)
	}
}

func TestHoldReregistersAfterServerRestart(t *testing.T) {
	sock := socketPath(t)
	srv := shimtest.StartRegistrar(t, sock, nil)
	c := newClient(sock, nil)
	if _, err := c.Register(context.Background()); err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	held := make(chan error)
	go func() { held <- c.Hold(ctx) }()
	defer func() { stop(); <-held }()

	srv.Stop()
	time.Sleep(300 * time.Millisecond) // the server is away for a while
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	if !srv.WaitFor(5*time.Second, func(r *shimtest.Registrar) bool { return len(r.Opens()) == 2 && len(r.Live()) == 1 }) {
		t.Fatalf("not re-registered: %d opens, %d live", len(srv.Opens()), len(srv.Live()))
	}
	// Only the re-registration says the port is served, so the server never withdraws it.
	if opens := srv.Opens(); opens[0].Serving || !opens[1].Serving {
		t.Fatalf("serving flags: first %v, re-registration %v; want false, true", opens[0].Serving, opens[1].Serving)
	}
}

// UDP registers in the background: Hold without Register keeps trying until the server comes.
func TestHoldWithoutRegisterWaitsForServer(t *testing.T) {
	sock := socketPath(t)
	c := newClient(sock, nil)
	ctx, stop := context.WithCancel(context.Background())
	held := make(chan error)
	go func() { held <- c.Hold(ctx) }()
	time.Sleep(300 * time.Millisecond)
	srv := shimtest.StartRegistrar(t, sock, nil)
	if !srv.WaitFor(5*time.Second, func(r *shimtest.Registrar) bool { return len(r.Live()) == 1 }) {
		t.Fatal("never registered")
	}
	stop()
	select {
	case <-held:
	case <-time.After(time.Second):
		t.Fatal("Hold did not return within 1s of cancellation")
	}
}

func TestHoldReturnsPromptlyWhenServerIsGone(t *testing.T) {
	sock := socketPath(t)
	srv := shimtest.StartRegistrar(t, sock, nil)
	c := newClient(sock, nil)
	if _, err := c.Register(context.Background()); err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	held := make(chan error)
	go func() { held <- c.Hold(ctx) }()
	srv.Stop()
	time.Sleep(100 * time.Millisecond)
	start := time.Now()
	stop()
	select {
	case <-held:
	case <-time.After(time.Second):
		t.Fatal("Hold did not return within 1s")
	}
	t.Logf("returned in %s", time.Since(start))
}

// The server's Served (Envoy has the port) reaches the shim through Options.Served, once, while the
// registration stays held.
func TestServedIsPassedOn(t *testing.T) {
	sock := socketPath(t)
	srv := shimtest.StartRegistrar(t, sock, nil)
	served := make(chan struct{}, 2)
	o := open()
	o.WantsServed = true
	c := New(Options{Socket: sock, Open: o, Log: logging.Discard(), Served: func() { served <- struct{}{} }})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := c.Register(ctx); err != nil {
		t.Fatal(err)
	}
	holdCtx, stop := context.WithCancel(context.Background())
	held := make(chan error, 1)
	go func() { held <- c.Hold(holdCtx) }()
	if n := srv.TellServed(); n != 1 {
		t.Fatalf("Served sent on %d registrations, want 1", n)
	}
	select {
	case <-served:
	case <-time.After(2 * time.Second):
		t.Fatal("Options.Served was not called after the server's Served")
	}
	select {
	case err := <-held:
		t.Fatalf("Hold returned after Served: %v", err)
	case <-time.After(50 * time.Millisecond):
	}
	if len(srv.Live()) != 1 {
		t.Fatalf("live registrations after Served: %d, want 1", len(srv.Live()))
	}
	stop()
	<-held
	if len(served) != 0 {
		t.Fatalf("Options.Served called %d more times", len(served))
	}
}
