package envoyconfig

import (
	"bytes"
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"sigs.k8s.io/yaml"

	// Registers the typed configs so golden files show them decoded.
	_ "github.com/envoyproxy/go-control-plane/envoy/config/trace/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/stream/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/tracers/opentelemetry/resource_detectors/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/proxy_protocol/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/raw_buffer/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"

	"github.com/envoy-docker-shim/envoy-docker-shim/internal/mapping"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/registry"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

func entry(proto mapping.Protocol, hostIP string, mode registry.Mode) registry.Entry {
	return registry.Entry{
		Mapping: mapping.Mapping{
			Key:           mapping.Key{Proto: proto, HostIP: netip.MustParseAddr(hostIP), HostPort: 8080},
			ContainerIP:   netip.MustParseAddr("172.17.0.2"),
			ContainerPort: 80,
		},
		Service: registry.Service{Name: "web-test", Operation: "web", ContainerID: "abc", ContainerName: "web1", Mode: mode},
	}
}

// loggedEntry is entry for a container labelled AccessLog=true.
func loggedEntry(proto mapping.Protocol, hostIP string, mode registry.Mode) registry.Entry {
	e := entry(proto, hostIP, mode)
	e.Service.AccessLog = registry.ChoiceOn
	return e
}

// proxyEntry is a TCP-mode entry for a container labelled ProxyProtocol=version.
func proxyEntry(hostIP string, version registry.ProxyProtocol) registry.Entry {
	e := entry(mapping.TCP, hostIP, registry.ModeTCP)
	e.Service.ProxyProtocol = version
	return e
}

// TestProxyProtocolCluster: only a container that asks for it gets PROXY headers, of its version.
func TestProxyProtocolCluster(t *testing.T) {
	for _, tc := range []struct {
		version registry.ProxyProtocol
		want    string
	}{
		{registry.ProxyProtocolNone, ""},
		{registry.ProxyProtocolV1, "config: {}"}, // V1 is the enum's zero, which JSON leaves out
		{registry.ProxyProtocolV2, "version: V2"},
	} {
		res, _, err := ForEntry(proxyEntry("0.0.0.0", tc.version), Options{})
		if err != nil {
			t.Fatal(err)
		}
		y := string(toYAML(t, res.Cluster))
		if has := strings.Contains(y, "envoy.transport_sockets.upstream_proxy_protocol"); has != (tc.want != "") || !strings.Contains(y, tc.want) {
			t.Errorf("%q: cluster\n%s", tc.version, y)
		}
		if err := res.Cluster.ValidateAll(); err != nil {
			t.Errorf("%q: %v", tc.version, err)
		}
	}
	if _, _, err := ForEntry(proxyEntry("0.0.0.0", "v3"), Options{}); err == nil || !strings.Contains(err.Error(), `PROXY protocol version "v3"`) {
		t.Errorf("version v3: %v", err)
	}
}

func TestNames(t *testing.T) {
	tests := []struct {
		key  mapping.Key
		want string
	}{
		{mapping.Key{Proto: mapping.TCP, HostIP: netip.MustParseAddr("127.0.0.1"), HostPort: 80}, "tcp_127.0.0.1_80"},
		{mapping.Key{Proto: mapping.TCP, HostIP: netip.MustParseAddr("::"), HostPort: 8080}, "tcp_[::]_8080"},
		{mapping.Key{Proto: mapping.TCP, HostIP: netip.MustParseAddr("::ffff:10.0.0.1"), HostPort: 1}, "tcp_10.0.0.1_1"},
		{mapping.Key{Proto: mapping.UDP, HostIP: netip.MustParseAddr("0.0.0.0"), HostPort: 53}, "udp_0.0.0.0_53"},
	}
	for _, tt := range tests {
		if got := ListenerName(tt.key); got != tt.want {
			t.Errorf("ListenerName(%v) = %q, want %q", tt.key, got, tt.want)
		}
	}
}

// TestConnectRetries: as many retries as fit in the window on average (half of each bound: 12.5,
// 25, 50, 100, then 125 ms), and the longest they can take (every bound: 25, 50, 100, 200, 250).
func TestConnectRetries(t *testing.T) {
	for _, tc := range []struct {
		window  time.Duration
		want    uint32
		longest time.Duration
	}{
		{0, 0, 0},
		{12 * time.Millisecond, 0, 0},
		{13 * time.Millisecond, 1, 25 * time.Millisecond},
		{37500 * time.Microsecond, 2, 75 * time.Millisecond},
		{187 * time.Millisecond, 3, 175 * time.Millisecond},
		{188 * time.Millisecond, 4, 375 * time.Millisecond},
		{3 * time.Second, 26, 5875 * time.Millisecond}, // the default: 187.5 ms + 22 x 125 ms = 2.9375 s
		{time.Minute, 482, 119875 * time.Millisecond},  // 4 + (60 s - 187.5 ms) / 125 ms
	} {
		if got := ConnectRetries(tc.window); got != tc.want {
			t.Errorf("ConnectRetries(%v) = %d, want %d", tc.window, got, tc.want)
		}
		if got := LongestConnectRetries(tc.window); got != tc.longest {
			t.Errorf("LongestConnectRetries(%v) = %v, want %v", tc.window, got, tc.longest)
		}
	}
}

// TestAccessLogChoice: a container's AccessLog label wins over the server's EDS_ACCESS_LOG, in
// both modes.
func TestAccessLogChoice(t *testing.T) {
	for _, mode := range []registry.Mode{registry.ModeHTTP, registry.ModeTCP} {
		for _, tc := range []struct {
			server bool
			label  registry.Choice
			want   bool
		}{
			{false, registry.ChoiceDefault, false},
			{true, registry.ChoiceDefault, true},
			{false, registry.ChoiceOn, true},
			{true, registry.ChoiceOff, false},
			{true, registry.ChoiceOn, true},
			{false, registry.ChoiceOff, false},
		} {
			e := entry(mapping.TCP, "127.0.0.1", mode)
			e.Service.AccessLog = tc.label
			res, _, err := ForEntry(e, Options{AccessLog: tc.server})
			if err != nil {
				t.Fatal(err)
			}
			got := strings.Contains(string(toYAML(t, res.Listener)), "envoy.access_loggers.stdout")
			if got != tc.want {
				t.Errorf("%s, EDS_ACCESS_LOG=%v, label %q: access log %v, want %v", mode, tc.server, tc.label, got, tc.want)
			}
		}
	}
}

// TestRequestID: Envoy makes up a request ID (x-request-id, passed to the container) only for
// what records it, tracing and the access log.
func TestRequestID(t *testing.T) {
	for _, tc := range []struct {
		opts Options
		want bool
	}{
		{Options{}, false},
		{Options{AccessLog: true}, true},
		{Options{Zipkin: "127.0.0.1:9411", TraceSampling: 1}, true},
		{Options{OTLP: "127.0.0.1:4317", TraceSampling: 1}, true},
	} {
		l, err := HTTPListener(entry(mapping.TCP, "127.0.0.1", registry.ModeHTTP), tc.opts)
		if err != nil {
			t.Fatal(err)
		}
		y := string(toYAML(t, l))
		if got := strings.Contains(y, "generateRequestId: true"); got != tc.want || !strings.Contains(y, "generateRequestId: ") {
			t.Errorf("%+v: generateRequestId %v, want %v:\n%s", tc.opts, got, tc.want, y)
		}
	}
}

// TestGolden shows a reviewer exactly what Envoy receives for each kind of mapping.
func TestGolden(t *testing.T) {
	tests := []struct {
		name  string
		entry registry.Entry
		opts  Options
	}{
		// The shipped defaults: no access log, connect retries for 3 s.
		{"http_ipv4", entry(mapping.TCP, "127.0.0.1", registry.ModeHTTP), Options{ConnectRetryWindow: 3 * time.Second}},
		{"tcp_ipv6", entry(mapping.TCP, "::", registry.ModeTCP), Options{ConnectRetryWindow: 3 * time.Second}},
		// The access log, turned on for every port (EDS_ACCESS_LOG) or by a container's label.
		{"http_access_log", entry(mapping.TCP, "0.0.0.0", registry.ModeHTTP), Options{AccessLog: true, ConnectRetryWindow: 3 * time.Second}},
		{"tcp_access_log", loggedEntry(mapping.TCP, "0.0.0.0", registry.ModeTCP), Options{ConnectRetryWindow: 3 * time.Second}},
		{"http_tracing", entry(mapping.TCP, "127.0.0.1", registry.ModeHTTP), Options{Zipkin: "127.0.0.1:9411", TraceSampling: 25}},
		{"tcp_tracing", entry(mapping.TCP, "127.0.0.1", registry.ModeTCP), Options{Zipkin: "127.0.0.1:9411", TraceSampling: 25}},
		// A container labelled ProxyProtocol=v1 or v2 (TCP mode) is sent the client's address.
		{"tcp_proxy_protocol_v1", proxyEntry("127.0.0.1", registry.ProxyProtocolV1), Options{ConnectRetryWindow: 3 * time.Second}},
		{"tcp_proxy_protocol_v2", proxyEntry("::", registry.ProxyProtocolV2), Options{ConnectRetryWindow: 3 * time.Second}},
		// The same tracing over OTLP: the same sampling and tags, OpenTelemetry's tracer.
		{"http_tracing_otlp", entry(mapping.TCP, "127.0.0.1", registry.ModeHTTP), Options{OTLP: "127.0.0.1:4317", HostName: "docker-host-1", TraceSampling: 25}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res, ok, err := ForEntry(tt.entry, tt.opts)
			if err != nil || !ok {
				t.Fatalf("ForEntry = %v, %v", ok, err)
			}
			golden(t, tt.name, append(toYAML(t, res.Listener), append([]byte("---\n"), toYAML(t, res.Cluster)...)...))
		})
	}
}

