package testbed

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"
)

// tcpProxyBootstrap is a static Envoy that forwards one loopback port to a container's echo port.
func tcpProxyBootstrap(listenPort int, upstream string) string {
	return fmt.Sprintf(`admin:
  address:
    socket_address: {address: 127.0.0.1, port_value: %s}
static_resources:
  listeners:
  - name: echo_tcp
    address:
      socket_address: {address: 127.0.0.1, port_value: %d}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: echo_tcp
          cluster: echo
  clusters:
  - name: echo
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: echo
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {address: %s, port_value: 7}
`, AdminPortPlaceholder, listenPort, upstream)
}

// TestEnvoyToContainer proves the Envoy half of the harness: a real Envoy carries loopback
// traffic to a container on the test bridge byte for byte, and its admin interface and stats can
// be read.
func TestEnvoyToContainer(t *testing.T) {
	t.Parallel()
	RequireDocker(t)
	EnvoyBinary(t)
	d := StartDaemon(t, DaemonOptions{})
	c := d.Run(t, RunOptions{})
	listen := FreePort(t)
	e := StartEnvoy(t, EnvoyOptions{Bootstrap: tcpProxyBootstrap(listen, c.IP.String())})
	if e.Pid() == 0 || e.BaseID <= envoyBaseIDOffset {
		t.Fatalf("envoy pid %d, base ID %d", e.Pid(), e.BaseID)
	}
	if !strings.Contains(string(e.Admin(t, "/listeners")), "echo_tcp") {
		t.Fatalf("/listeners lacks echo_tcp: %s", e.Admin(t, "/listeners"))
	}

	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(listen))
	WaitFor(t, 10*time.Second, "WHOAMI through Envoy", func() error {
		got, err := TCPEcho(t.Context(), addr, []byte("WHOAMI\n"))
		if err != nil {
			return err
		}
		return wantName(string(got), c.Name+"\n")
	})
	payload := make([]byte, 1<<20)
	_, _ = rand.Read(payload)
	got, err := TCPEcho(t.Context(), addr, payload)
	if err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("echo of %d bytes through Envoy returned %d bytes, %v", len(payload), len(got), err)
	}
	WaitFor(t, 5*time.Second, "Envoy's byte counters", func() error {
		sent, ok := e.Stat(t, "cluster.echo.upstream_cx_tx_bytes_total")
		if !ok || sent < int64(len(payload)) {
			return fmt.Errorf("cluster.echo.upstream_cx_tx_bytes_total = %d (present: %v), want >= %d", sent, ok, len(payload))
		}
		return nil
	})
	if _, ok := e.Stat(t, "cluster.echo.no_such_stat"); ok {
		t.Error("Stat found a stat that does not exist")
	}

	e.Stop(t)
	if _, err := TCPEcho(t.Context(), addr, []byte("x")); err == nil {
		t.Error("Envoy's listener still answers after Stop")
	}
}
