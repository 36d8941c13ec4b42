package server_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	collectortrace "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/grpc"

	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
	"github.com/envoy-docker-shim/envoy-docker-shim/testbed/stack"
)

// otlpSpan is one span the fake collector received, with the resource it came under.
type otlpSpan struct {
	resource map[string]string
	span     *tracepb.Span
}

// fakeOTLP is an OpenTelemetry collector on loopback: a gRPC server implementing OTLP's trace
// service that records every span exported to it.
type fakeOTLP struct {
	collectortrace.UnimplementedTraceServiceServer
	addr  string
	mu    sync.Mutex
	spans []otlpSpan
}

func startOTLP(t *testing.T) *fakeOTLP {
	t.Helper()
	l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(testbed.FreePort(t))))
	if err != nil {
		t.Fatal(err)
	}
	c := &fakeOTLP{addr: l.Addr().String()}
	srv := grpc.NewServer()
	collectortrace.RegisterTraceServiceServer(srv, c)
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(srv.Stop)
	return c
}

func (c *fakeOTLP) Export(_ context.Context, req *collectortrace.ExportTraceServiceRequest) (*collectortrace.ExportTraceServiceResponse, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, rs := range req.GetResourceSpans() {
		resource := attributes(rs.GetResource().GetAttributes())
		for _, ss := range rs.GetScopeSpans() {
			for _, s := range ss.GetSpans() {
				c.spans = append(c.spans, otlpSpan{resource: resource, span: s})
			}
		}
	}
	return &collectortrace.ExportTraceServiceResponse{}, nil
}

func (c *fakeOTLP) received() []otlpSpan {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]otlpSpan(nil), c.spans...)
}

// attributes flattens OTLP attributes to strings (every attribute Envoy sets here is one).
func attributes(kvs []*commonpb.KeyValue) map[string]string {
	out := map[string]string{}
	for _, kv := range kvs {
		out[kv.GetKey()] = kv.GetValue().GetStringValue()
	}
	return out
}