// golden compares got with testdata/<name>.yaml, or rewrites that file with -update.
func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", name+".yaml")
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test ./services/envoyconfig -update to create it)", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s differs from the generated resources; if the change is intended, run with -update.\n--- got\n%s", path, got)
	}
}

func toYAML(t *testing.T, m proto.Message) []byte {
	t.Helper()
	j, err := protojson.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	y, err := yaml.JSONToYAML(j)
	if err != nil {
		t.Fatal(err)
	}
	return y
}

// TestByteStable: the same entry must always encode to the same bytes, or every unrelated
// change would make Envoy drain and rebuild live listeners.
func TestByteStable(t *testing.T) {
	for _, mode := range []registry.Mode{registry.ModeHTTP, registry.ModeTCP} {
		var first [2][]byte
		for i := range 50 {
			res, _, err := ForEntry(entry(mapping.TCP, "127.0.0.1", mode), Options{AccessLog: true})
			if err != nil {
				t.Fatal(err)
			}
			l, _ := cache.MarshalResource(res.Listener)
			c, _ := cache.MarshalResource(res.Cluster)
			if i == 0 {
				first = [2][]byte{l, c}
				continue
			}
			if !bytes.Equal(l, first[0]) || !bytes.Equal(c, first[1]) {
				t.Fatalf("%s: encoding %d differs from the first", mode, i)
			}
		}
	}
}

