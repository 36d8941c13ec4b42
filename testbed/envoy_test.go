package testbed

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"
)

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
	e := StartEnvoy(t, EnvoyOptions{Bootstrap: TCPProxyBootstrap("echo", netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(listen)), netip.AddrPortFrom(c.IP, 7))})
	if e.Pid() == 0 || e.BaseID <= envoyBaseIDOffset {
		t.Fatalf("envoy pid %d, base ID %d", e.Pid(), e.BaseID)
	}
	if !strings.Contains(string(e.Admin(t, "/listeners")), "echo::") {
		t.Fatalf("/listeners lacks echo: %s", e.Admin(t, "/listeners"))
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
