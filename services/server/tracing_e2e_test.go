package server_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/services/envoyconfig"
	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
	"github.com/envoy-docker-shim/envoy-docker-shim/testbed/stack"
)

// zipkinSpan is what the test reads of Zipkin's v2 span format.
type zipkinSpan struct {
	TraceID       string            `json:"traceId"`
	ID            string            `json:"id"`
	Name          string            `json:"name"`
	Kind          string            `json:"kind"`
	Tags          map[string]string `json:"tags"`
	LocalEndpoint struct {
		ServiceName string `json:"serviceName"`
	} `json:"localEndpoint"`
}

// fakeZipkin is a trace collector on loopback: it records the spans posted to Zipkin's v2 API.
type fakeZipkin struct {
	addr  string
	mu    sync.Mutex
	spans []zipkinSpan
}

func startZipkin(t *testing.T) *fakeZipkin {
	t.Helper()
	l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(testbed.FreePort(t))))
	if err != nil {
		t.Fatal(err)
	}
	z := &fakeZipkin{addr: l.Addr().String()}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || r.URL.Path != envoyconfig.ZipkinPath {
			http.NotFound(w, r)
			return
		}
		var spans []zipkinSpan
		if err := json.NewDecoder(r.Body).Decode(&spans); err != nil {
			t.Errorf("collector got a body that is not Zipkin v2 JSON: %v", err)
		}
		z.mu.Lock()
		z.spans = append(z.spans, spans...)
		z.mu.Unlock()
		w.WriteHeader(http.StatusAccepted)
	})}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { srv.Close() })
	return z
}

func (z *fakeZipkin) received() []zipkinSpan {
	z.mu.Lock()
	defer z.mu.Unlock()
	return append([]zipkinSpan(nil), z.spans...)
}

// TestE2ETracing: with EDS_ZIPKIN_ADDR set, a real Envoy sends one span per request through an
// http-mode port to the collector, named after the service's operation and tagged with the
// service, and passes the trace context (B3 headers) on to the container. The collector may be
// given by address or by name.
func TestE2ETracing(t *testing.T) {
	for _, byName := range []bool{false, true} {
		t.Run(map[bool]string{false: "by address", true: "by name"}[byName], func(t *testing.T) {
			t.Parallel()
			testTracing(t, byName)
		})
	}
}

func testTracing(t *testing.T, byName bool) {
	zipkin := startZipkin(t)
	addr := zipkin.addr
	if byName {
		_, port, _ := net.SplitHostPort(addr)
		addr = net.JoinHostPort("localhost", port)
	}
	st := stack.Start(t, stack.Options{Zipkin: addr})

	traceIDs := make(chan string, 16)
	upstream, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	backend := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		traceIDs <- r.Header.Get("X-B3-Traceid")
		_, _ = io.WriteString(w, "ok")
	})}
	go func() { _ = backend.Serve(upstream) }()
	t.Cleanup(func() { backend.Close() })

	hostPort := testbed.FreePort(t)
	resp, _ := st.Register(t, stack.TCP(hostPort, "127.0.0.1", upstream.Addr().(*net.TCPAddr).Port))
	reg := resp.GetReady().GetRegistration()
	if reg == nil {
		t.Fatalf("not ready: %v", resp)
	}
	const requests = 5 // Envoy's Zipkin tracer sends spans in batches of 5 (or every 5 s)
	sent := map[string]bool{}
	for range requests {
		if status, _, err := testbed.HTTPGet(context.Background(), fmt.Sprintf("http://127.0.0.1:%d/", hostPort)); err != nil || status != 200 {
			t.Fatalf("through the published port: %d %v", status, err)
		}
		id := <-traceIDs
		if len(id) != 32 {
			t.Fatalf("the container got X-B3-TraceId %q, want a 128-bit trace id", id)
		}
		sent[id] = true
	}
	var spans []zipkinSpan
	testbed.WaitFor(t, 15*time.Second, "5 spans at the collector", func() error {
		if spans = zipkin.received(); len(spans) < requests {
			return fmt.Errorf("%d spans so far", len(spans))
		}
		return nil
	})
	for _, s := range spans {
		if !sent[s.TraceID] {
			t.Errorf("span of trace %s, which no request to the container carried", s.TraceID)
		}
		// The span is named after the route's decorator: ServiceName with labels, and without
		// Docker (as here) the fallback service name.
		if s.Name != reg.GetService() || s.Kind != "SERVER" {
			t.Errorf("span %q of kind %s, want %q, SERVER", s.Name, s.Kind, reg.GetService())
		}
		if s.Tags["docker.service"] != reg.GetService() || s.Tags["docker.published"] != reg.GetListener() || s.Tags["http.status_code"] != "200" {
			t.Errorf("span tags %v, want docker.service=%s docker.published=%s http.status_code=200", s.Tags, reg.GetService(), reg.GetListener())
		}
	}
	t.Logf("%d spans, e.g. %+v", len(spans), spans[0])
}
