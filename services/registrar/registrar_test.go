package registrar

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/envoy-docker-shim/envoy-docker-shim/internal/mapping"
	"github.com/envoy-docker-shim/envoy-docker-shim/internal/shimlink"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/dockerapi"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/envoyconfig"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/labels"
	pb "github.com/envoy-docker-shim/envoy-docker-shim/services/registration/registrationpb"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/registry"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/udpstats"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/xds"
)

type fakeFinder struct {
	containers map[netip.Addr]labels.Container
	err        error
}

func (f *fakeFinder) FindByIP(_ context.Context, ip netip.Addr) (labels.Container, error) {
	if f.err != nil {
		return labels.Container{}, f.err
	}
	c, ok := f.containers[ip]
	if !ok {
		return labels.Container{}, dockerapi.ErrNotFound
	}
	return c, nil
}

// fakeConfirmer answers every wait with err, and counts the waits.
type fakeConfirmer struct {
	mu    sync.Mutex
	err   error
	waits int
	// block, if not nil, holds each Wait until it is closed; returned then hears of each return.
	block    chan struct{}
	returned chan struct{}
}

func (f *fakeConfirmer) Wait(ctx context.Context, _ []registry.Expected) error {
	f.mu.Lock()
	f.waits++
	block, returned, err := f.block, f.returned, f.err
	f.mu.Unlock()
	if block != nil {
		select {
		case <-block:
		case <-ctx.Done():
			err = ctx.Err()
		}
	}
	if returned != nil {
		returned <- struct{}{}
	}
	return err
}

type fixture struct {
	metrics   *prometheus.Registry
	server    *Server
	registry  *registry.Registry
	finder    *fakeFinder
	confirmer *fakeConfirmer
	client    pb.RegistrarClient
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	f := &fixture{
		finder: &fakeFinder{containers: map[netip.Addr]labels.Container{
			netip.MustParseAddr("172.17.0.2"): {ID: "c0ffee", Name: "web1", Labels: map[string]string{"ServiceName": "web", "EnvironmentName": "test"}},
			netip.MustParseAddr("172.17.0.3"): {ID: "bad", Name: "odd", Labels: map[string]string{"ProxyMode": "quic"}},
		}},
		confirmer: &fakeConfirmer{},
	}
	f.metrics = prometheus.NewRegistry()
	metrics := xds.NewMetrics(f.metrics)
	c, err := xds.NewCache("test", envoyconfig.Options{}, metrics, xds.NewTracker(metrics))
	if err != nil {
		t.Fatal(err)
	}
	f.registry = registry.New(c)
	srv := grpc.NewServer()
	f.server = &Server{
		Registry: f.registry, Finder: f.finder, Confirmer: f.confirmer,
		ReadyTimeout: time.Second, Log: slog.New(slog.DiscardHandler), Metrics: NewMetrics(nil, f.registry),
	}
	pb.RegisterRegistrarServer(srv, f.server)
	sock := filepath.Join(t.TempDir(), "s.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(srv.Stop)
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	f.client = pb.NewRegistrarClient(conn)
	return f
}

func (f *fixture) onRestored(fn func()) { f.server.OnRestored = fn }

// serveShims serves the shim link on a socket of its own until the test ends, and returns its path.
func (f *fixture) serveShims(t *testing.T) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "shim.sock")
	l, err := shimlink.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- f.server.ServeShims(l) }()
	t.Cleanup(func() { l.Close(); <-served; f.server.CloseShims() })
	return sock
}

func tcpMapping(hostPort uint32, containerIP string) *pb.Mapping {
	return &pb.Mapping{Proto: pb.Protocol_PROTOCOL_TCP, HostIp: "127.0.0.1", HostPort: hostPort, ContainerIp: containerIP, ContainerPort: 80}
}

// open registers m and returns the first answer and a function that ends the stream.
func (f *fixture) open(t *testing.T, m *pb.Mapping, shim *pb.Shim) (*pb.RegisterResponse, func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	stream, err := f.client.Register(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&pb.RegisterRequest{Request: &pb.RegisterRequest_Open{Open: &pb.Open{Mapping: m, Shim: shim}}}); err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	return resp, cancel
}

