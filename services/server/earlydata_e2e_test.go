package server_test

import (
	"bytes"
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/services/envoyconfig"
	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
	"github.com/envoy-docker-shim/envoy-docker-shim/testbed/stack"
)

// testEarlyData: in TCP mode Envoy reads what a client sends while it is still connecting to the
// container (envoyconfig.EarlyDataBytes) instead of leaving it in the kernel. A client that sends
// three times that much and half-closes while the app is not listening yet gets every byte back,
// in order, once the app listens: the early bytes, those held back beyond the buffer, and the
// end of the stream all reach the app across Envoy's connect retries.
func testEarlyData(t *testing.T, st *stack.Stack, daemon *testbed.Daemon, db *testbed.Container) {
	const lateBy = 300 * time.Millisecond
	port := testbed.FreePort(t)
	appPort := testbed.FreePort(t)
	ready(t, first(st.Register(t, stack.TCP(port, db.IP.String(), appPort))))
	go func() {
		time.Sleep(lateBy)
		_, _ = daemon.Docker(context.Background(), "exec", "-d", "-e", "ECHO_HTTP_PORTS=", "-e", "ECHO_UDP_PORTS=",
			"-e", fmt.Sprintf("ECHO_TCP_PORTS=%d", appPort), db.ID, "/echoserver")
	}()
	payload := make([]byte, 3*envoyconfig.EarlyDataBytes+1)
	for i := range payload {
		payload[i] = byte(i % 251)
	}
	start := time.Now()
	got, err := testbed.TCPEcho(context.Background(), fmt.Sprintf("127.0.0.1:%d", port), payload)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, payload) {
		t.Fatalf("echoed %d bytes, want the %d sent", len(got), len(payload))
	}
	if took := time.Since(start); took < lateBy {
		t.Fatalf("answered after %v, before the app listened (%v): the app was not late", took, lateBy)
	}
}
