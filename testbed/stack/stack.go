// Package stack runs envoy-docker-server in-process and a real Envoy connected to it, for
// end-to-end tests of the server and of the shim. The server's JSON log goes to a file that is
// printed when the test fails.
package stack

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/envoy-docker-shim/envoy-docker-shim/envoy/bootstrap"
	pb "github.com/envoy-docker-shim/envoy-docker-shim/services/registration/registrationpb"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/server"
	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
)

// Options shape one stack.
type Options struct {
	// DockerHost is the Docker API the server reads labels from (a testbed daemon's Host). Empty
	// means no Docker at all: every container is unknown and named after its IP.
	DockerHost string
	// AccessLog turns on Envoy's access log (off by default to keep test logs short).
	AccessLog bool
	// Concurrency of Envoy's workers (default 2).
	Concurrency int
	// RestartGrace is the server's EDS_RESTART_GRACE (default 0: answer Envoy at once).
	RestartGrace time.Duration
	// Socket is the gRPC API's socket, for resync and the test's own registrations (default: in a
	// temp dir).
	Socket string
	// ShimSocket is where shims register (default: in a temp dir). Give it when a daemon started
	// earlier must pass it to its shims (EDS_SHIM_SOCKET in DaemonOptions.Env).
	ShimSocket string
	// UIPort turns on Envoy's UI on 127.0.0.1:UIPort (default 0: off).
	UIPort int
	// ServerHTTPAddr is where the UI reads the server's /ports; Start sets it to the server's.
	ServerHTTPAddr string
	// Zipkin is the server's EDS_ZIPKIN_ADDR (default empty: no tracing), with EDS_TRACE_SAMPLING
	// at 100%.
	Zipkin string
	// OTLP is the server's EDS_OTLP_ADDR (default empty), likewise.
	OTLP string
	// NetfilterTable turns on the server's netfilter rules (EDS_NETFILTER) in this nftables table
	// of the host; empty leaves them off. NetfilterKeep is EDS_NETFILTER_KEEP.
	NetfilterTable string
	NetfilterKeep  bool
	// Shipped runs the server and Envoy as users get them: every setting at the default of its
	// configuration struct (server.Config, bootstrap.Config; Envoy's worker count included), except
	// the sockets, addresses and ports the harness chooses, and the netfilter options, which stay
	// the test's. AccessLog, Concurrency, Zipkin, OTLP and RestartGrace are then ignored. The test's
	// environment must not set any of those variables.
	Shipped bool
}

// Stack is a running server and Envoy.
type Stack struct {
	Config  server.Config
	Server  *server.Server
	Envoy   *testbed.Envoy
	Client  pb.RegistrarClient
	LogPath string

	stop context.CancelFunc
	done chan error
}

// Start runs the server, then Envoy, and waits until Envoy is ready and connected.
func Start(t testing.TB, opts Options) *Stack {
	t.Helper()
	testbed.RequireRoot(t)
	dir := t.TempDir()
	if opts.Socket == "" {
		opts.Socket = filepath.Join(dir, "server.sock")
	}
	if opts.ShimSocket == "" {
		opts.ShimSocket = filepath.Join(dir, "shim.sock")
	}
	cfg := server.Config{
		Socket:        opts.Socket,
		ShimSocket:    opts.ShimSocket,
		XDSAddr:       "127.0.0.1:" + strconv.Itoa(testbed.FreePort(t)),
		HTTPAddr:      "127.0.0.1:" + strconv.Itoa(testbed.FreePort(t)),
		DockerHost:    opts.DockerHost,
		DockerTimeout: 2 * time.Second,
		ReadyTimeout:  8 * time.Second,
		AccessLog:     opts.AccessLog,
		RestartGrace:  opts.RestartGrace,
		LogLevel:      "debug",
		Zipkin:        opts.Zipkin,
		OTLP:          opts.OTLP,
		TraceSampling: 100,
		// The shipped default (EDS_CONNECT_RETRY_WINDOW), so tests see what users get.
		ConnectRetryWindow: 3 * time.Second,
		Netfilter:          opts.NetfilterTable != "",
		NftTable:           opts.NetfilterTable,
		NftKeep:            opts.NetfilterKeep,
		SysctlNet:          "/proc/sys/net",
	}
	if opts.Shipped {
		shipped := shippedServerConfig(t)
		shipped.Socket, shipped.ShimSocket, shipped.XDSAddr, shipped.HTTPAddr = cfg.Socket, cfg.ShimSocket, cfg.XDSAddr, cfg.HTTPAddr
		shipped.DockerHost, shipped.RestartGrace = cfg.DockerHost, 0
		// The host's nftables stay the test's choice: the rules serve containers' own traffic
		// out, not the published ports.
		shipped.Netfilter, shipped.NftTable, shipped.NftKeep, shipped.SysctlNet = cfg.Netfilter, cfg.NftTable, cfg.NftKeep, cfg.SysctlNet
		shipped.TCPMigrateReq = cfg.TCPMigrateReq // never the machine's kernel setting from a test
		cfg = shipped
	}
	s := &Stack{Config: cfg, LogPath: filepath.Join(dir, "server.log"), done: make(chan error, 1)}
	s.StartServer(t)
	if opts.RestartGrace > 0 {
		s.Resync(t, nil)
	}
	opts.ServerHTTPAddr = cfg.HTTPAddr
	s.Envoy = StartEnvoy(t, cfg.XDSAddr, opts)
	testbed.WaitFor(t, 15*time.Second, "envoy connected to the server", func() error {
		status, body, err := testbed.HTTPGet(context.Background(), "http://"+cfg.HTTPAddr+"/healthz")
		if err != nil || status != 200 {
			return fmt.Errorf("healthz %d %q %v", status, body, err)
		}
		return nil
	})
	return s
}

