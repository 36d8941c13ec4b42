package server

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
)

func freeAddr(t *testing.T) string {
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(testbed.FreePort(t)))
}

// TestServerWithoutEnvoy: the socket is root-only, /healthz says Envoy is missing, /metrics
// carries the server's series, and the process stops cleanly when asked.
func TestServerWithoutEnvoy(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "run")
	cfg := Config{
		Socket: filepath.Join(dir, "server.sock"), ShimSocket: filepath.Join(dir, "shim.sock"), XDSAddr: freeAddr(t), HTTPAddr: freeAddr(t),
		DockerTimeout: time.Second, ReadyTimeout: time.Second, LogLevel: "info",
	}
	s, err := New(cfg, slog.New(slog.DiscardHandler), nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()

	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := os.Stat(cfg.ShimSocket); err == nil { // the later of the two
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("socket not created")
		}
		time.Sleep(10 * time.Millisecond)
	}
	for _, sock := range []string{cfg.Socket, cfg.ShimSocket} {
		fi, err := os.Stat(sock)
		if err != nil || fi.Mode().Perm() != 0o600 {
			t.Fatalf("%s: mode %v, %v; want 0600", sock, fi.Mode(), err)
		}
	}
	get := func(path string) (int, string) {
		t.Helper()
		resp, err := http.Get("http://" + cfg.HTTPAddr + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get("/healthz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "envoy not connected") {
		t.Fatalf("/healthz = %d %q without Envoy", code, body)
	}
	_, metrics := get("/metrics")
	for _, series := range []string{"eds_registrations 0", "eds_xds_streams 0", "go_goroutines"} {
		if !strings.Contains(metrics, series) {
			t.Errorf("/metrics lacks %q", series)
		}
	}
	if code, body := get("/ports"); code != 200 || body != `{"ports":[]}` {
		t.Errorf("/ports = %d %q, want an empty list", code, body)
	}
	code, body := get("/registrations")
	var list struct{ Registrations []any }
	if err := json.Unmarshal([]byte(body), &list); code != 200 || err != nil || list.Registrations == nil || len(list.Registrations) != 0 {
		t.Errorf("/registrations = %d %q (%v)", code, body, err)
	}

	// A second server on the same socket must refuse rather than steal it.
	second := cfg
	second.XDSAddr, second.HTTPAddr = freeAddr(t), freeAddr(t)
	s2, _ := New(second, slog.New(slog.DiscardHandler), nil)
	if err := s2.Run(context.Background()); err == nil || !strings.Contains(err.Error(), "already serving") {
		t.Fatalf("second server: %v", err)
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run = %v after cancel", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("server did not stop")
	}
	if _, err := os.Stat(cfg.Socket); !os.IsNotExist(err) {
		t.Errorf("socket left behind: %v", err)
	}
}

func TestStaleSocketIsReplaced(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close() // the file stays, nobody answers: what a crashed server leaves
	l2, err := listenUnix("unix", path)
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	l2.Close()
}

func TestConfigFromEnv(t *testing.T) {
	t.Setenv("EDS_LOG_LEVEL", "loud")
	if _, err := ConfigFromEnv(); err == nil || !strings.Contains(err.Error(), "EDS_LOG_LEVEL") {
		t.Fatalf("bad level: %v", err)
	}
	t.Setenv("EDS_LOG_LEVEL", "debug")
	t.Setenv("EDS_READY_TIMEOUT", "soon")
	if _, err := ConfigFromEnv(); err == nil || !strings.Contains(err.Error(), "EDS_READY_TIMEOUT") {
		t.Fatalf("bad duration: %v", err)
	}
	t.Setenv("EDS_READY_TIMEOUT", "")
	os.Unsetenv("EDS_READY_TIMEOUT")
	c, err := ConfigFromEnv()
	if err != nil || c.ReadyTimeout != 8*time.Second || c.Socket != "/run/envoy-docker-shim/server.sock" || c.Zipkin != "" || c.TraceSampling != 100 {
		t.Fatalf("defaults: %+v, %v", c, err)
	}
	if !c.Netfilter || c.NftTable != "envoy_docker_shim" || !c.NftKeep || c.SysctlNet != "/proc/sys/net" {
		t.Fatalf("netfilter defaults: %+v", c)
	}
	for _, tc := range []struct{ env, value, want string }{
		{"EDS_ZIPKIN_ADDR", "zipkin", "EDS_ZIPKIN_ADDR: trace collector \"zipkin\": want host:port"},
		{"EDS_OTLP_ADDR", "otel:grpc", "EDS_OTLP_ADDR: trace collector \"otel:grpc\": want host:port, e.g. 127.0.0.1:4317"},
		{"EDS_TRACE_SAMPLING", "150", "EDS_TRACE_SAMPLING=150: want a percentage from 0 to 100"},
		{"EDS_NETFILTER_TABLE", "my-table", "EDS_NETFILTER_TABLE: netfilter table \"my-table\": want a letter"},
		{"EDS_NETFILTER_TABLE", "", "EDS_NETFILTER_TABLE: netfilter table \"\""},
	} {
		t.Setenv(tc.env, tc.value)
		if _, err := ConfigFromEnv(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s=%s: %v, want %q", tc.env, tc.value, err, tc.want)
		}
		os.Unsetenv(tc.env)
	}
	t.Setenv("EDS_ZIPKIN_ADDR", "jaeger:9411")
	if c, err := ConfigFromEnv(); err != nil || c.Zipkin != "jaeger:9411" {
		t.Errorf("a collector by name: %+v, %v", c, err)
	}
	t.Setenv("EDS_OTLP_ADDR", "otel:4317")
	if _, err := ConfigFromEnv(); err == nil || !strings.Contains(err.Error(), "EDS_ZIPKIN_ADDR and EDS_OTLP_ADDR: both") {
		t.Errorf("both collectors: %v, want an error naming both", err)
	}
	os.Unsetenv("EDS_ZIPKIN_ADDR")
	c, err = ConfigFromEnv()
	if err != nil || c.OTLP != "otel:4317" {
		t.Fatalf("an OTLP collector: %+v, %v", c, err)
	}
	host, _ := os.Hostname()
	if opts := c.EnvoyOptions(); opts.OTLP != "otel:4317" || opts.Zipkin != "" || opts.HostName != host || opts.TraceSampling != 100 {
		t.Errorf("EnvoyOptions = %+v, want OTLP to otel:4317 from host %q", opts, host)
	}
}

func TestBootIDsDiffer(t *testing.T) {
	if a, b := bootID(), bootID(); a == b {
		t.Fatalf("two boots share the version prefix %q", a)
	}
}