func TestNotCarriedByEnvoy(t *testing.T) {
	for _, e := range []registry.Entry{
		entry(mapping.UDP, "0.0.0.0", registry.ModeProxiedByShim),
		entry(mapping.SCTP, "0.0.0.0", registry.ModeHTTP),
		entry(mapping.TCP, "0.0.0.0", registry.ModeProxiedByShim),
	} {
		if _, ok, err := ForEntry(e, Options{}); ok || err != nil {
			t.Errorf("ForEntry(%s, %s) = %v, %v; want not carried", e.Key, e.Mode, ok, err)
		}
	}
	if _, _, err := ForEntry(entry(mapping.TCP, "0.0.0.0", "grpc"), Options{}); err == nil {
		t.Error("an unknown mode gave no error")
	}
}

func TestResourcesValidate(t *testing.T) {
	for _, mode := range []registry.Mode{registry.ModeHTTP, registry.ModeTCP} {
		res, _, err := ForEntry(entry(mapping.TCP, "::", mode), Options{AccessLog: true})
		if err != nil {
			t.Fatal(err)
		}
		if err := res.Listener.ValidateAll(); err != nil {
			t.Errorf("%s listener: %v", mode, err)
		}
		if err := res.Cluster.ValidateAll(); err != nil {
			t.Errorf("%s cluster: %v", mode, err)
		}
	}
}