func randomHex(t *testing.T, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// TestE2EOTLPTracing: with EDS_OTLP_ADDR set, a real Envoy exports one span per request through
// an http-mode port to an OTLP/gRPC collector: named after the service's operation, of kind
// SERVER, with the same tags as over Zipkin, under a resource naming the service and the host.
// A request that arrives with W3C trace context (traceparent) continues that trace (its trace ID,
// its span as parent), one without starts a new one, and either way the container receives the
// context to continue it; a request arriving unsampled stays unsampled. The collector may be given
// by address or by name.
func TestE2EOTLPTracing(t *testing.T) {
	for _, byName := range []bool{false, true} {
		t.Run(map[bool]string{false: "by address", true: "by name"}[byName], func(t *testing.T) {
			t.Parallel()
			testOTLPTracing(t, byName)
		})
	}
}

func testOTLPTracing(t *testing.T, byName bool) {
	collector := startOTLP(t)
	addr := collector.addr
	if byName {
		_, port, _ := net.SplitHostPort(addr)
		addr = net.JoinHostPort("localhost", port)
	}
	st := stack.Start(t, stack.Options{OTLP: addr})

	traceparents := make(chan string, 16)
	upstream, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	backend := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		traceparents <- r.Header.Get("Traceparent")
		_, _ = io.WriteString(w, "ok")
	})}
	go func() { _ = backend.Serve(upstream) }()
	t.Cleanup(func() { backend.Close() })

	hostPort := testbed.FreePort(t)
	reg := ready(t, first(st.Register(t, stack.TCP(hostPort, "127.0.0.1", upstream.Addr().(*net.TCPAddr).Port))))
	url := fmt.Sprintf("http://127.0.0.1:%d/", hostPort)
	client := testbed.HTTPClient()

	// send makes one request, with traceparent when not empty, and returns the trace context
	// the container received.
	send := func(traceparent string) (traceID, spanID string) {
		t.Helper()
		req, err := http.NewRequest(http.MethodGet, url, nil)
		if err != nil {
			t.Fatal(err)
		}
		if traceparent != "" {
			req.Header.Set("Traceparent", traceparent)
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("through the published port: %v", err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("through the published port: %s", resp.Status)
		}
		got := <-traceparents
		parts := strings.Split(got, "-")
		if len(parts) != 4 || len(parts[1]) != 32 || len(parts[2]) != 16 {
			t.Fatalf("the container got traceparent %q, want 00-<trace id>-<span id>-<flags>", got)
		}
		return parts[1], parts[2]
	}

	// First a request that arrives unsampled: it must produce no span, which the spans of the
	// later requests, exported after it, show.
	unsampledTrace := randomHex(t, 16)
	if got, _ := send("00-" + unsampledTrace + "-" + randomHex(t, 8) + "-00"); got != unsampledTrace {
		t.Fatalf("the container got trace %s, want the unsampled request's %s", got, unsampledTrace)
	}

	type sent struct{ parent, containerSpan string }
	traces := map[string]sent{} // trace ID -> the parent the client gave, the span the container saw
	const continued, started = 3, 3
	for range continued {
		traceID, parent := randomHex(t, 16), randomHex(t, 8)
		got, span := send("00-" + traceID + "-" + parent + "-01")
		if got != traceID {
			t.Fatalf("the container got trace %s, want the client's %s", got, traceID)
		}
		traces[traceID] = sent{parent: parent, containerSpan: span}
	}
	for range started {
		traceID, span := send("")
		if _, dup := traces[traceID]; dup {
			t.Fatalf("trace %s started twice", traceID)
		}
		traces[traceID] = sent{containerSpan: span}
	}

	var spans []otlpSpan
	testbed.WaitFor(t, 20*time.Second, fmt.Sprintf("%d spans at the collector", len(traces)), func() error {
		if spans = collector.received(); len(spans) < len(traces) {
			return fmt.Errorf("%d spans so far", len(spans))
		}
		return nil
	})
	host, _ := os.Hostname()
	seen := map[string]bool{}
	for _, s := range spans {
		traceID, spanID, parentID := hex.EncodeToString(s.span.GetTraceId()), hex.EncodeToString(s.span.GetSpanId()), hex.EncodeToString(s.span.GetParentSpanId())
		if traceID == unsampledTrace {
			t.Errorf("a span of the unsampled request's trace %s", traceID)
			continue
		}
		want, ok := traces[traceID]
		if !ok {
			t.Errorf("span of trace %s, which no request carried", traceID)
			continue
		}
		seen[traceID] = true
		// The container continues the trace from Envoy's span; a continued trace hangs below
		// the client's span, a new one starts at Envoy.
		if spanID != want.containerSpan || parentID != want.parent {
			t.Errorf("trace %s: span %s with parent %q, want span %s (as the container saw) with parent %q", traceID, spanID, parentID, want.containerSpan, want.parent)
		}
		// Named after the route's decorator (the fallback service name here, without Docker).
		if s.span.GetName() != reg.GetService() || s.span.GetKind() != tracepb.Span_SPAN_KIND_SERVER {
			t.Errorf("span %q of kind %s, want %q, SERVER", s.span.GetName(), s.span.GetKind(), reg.GetService())
		}
		tags := attributes(s.span.GetAttributes())
		if tags["docker.service"] != reg.GetService() || tags["docker.published"] != reg.GetListener() || tags["http.status_code"] != "200" {
			t.Errorf("span attributes %v, want docker.service=%s docker.published=%s http.status_code=200", tags, reg.GetService(), reg.GetListener())
		}
		if s.resource["service.name"] != reg.GetService() || s.resource["host.name"] != host {
			t.Errorf("span resource %v, want service.name=%s host.name=%s", s.resource, reg.GetService(), host)
		}
	}
	if len(seen) != len(traces) {
		t.Errorf("spans of %d traces, want one for each of the %d sampled requests", len(seen), len(traces))
	}
	t.Logf("%d spans, e.g. resource %v, span %v", len(spans), spans[0].resource, spans[0].span)
}
