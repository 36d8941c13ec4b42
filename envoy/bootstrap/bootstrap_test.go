package bootstrap

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
)

func defaults(t *testing.T) Config {
	t.Helper()
	for _, k := range []string{"ENVOY_BASE_ID", "ENVOY_PORT", "ENVOY_ADMIN_ADDRESS", "EDS_XDS_ADDR", "ENVOY_NODE_ID", "ENVOY_CONCURRENCY", "ENVOY_LOG_LEVEL", "ENVOY_MAX_CONNECTIONS", "ENVOY_BINARY", "ENVOY_CONFIG_PATH", "ENVOY_UI_LISTEN_PORT", "ENVOY_UI_ADDRESS", "EDS_HTTP_ADDR", "ENVOY_DRAIN_TIME"} {
		t.Setenv(k, "")
		os.Unsetenv(k)
	}
	c, err := FromEnv()
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestDefaultsWorkWithEmptyEnvironment(t *testing.T) {
	c := defaults(t)
	if c.AdminPort != 9901 || c.AdminAddress != "127.0.0.1" || c.XDSAddr != "127.0.0.1:18000" {
		t.Fatalf("defaults %+v", c)
	}
	y, err := Render(c)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"address: 127.0.0.1, port_value: 9901", "api_type: DELTA_GRPC", "port_value: 18000", "max_active_downstream_connections: 100000",
		"name: ui", "address: 127.0.0.1, port_value: 8081"} {
		if !strings.Contains(string(y), want) {
			t.Errorf("bootstrap lacks %q:\n%s", want, y)
		}
	}
}

func TestSeedVariablesKeepTheirMeaning(t *testing.T) {
	defaults(t)
	t.Setenv("ENVOY_BASE_ID", "3")
	t.Setenv("ENVOY_PORT", "9911")
	t.Setenv("ENVOY_CONCURRENCY", "4")
	c, err := FromEnv()
	if err != nil {
		t.Fatal(err)
	}
	args := Args(c, "/etc/envoy/envoy.yaml")
	for _, want := range [][]string{{"--base-id", "3"}, {"--concurrency", "4"}, {"-c", "/etc/envoy/envoy.yaml"}} {
		i := slices.Index(args, want[0])
		if i < 0 || i+1 >= len(args) || args[i+1] != want[1] {
			t.Errorf("args %v lack %v", args, want)
		}
	}
	y, _ := Render(c)
	if !strings.Contains(string(y), "port_value: 9911") || !strings.Contains(string(y), "api_type: DELTA_GRPC") {
		t.Errorf("bootstrap ignores ENVOY_PORT, or does not speak delta xDS:\n%s", y)
	}
}

// ENVOY_CONCURRENCY=auto is half the container's CPUs, at least 1 and at most MaxAutoWorkers; a
// number is taken as it is, and 0 leaves the choice to Envoy (no --concurrency).
func TestWorkers(t *testing.T) {
	tests := []struct {
		concurrency string
		cpus, want  int
	}{
		{"auto", 1, 1}, {"auto", 2, 1}, {"auto", 3, 1}, {"auto", 4, 2}, {"auto", 8, 4}, {"auto", 16, 8}, {"auto", 128, MaxAutoWorkers},
		{"3", 2, 3}, {"0", 64, 0},
	}
	for _, tt := range tests {
		if got := (Config{Concurrency: tt.concurrency}).Workers(tt.cpus); got != tt.want {
			t.Errorf("ENVOY_CONCURRENCY=%s on %d CPUs: %d workers, want %d", tt.concurrency, tt.cpus, got, tt.want)
		}
	}
	c := defaults(t)
	if c.Concurrency != "auto" {
		t.Errorf("default ENVOY_CONCURRENCY %q, want auto", c.Concurrency)
	}
	args := Args(c, "envoy.yaml")
	i := slices.Index(args, "--concurrency")
	if i < 0 || args[i+1] != strconv.Itoa(c.Workers(runtime.GOMAXPROCS(0))) {
		t.Errorf("args %v: want --concurrency %d", args, c.Workers(runtime.GOMAXPROCS(0)))
	}
	c.Concurrency = "0"
	if args := Args(c, "envoy.yaml"); slices.Contains(args, "--concurrency") {
		t.Errorf("ENVOY_CONCURRENCY=0: args %v, want no --concurrency", args)
	}
}