// StartServer (re)starts the in-process server with the stack's configuration.
func (s *Stack) StartServer(t testing.TB) {
	t.Helper()
	logFile, err := os.OpenFile(s.LogPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewJSONHandler(logFile, &slog.HandlerOptions{Level: slog.LevelDebug}))
	srv, err := server.New(s.Config, log, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s.Server, s.stop, s.done = srv, cancel, make(chan error, 1)
	go func() { s.done <- srv.Run(ctx); logFile.Close() }()
	t.Cleanup(func() {
		s.StopServer(t)
		if t.Failed() {
			b, _ := os.ReadFile(s.LogPath)
			t.Logf("server log (last 6 KiB):\n%s", tail(string(b), 6<<10))
		}
	})
	testbed.WaitFor(t, 10*time.Second, "server socket", func() error {
		c, err := net.Dial("unix", s.Config.Socket)
		if err != nil {
			return err
		}
		return c.Close()
	})
	// A fresh connection per server, as a reconnecting shim makes.
	conn, err := grpc.NewClient("unix://"+s.Config.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	s.Client = pb.NewRegistrarClient(conn)
}

// Resync does what the resync one-shot does after a (re)start: report the live shims' mappings,
// which ends the server's grace period.
func (s *Stack) Resync(t testing.TB, shims []*pb.Open) *pb.RestoreResponse {
	t.Helper()
	resp, err := s.Client.Restore(context.Background(), &pb.RestoreRequest{Shims: shims})
	if err != nil {
		t.Fatalf("restore: %v", err)
	}
	return resp
}

// StopServer stops the in-process server and waits for it (idempotent).
func (s *Stack) StopServer(t testing.TB) {
	if s.stop == nil {
		return
	}
	s.stop()
	s.stop = nil
	select {
	case err := <-s.done:
		if err != nil {
			t.Errorf("server: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Error("server did not stop within 10 s")
	}
}

// StartEnvoy runs a real Envoy with the appliance's own bootstrap, pointed at xdsAddr.
func StartEnvoy(t testing.TB, xdsAddr string, opts Options) *testbed.Envoy {
	t.Helper()
	// Port 0 marks the admin port for the harness to fill in; no other port in it is 0.
	cfg := bootstrap.Config{
		AdminAddress: "127.0.0.1", AdminPort: 0, XDSAddr: xdsAddr,
		NodeID: "test", LogLevel: "info", MaxConnections: 100000,
		UIPort: opts.UIPort, UIAddress: "127.0.0.1", ServerHTTPAddr: opts.ServerHTTPAddr,
		Concurrency: "0", // the workers are on Envoy's command line: testbed passes them
	}
	concurrency := opts.Concurrency
	if opts.Shipped {
		shipped := shippedEnvoyConfig(t)
		shipped.AdminAddress, shipped.AdminPort, shipped.XDSAddr = cfg.AdminAddress, cfg.AdminPort, cfg.XDSAddr
		shipped.UIPort, shipped.UIAddress, shipped.ServerHTTPAddr = cfg.UIPort, cfg.UIAddress, cfg.ServerHTTPAddr
		cfg = shipped
		concurrency = -1 // Envoy's own default, unless the entrypoint passes one
		args := bootstrap.Args(cfg, "envoy.yaml")
		if i := slices.Index(args, "--concurrency"); i >= 0 {
			var err error
			if concurrency, err = strconv.Atoi(args[i+1]); err != nil {
				t.Fatalf("entrypoint's --concurrency %q: %v", args[i+1], err)
			}
		}
	}
	yaml, err := bootstrap.Render(cfg)
	if err != nil {
		t.Fatal(err)
	}
	// The admin interface, and the UI's route to it when there is a UI.
	const admin = "port_value: 0 }"
	want := 1
	if opts.UIPort > 0 {
		want = 2
	}
	if n := strings.Count(string(yaml), admin); n != want {
		t.Fatalf("bootstrap has %d admin ports, want %d:\n%s", n, want, yaml)
	}
	text := strings.ReplaceAll(string(yaml), admin, "port_value: "+testbed.AdminPortPlaceholder+" }")
	return testbed.StartEnvoy(t, testbed.EnvoyOptions{Bootstrap: text, Concurrency: concurrency})
}

// shippedServerConfig is server.Config with every default, from an environment that sets none of
// its variables except those the harness overrides.
func shippedServerConfig(t testing.TB) server.Config {
	t.Helper()
	requireUnset(t, server.Config{}, "EDS_SOCKET", "EDS_SHIM_SOCKET", "EDS_XDS_ADDR", "EDS_HTTP_ADDR", "DOCKER_HOST", "EDS_RESTART_GRACE",
		"EDS_NETFILTER", "EDS_NETFILTER_TABLE", "EDS_NETFILTER_KEEP", "EDS_SYSCTL_NET")
	cfg, err := server.ConfigFromEnv()
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// shippedEnvoyConfig is the Envoy entrypoint's bootstrap.Config with every default, likewise.
func shippedEnvoyConfig(t testing.TB) bootstrap.Config {
	t.Helper()
	requireUnset(t, bootstrap.Config{}, "ENVOY_PORT", "ENVOY_ADMIN_ADDRESS", "EDS_XDS_ADDR", "ENVOY_UI_LISTEN_PORT",
		"ENVOY_UI_ADDRESS", "EDS_HTTP_ADDR", "ENVOY_BASE_ID", "ENVOY_BINARY", "ENVOY_CONFIG_PATH")
	cfg, err := bootstrap.FromEnv()
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// requireUnset fails the test if the environment sets a variable of the envconfig struct v,
// other than those the harness overrides: the test would not measure the shipped defaults.
func requireUnset(t testing.TB, v any, overridden ...string) {
	t.Helper()
	typ := reflect.TypeOf(v)
	for i := range typ.NumField() {
		key := typ.Field(i).Tag.Get("envconfig")
		if key == "" || slices.Contains(overridden, key) {
			continue
		}
		if value, set := os.LookupEnv(key); set {
			t.Fatalf("%s=%q is set: this test runs the shipped defaults; unset it", key, value)
		}
	}
}

// Register opens a registration like a shim would and returns the server's first answer; the
// registration lasts until the returned function is called or the test ends.
func (s *Stack) Register(t testing.TB, m *pb.Mapping) (*pb.RegisterResponse, func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	stream, err := s.Client.Register(ctx)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	if err := stream.Send(&pb.RegisterRequest{Request: &pb.RegisterRequest_Open{Open: &pb.Open{Mapping: m, Shim: &pb.Shim{Pid: int32(os.Getpid()), Version: "test"}}}}); err != nil {
		cancel()
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		cancel()
		t.Fatalf("register %v: %v", m, err)
	}
	t.Cleanup(cancel)
	return resp, cancel
}

// TCP is a TCP mapping from 127.0.0.1:hostPort.
func TCP(hostPort int, containerIP string, containerPort int) *pb.Mapping {
	return &pb.Mapping{Proto: pb.Protocol_PROTOCOL_TCP, HostIp: "127.0.0.1", HostPort: uint32(hostPort), ContainerIp: containerIP, ContainerPort: uint32(containerPort)}
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// LoopbackHTTP stands in for a container when only the control plane and Envoy are under test:
// an HTTP server on 127.0.0.1 answering "ok", for the test's life. It returns its port.
func LoopbackHTTP(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("ok"))
	})}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { srv.Close() })
	return l.Addr().(*net.TCPAddr).Port
}