func (f *fixture) waitLen(t *testing.T, n int) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for f.registry.Len() != n {
		if time.Now().After(deadline) {
			t.Fatalf("registry holds %d entries, want %d", f.registry.Len(), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestRegisterReadyListAndDeregister(t *testing.T) {
	f := newFixture(t)
	resp, end := f.open(t, tcpMapping(8080, "172.17.0.2"), &pb.Shim{Pid: 42, Version: "v1"})
	r := resp.GetReady().GetRegistration()
	if r == nil {
		t.Fatalf("want Ready, got %v", resp)
	}
	if r.GetService() != "web-test" || r.GetMode() != pb.Mode_MODE_HTTP || r.GetListener() != "tcp_127.0.0.1_8080" || r.GetContainerId() != "c0ffee" || r.GetReadyUnixMs() == 0 {
		t.Fatalf("registration %v", r)
	}
	list, err := f.client.List(context.Background(), &pb.ListRequest{})
	if err != nil || len(list.GetRegistrations()) != 1 || list.GetRegistrations()[0].GetShim().GetPid() != 42 {
		t.Fatalf("List = %v, %v", list, err)
	}
	end()
	f.waitLen(t, 0)
}

func TestRegisterFailures(t *testing.T) {
	tests := []struct {
		name       string
		mapping    *pb.Mapping
		confirmErr error
		want       string
	}{
		{
			name:       "port taken reads like docker-proxy",
			mapping:    tcpMapping(8081, "172.17.0.2"),
			confirmErr: &xds.RejectedError{Name: "tcp_127.0.0.1_8081", Reason: "cannot bind '127.0.0.1:8081': Address already in use"},
			want:       "listen tcp4 127.0.0.1:8081: bind: address already in use (envoy: cannot bind '127.0.0.1:8081': Address already in use)",
		},
		{
			name:       "envoy not connected",
			mapping:    tcpMapping(8082, "172.17.0.2"),
			confirmErr: xds.ErrEnvoyNotConnected,
			want:       "envoy is not connected",
		},
		{
			name:    "unsupported ProxyMode label",
			mapping: tcpMapping(8083, "172.17.0.3"),
			want:    `container odd: label ProxyMode="quic" is not supported`,
		},
		{
			name:    "bad container IP",
			mapping: tcpMapping(8084, "not-an-ip"),
			want:    "invalid mapping: container IP",
		},
		{
			name:    "unknown protocol",
			mapping: &pb.Mapping{Proto: pb.Protocol_PROTOCOL_UNSPECIFIED, HostIp: "127.0.0.1", HostPort: 1, ContainerIp: "10.0.0.1", ContainerPort: 1},
			want:    "invalid mapping: unknown protocol",
		},
		{
			name:    "port out of range",
			mapping: &pb.Mapping{Proto: pb.Protocol_PROTOCOL_TCP, HostIp: "127.0.0.1", HostPort: 70000, ContainerIp: "10.0.0.1", ContainerPort: 1},
			want:    "port out of range",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t)
			f.confirmer.err = tt.confirmErr
			resp, end := f.open(t, tt.mapping, nil)
			defer end()
			if got := resp.GetFailed().GetReason(); !strings.Contains(got, tt.want) {
				t.Fatalf("reason %q, want it to contain %q", got, tt.want)
			}
			f.waitLen(t, 0) // a failed registration leaves nothing behind
		})
	}
}

func TestRegisterIPv6PortTaken(t *testing.T) {
	m := mapping.Mapping{Key: mapping.Key{Proto: mapping.TCP, HostIP: netip.MustParseAddr("::"), HostPort: 80}}
	got := Reason(m, &xds.RejectedError{Reason: "cannot bind '[::]:80': Address already in use"})
	if !strings.HasPrefix(got, "listen tcp6 [::]:80: bind: address already in use") {
		t.Fatalf("Reason = %q", got)
	}
}

func TestRegisterDockerDownFallsBackToIPName(t *testing.T) {
	f := newFixture(t)
	f.finder.err = errors.New("Cannot connect to the Docker daemon")
	resp, end := f.open(t, tcpMapping(8085, "172.17.0.2"), nil)
	defer end()
	if got := resp.GetReady().GetRegistration().GetService(); got != "container-172_17_0_2" {
		t.Fatalf("service %q (response %v)", got, resp)
	}
}

func TestRegisterUDPIsListedWithoutEnvoy(t *testing.T) {
	f := newFixture(t)
	m := tcpMapping(5353, "172.17.0.2")
	m.Proto = pb.Protocol_PROTOCOL_UDP
	f.confirmer.err = xds.ErrEnvoyNotConnected // must not matter: Envoy is not involved
	resp, end := f.open(t, m, &pb.Shim{ProxiesItself: true})
	defer end()
	r := resp.GetReady().GetRegistration()
	if r.GetMode() != pb.Mode_MODE_SHIM || r.GetListener() != "" {
		t.Fatalf("registration %v", resp)
	}
	if f.confirmer.waits != 0 {
		t.Fatal("a UDP registration waited for Envoy")
	}
}

func TestRegisterConflict(t *testing.T) {
	f := newFixture(t)
	_, end := f.open(t, tcpMapping(8086, "172.17.0.2"), &pb.Shim{Pid: 7})
	defer end()
	resp, end2 := f.open(t, tcpMapping(8086, "172.17.0.9"), nil)
	defer end2()
	if got := resp.GetFailed().GetReason(); !strings.Contains(got, "already published for container c0ffee") {
		t.Fatalf("reason %q", got)
	}
	if f.registry.Len() != 1 {
		t.Fatal("the conflicting registration disturbed the first")
	}
}

func TestRegisterFirstMessageMustBeOpen(t *testing.T) {
	f := newFixture(t)
	stream, err := f.client.Register(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	_ = stream.Send(&pb.RegisterRequest{Request: &pb.RegisterRequest_Log{Log: &pb.ShimLog{Message: "hi"}}})
	resp, err := stream.Recv()
	if err != nil || !strings.Contains(resp.GetFailed().GetReason(), "must be Open") {
		t.Fatalf("resp %v, err %v", resp, err)
	}
	if _, err := stream.Recv(); err != io.EOF {
		t.Fatalf("stream not ended after Failed: %v", err)
	}
}

func TestRestore(t *testing.T) {
	f := newFixture(t)
	restored := make(chan struct{}, 1)
	f.onRestored(func() { restored <- struct{}{} })
	_, end := f.open(t, tcpMapping(9000, "172.17.0.2"), &pb.Shim{Pid: 1})
	defer end()
	udp := tcpMapping(9001, "172.17.0.2")
	udp.Proto = pb.Protocol_PROTOCOL_UDP
	resp, err := f.client.Restore(context.Background(), &pb.RestoreRequest{Shims: []*pb.Open{
		{Mapping: tcpMapping(9000, "172.17.0.2"), Shim: &pb.Shim{Pid: 1}},                        // re-registered by itself
		{Mapping: tcpMapping(9002, "172.17.0.2"), Shim: &pb.Shim{Pid: 2}},                        // shim alive, not reconnected
		{Mapping: udp, Shim: &pb.Shim{Pid: 3, ProxiesItself: true}},                              // UDP
		{Mapping: tcpMapping(9003, "172.17.0.99"), Shim: &pb.Shim{Pid: 4}},                       // container gone
		{Mapping: &pb.Mapping{Proto: pb.Protocol_PROTOCOL_TCP, HostIp: "bad"}, Shim: &pb.Shim{}}, // garbage
	}})
	if err != nil {
		t.Fatal(err)
	}
	want := []pb.Restored_Outcome{
		pb.Restored_OUTCOME_ALREADY_REGISTERED, pb.Restored_OUTCOME_RESTORED, pb.Restored_OUTCOME_RESTORED,
		pb.Restored_OUTCOME_SKIPPED, pb.Restored_OUTCOME_SKIPPED,
	}
	for i, r := range resp.GetResults() {
		if r.GetOutcome() != want[i] {
			t.Errorf("result %d: %v (%s), want %v", i, r.GetOutcome(), r.GetReason(), want[i])
		}
	}
	if f.registry.Len() != 3 {
		t.Fatalf("registry holds %d, want 3 (never the gone container)", f.registry.Len())
	}
	if e, _ := f.registry.Get(mapping.Key{Proto: mapping.UDP, HostIP: netip.MustParseAddr("127.0.0.1"), HostPort: 9001}); e.Mode != registry.ModeProxiedByShim {
		t.Errorf("restored UDP mapping mode %q", e.Mode)
	}
	select {
	case <-restored:
	default:
		t.Fatal("OnRestored not called")
	}
	// The shim of a restored mapping reconnects and takes it over.
	resp2, end2 := f.open(t, tcpMapping(9002, "172.17.0.2"), &pb.Shim{Pid: 2})
	defer end2()
	if resp2.GetReady() == nil {
		t.Fatalf("takeover of a restored mapping: %v", resp2)
	}
}

// TestServingPortNeverDropped: a shim that serves its port itself (a TCP shim, which holds the
// port's socket until Envoy takes it, or any shim re-registering after a server restart) is
// answered without waiting for Envoy, and a wait that fails later cannot make the server
// withdraw the port.
func TestServingPortNeverDropped(t *testing.T) {
	f := newFixture(t)
	f.confirmer.err = errors.New("envoy did not confirm the configuration in time")
	f.confirmer.block = make(chan struct{})
	f.confirmer.returned = make(chan struct{}, 1)
	resp, end := f.open(t, tcpMapping(8090, "172.17.0.2"), &pb.Shim{Pid: 7, Serving: true})
	defer end()
	if resp.GetReady() == nil { // while the wait on Envoy is still blocked
		t.Fatalf("want Ready, got %v", resp)
	}
	close(f.confirmer.block)
	select {
	case <-f.confirmer.returned:
	case <-time.After(5 * time.Second):
		t.Fatal("the server never waited for Envoy to take the serving port")
	}
	if _, ok := f.registry.Get(mapping.Key{Proto: mapping.TCP, HostIP: netip.MustParseAddr("127.0.0.1"), HostPort: 8090}); !ok {
		t.Fatal("the serving port left the registry when Envoy did not confirm it")
	}

	// The same failing wait on a first registration withdraws it: dockerd hears the reason.
	resp, end2 := f.open(t, tcpMapping(8091, "172.17.0.2"), &pb.Shim{Pid: 8})
	defer end2()
	if resp.GetFailed() == nil {
		t.Fatalf("first registration: want Failed, got %v", resp)
	}
	f.waitLen(t, 1)
}

// TestRegistrationTranslatesOnce: a registration's Envoy resources are built and hashed once, for
// publishing and for every wait on Envoy (ready, and the removal at deregistration).
func TestRegistrationTranslatesOnce(t *testing.T) {
	f := newFixture(t)
	stream, err := f.client.Register(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&pb.RegisterRequest{Request: &pb.RegisterRequest_Open{Open: &pb.Open{Mapping: tcpMapping(8095, "172.17.0.2"), Shim: &pb.Shim{Pid: 5}}}}); err != nil {
		t.Fatal(err)
	}
	if resp, err := stream.Recv(); err != nil || resp.GetReady() == nil {
		t.Fatalf("want Ready, got %v, %v", resp, err)
	}
	// A clean deregistration: the server ends the stream once Envoy let go of the port.
	if err := stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("after the deregistration: %v, want the stream's end", err)
	}
	families, err := f.metrics.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var translations float64 = -1
	for _, mf := range families {
		if mf.GetName() == "eds_xds_translations_total" {
			translations = mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	if translations != 1 {
		t.Fatalf("eds_xds_translations_total = %v after one registration and its end, want 1", translations)
	}
	f.confirmer.mu.Lock()
	defer f.confirmer.mu.Unlock()
	if f.confirmer.waits != 2 {
		t.Fatalf("%d waits on Envoy, want 2 (ready, removal)", f.confirmer.waits)
	}
}

// The counters a UDP shim reports on the link reach the store under the service's name and the
// published address; the last one before the shim ends its side stays in the port's totals. A
// TCP port's shim reports nothing worth keeping (Envoy counts its traffic), so nothing is kept.
func TestShimLinkStats(t *testing.T) {
	f := newFixture(t)
	f.server.UDP = udpstats.New()
	sock := f.serveShims(t)

	register := func(proto mapping.Protocol, port uint16) *shimlink.Conn {
		t.Helper()
		c, err := shimlink.Dial(sock)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		m := mapping.Mapping{Key: mapping.Key{Proto: proto, HostIP: netip.MustParseAddr("127.0.0.1"), HostPort: port},
			ContainerIP: netip.MustParseAddr("172.17.0.2"), ContainerPort: 53}
		if err := c.Send(&shimlink.Open{Mapping: m, PID: 7, ProxiesItself: proto == mapping.UDP}); err != nil {
			t.Fatal(err)
		}
		if msg, err := c.Recv(); err != nil {
			t.Fatal(err)
		} else if r, ok := msg.(*shimlink.Ready); !ok || r.WantsStats != (proto == mapping.UDP) {
			t.Fatalf("answer %+v: want Ready, asking for counters only from a shim that carries the traffic", msg)
		}
		return c
	}
	udp, tcp := register(mapping.UDP, 5353), register(mapping.TCP, 8053)
	key := udpstats.Key{Service: "web-test", Address: netip.MustParseAddrPort("127.0.0.1:5353")}
	for _, s := range []shimlink.Stats{{InDatagrams: 1, InBytes: 3, Flows: 1, FlowsTotal: 1}, {InDatagrams: 1000, InBytes: 9000, OutDatagrams: 1000, OutBytes: 9000, Flows: 1, FlowsTotal: 1}} {
		if err := udp.Send(&s); err != nil {
			t.Fatal(err)
		}
		if err := tcp.Send(&s); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []*shimlink.Conn{udp, tcp} {
		if err := c.CloseWrite(); err != nil { // the deregistration
			t.Fatal(err)
		}
		if _, err := c.Recv(); !errors.Is(err, io.EOF) {
			t.Fatalf("after the deregistration: %v, want the server's end", err)
		}
	}
	want := udpstats.Counters{InDatagrams: 1000, InBytes: 9000, OutDatagrams: 1000, OutBytes: 9000, FlowsTotal: 1}
	got, ok := f.server.UDP.Port(key)
	if got.UpdatedUnixMs == 0 {
		t.Errorf("port %v: no time of the last report", key)
	}
	if got.UpdatedUnixMs = 0; !ok || got != want {
		t.Errorf("port %v: %+v (%v), want %+v", key, got, ok, want)
	}
	if got, ok := f.server.UDP.Port(udpstats.Key{Service: "web-test", Address: netip.MustParseAddrPort("127.0.0.1:8053")}); ok {
		t.Errorf("a TCP port's reports were kept: %+v", got)
	}
}

// A shim that asks (Open.WantsServed, the fast start's) hears Served once Envoy confirmed its port
// and registrations paused; one that does not ask never hears it.
func TestServedOnlyToShimsThatAsk(t *testing.T) {
	f := newFixture(t)
	sock := f.serveShims(t)
	register := func(port uint16, wantsServed bool) *shimlink.Conn {
		t.Helper()
		c, err := shimlink.Dial(sock)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		m := mapping.Mapping{Key: mapping.Key{Proto: mapping.TCP, HostIP: netip.MustParseAddr("127.0.0.1"), HostPort: port},
			ContainerIP: netip.MustParseAddr("172.17.0.2"), ContainerPort: 80}
		if err := c.Send(&shimlink.Open{Mapping: m, PID: 7, Serving: true, WantsServed: wantsServed}); err != nil {
			t.Fatal(err)
		}
		if msg, err := c.Recv(); err != nil {
			t.Fatal(err)
		} else if _, ok := msg.(*shimlink.Ready); !ok {
			t.Fatalf("first answer %+v, want Ready", msg)
		}
		return c
	}
	asks, silent := register(9001, true), register(9002, false)
	_ = asks.Unix().SetReadDeadline(time.Now().Add(5 * time.Second))
	if msg, err := asks.Recv(); err != nil {
		t.Fatalf("no Served: %v", err)
	} else if _, ok := msg.(*shimlink.Served); !ok {
		t.Fatalf("%+v, want Served", msg)
	}
	_ = silent.Unix().SetReadDeadline(time.Now().Add(20 * servedQuiet))
	if msg, err := silent.Recv(); err == nil {
		t.Errorf("a shim that did not ask heard %+v", msg)
	}
}

// Served waits while registrations keep coming (a port range), and goes once they pause.
func TestServedWaitsForRegistrationsToPause(t *testing.T) {
	s := &Server{}
	// The last registration came "in 150 ms": as if a range went on that long.
	start := time.Now()
	s.lastOpen.Store(start.Add(150 * time.Millisecond).UnixNano())
	if !s.servedTurn(context.Background(), turn{opened: start.UnixNano(), lone: true}) {
		t.Fatal("servedTurn gave up")
	}
	if took, want := time.Since(start), 150*time.Millisecond+servedQuiet*3/4; took < want {
		t.Errorf("Served went %v after the start of a range that lasted 150 ms, want at least %v", took, want)
	}
	// Registrations long paused: at once (and the next one servedEvery later).
	s.lastOpen.Store(time.Now().Add(-time.Second).UnixNano())
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if !s.servedTurn(ctx, turn{opened: time.Now().Add(-2 * time.Second).UnixNano()}) {
		t.Error("Served held back with registrations paused for a second")
	}
}

// A registration that came after a pause, with none since, is told at once: a lone docker run's
// port is steered to Envoy without waiting for a pause that has already begun.
func TestServedAtOnceToARegistrationAlone(t *testing.T) {
	s := &Server{}
	opened := time.Now().UnixNano()
	s.lastOpen.Store(opened)
	start := time.Now()
	if !s.servedTurn(context.Background(), turn{opened: opened, lone: true}) {
		t.Fatal("servedTurn gave up")
	}
	if took := time.Since(start); took >= servedQuiet {
		t.Errorf("Served to a registration alone went after %v, want at once (before servedQuiet, %v)", took, servedQuiet)
	}
	if !s.alone(turn{opened: opened, lone: true}) || s.alone(turn{opened: opened}) || s.alone(turn{opened: opened - 1, lone: true}) {
		t.Error("alone misjudged: want it only for a registration after a pause with none since")
	}
}

// Served wakes shims, which then run in Go for a few milliseconds each: many at once go out
// servedEvery apart, not all together.
func TestServedIsPaced(t *testing.T) {
	f := newFixture(t)
	sock := f.serveShims(t)
	const n = 20
	before := time.Now() // no Served can go earlier
	heard := make(chan time.Time, n)
	for i := range n {
		c, err := shimlink.Dial(sock)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		m := mapping.Mapping{Key: mapping.Key{Proto: mapping.TCP, HostIP: netip.MustParseAddr("127.0.0.1"), HostPort: uint16(9100 + i)},
			ContainerIP: netip.MustParseAddr("172.17.0.2"), ContainerPort: 80}
		if err := c.Send(&shimlink.Open{Mapping: m, PID: 7, Serving: true, WantsServed: true}); err != nil {
			t.Fatal(err)
		}
		go func() {
			for {
				msg, err := c.Recv()
				if err != nil {
					return
				}
				if _, ok := msg.(*shimlink.Served); ok {
					heard <- time.Now()
				}
			}
		}()
	}
	var times []time.Time
	for range n {
		select {
		case at := <-heard:
			times = append(times, at)
		case <-time.After(5 * time.Second):
			t.Fatalf("%d of %d shims heard Served", len(times), n)
		}
	}
	// The last cannot have gone before n-1 paces after the first could; late arrivals only add.
	last := slices.MaxFunc(times, func(a, b time.Time) int { return a.Compare(b) })
	if spread, want := last.Sub(before), (n-1)*servedEvery; spread < want {
		t.Errorf("%d Served went out within %v, want them paced over at least %v", n, spread, want)
	}
}