// The trace collector's cluster: by IP a static endpoint, by name resolved by Envoy; none when
// tracing is off; a clear error for an address that is not host:port.
// An OTLP collector's cluster speaks HTTP/2 (gRPC), a Zipkin collector's HTTP/1.1; only one of
// the two may be set.
func TestTracingCluster(t *testing.T) {
	for _, tc := range []struct {
		zipkin, otlp string
		ok           bool
		dns          bool
		errText      string
	}{
		{"", "", false, false, ""},
		{"127.0.0.1:9411", "", true, false, ""},
		{"[::1]:9411", "", true, false, ""},
		{"jaeger.internal:9411", "", true, true, ""},
		{"127.0.0.1", "", false, false, "want host:port, e.g. 127.0.0.1:9411"},
		{":9411", "", false, false, "want host:port"},
		{"127.0.0.1:0", "", false, false, "want host:port"},
		{"127.0.0.1:70000", "", false, false, "want host:port"},
		{"", "127.0.0.1:4317", true, false, ""},
		{"", "otel-collector:4317", true, true, ""},
		{"", "otel-collector", false, false, "want host:port, e.g. 127.0.0.1:4317"},
		{"127.0.0.1:9411", "127.0.0.1:4317", false, false, "set one of them"},
	} {
		name := tc.zipkin + "|" + tc.otlp
		c, ok, err := TracingCluster(Options{Zipkin: tc.zipkin, OTLP: tc.otlp})
		if tc.errText != "" {
			if err == nil || !strings.Contains(err.Error(), tc.errText) {
				t.Errorf("%q: err = %v, want %q", name, err, tc.errText)
			}
			continue
		}
		if err != nil || ok != tc.ok {
			t.Errorf("%q: ok = %v, err = %v", name, ok, err)
			continue
		}
		if !ok {
			continue
		}
		if c.GetName() != TracingClusterName || (c.GetType() == cluster.Cluster_STRICT_DNS) != tc.dns {
			t.Errorf("%q: cluster %v", name, c)
		}
		if http2 := strings.Contains(string(toYAML(t, c)), "http2ProtocolOptions"); http2 != (tc.otlp != "") {
			t.Errorf("%q: HTTP/2 %v, want it for OTLP only", name, http2)
		}
		if err := c.ValidateAll(); err != nil {
			t.Errorf("%q: %v", name, err)
		}
	}
}

// TestTracingGolden shows the trace collector's cluster as Envoy receives it, for each protocol.
func TestTracingGolden(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts Options
	}{
		{"tracing_cluster_zipkin", Options{Zipkin: "127.0.0.1:9411"}},
		{"tracing_cluster_otlp", Options{OTLP: "otel-collector:4317"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, _, err := TracingCluster(tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			golden(t, tc.name, toYAML(t, c))
		})
	}
}

// TestTracingProviders: OTLP and Zipkin give every port the same sampling and the same tags
// (span names come from the route's decorator, which tracing does not touch); only the tracer
// differs. The OTLP resource names the service and, when known, the host.
func TestTracingProviders(t *testing.T) {
	e := entry(mapping.TCP, "127.0.0.1", registry.ModeHTTP)
	zipkin, err := HTTPListener(e, Options{Zipkin: "127.0.0.1:9411", TraceSampling: 10})
	if err != nil {
		t.Fatal(err)
	}
	otlp, err := HTTPListener(e, Options{OTLP: "127.0.0.1:4317", TraceSampling: 10, HostName: "h1"})
	if err != nil {
		t.Fatal(err)
	}
	z, o := string(toYAML(t, zipkin)), string(toYAML(t, otlp))
	for _, want := range []string{"tag: docker.service", "tag: docker.container", "tag: docker.published", "value: 10", "operation: web"} {
		if !strings.Contains(z, want) || !strings.Contains(o, want) {
			t.Errorf("%q is not in both listeners:\n%s\n---\n%s", want, z, o)
		}
	}
	for _, want := range []string{"name: envoy.tracers.opentelemetry", "serviceName: web-test", "host.name: h1", "clusterName: envoy_docker_tracing"} {
		if !strings.Contains(o, want) {
			t.Errorf("OTLP listener lacks %q:\n%s", want, o)
		}
	}
	noHost, err := HTTPListener(e, Options{OTLP: "127.0.0.1:4317", TraceSampling: 10})
	if err != nil {
		t.Fatal(err)
	}
	if y := string(toYAML(t, noHost)); strings.Contains(y, "host.name") || strings.Contains(y, "resourceDetectors") {
		t.Errorf("an unknown host name still gave a resource detector:\n%s", y)
	}
	if err := otlp.ValidateAll(); err != nil {
		t.Errorf("OTLP listener: %v", err)
	}
}