// ENVOY_UI_LISTEN_PORT is the UI's port, as in the seed; 0 leaves the UI out; a wildcard admin
// address is reached on loopback.
func TestUISettings(t *testing.T) {
	for _, tc := range []struct {
		env        map[string]string
		want, lack []string
	}{
		{map[string]string{"ENVOY_UI_LISTEN_PORT": "9090", "ENVOY_UI_ADDRESS": "0.0.0.0"},
			[]string{"address: 0.0.0.0, port_value: 9090", "name: envoy_admin", "address: 127.0.0.1, port_value: 9901 }"}, nil},
		{map[string]string{"ENVOY_UI_LISTEN_PORT": "0"}, nil, []string{"name: ui", "envoy_admin", "envoy_docker_server_http"}},
		{map[string]string{"EDS_HTTP_ADDR": "127.0.0.2:19001"}, []string{`path: "/ports"`, "route: { cluster: envoy_docker_server_http, timeout: 5s }",
			"address: 127.0.0.2, port_value: 19001 }"}, nil},
		{map[string]string{"ENVOY_ADMIN_ADDRESS": "::"}, []string{"address: ::, port_value: 9901", "address: ::1, port_value: 9901"}, nil},
	} {
		defaults(t)
		for k, v := range tc.env {
			t.Setenv(k, v)
		}
		c, err := FromEnv()
		if err != nil {
			t.Fatal(err)
		}
		y, err := Render(c)
		if err != nil {
			t.Fatal(err)
		}
		for _, w := range tc.want {
			if !strings.Contains(string(y), w) {
				t.Errorf("%v: bootstrap lacks %q", tc.env, w)
			}
		}
		for _, l := range tc.lack {
			if strings.Contains(string(y), l) {
				t.Errorf("%v: bootstrap has %q", tc.env, l)
			}
		}
	}
}

func TestInvalidSettingsAreClearErrors(t *testing.T) {
	tests := []struct {
		env, value, want string
	}{
		{"EDS_XDS_ADDR", "localhost:18000", "want IP:port"},
		{"EDS_XDS_ADDR", "127.0.0.1:0", "port must be 1-65535"},
		{"ENVOY_PORT", "70000", "ENVOY_PORT=70000"},
		{"ENVOY_PORT", "abc", "ENVOY_PORT"},
		{"ENVOY_ADMIN_ADDRESS", "my host", "want an IP address"},
		{"ENVOY_MAX_CONNECTIONS", "0", "must be positive"},
		{"ENVOY_UI_LISTEN_PORT", "70000", "ENVOY_UI_LISTEN_PORT=70000: want a port 1-65535, or 0 for no UI"},
		{"ENVOY_UI_LISTEN_PORT", "9901", "is also ENVOY_PORT"},
		{"ENVOY_UI_ADDRESS", "localhost", "ENVOY_UI_ADDRESS=\"localhost\": want an IP address"},
		{"ENVOY_CONCURRENCY", "many", "ENVOY_CONCURRENCY=\"many\": want auto, a number of workers"},
		{"ENVOY_CONCURRENCY", "-1", "ENVOY_CONCURRENCY=\"-1\""},
		{"EDS_HTTP_ADDR", "server:18001", "EDS_HTTP_ADDR=\"server:18001\": want IP:port"},
		{"ENVOY_DRAIN_TIME", "-1s", "ENVOY_DRAIN_TIME=-1s: must not be negative"},
		{"ENVOY_DRAIN_TIME", "soon", "ENVOY_DRAIN_TIME"},
	}
	for _, tt := range tests {
		t.Run(tt.env+"="+tt.value, func(t *testing.T) {
			defaults(t)
			t.Setenv(tt.env, tt.value)
			if _, err := FromEnv(); err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("FromEnv = %v, want an error containing %q", err, tt.want)
			}
		})
	}
}

// TestEnvoyAcceptsBootstrap runs the real Envoy in validate mode on the bootstrap.
func TestEnvoyAcceptsBootstrap(t *testing.T) {
	bin := testbed.EnvoyBinary(t)
	{
		c := defaults(t)
		y, err := Render(c)
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(t.TempDir(), "envoy.yaml")
		if err := os.WriteFile(path, y, 0o644); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command(bin, "--mode", "validate", "-c", path, "--disable-hot-restart").CombinedOutput()
		if err != nil {
			t.Fatalf("envoy rejected the bootstrap: %v\n%s", err, out)
		}
	}
}
