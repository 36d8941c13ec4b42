package udpproxy

import (
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/shim/logging"
)

var quiet = logging.Discard()

// echo is a UDP echo server standing in for the container; it records the sources it saw.
type echo struct {
	conn *net.UDPConn
	mu   sync.Mutex
	from map[netip.AddrPort]int
}

func startEcho(t *testing.T, addr string) *echo {
	t.Helper()
	c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.MustParseAddrPort(addr)))
	if err != nil {
		t.Fatal(err)
	}
	e := &echo{conn: c, from: map[netip.AddrPort]int{}}
	go func() {
		buf := make([]byte, BufSize)
		for {
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			e.mu.Lock()
			e.from[from]++
			e.mu.Unlock()
			c.WriteToUDPAddrPort(buf[:n], from)
		}
	}()
	t.Cleanup(func() { c.Close() })
	return e
}

func (e *echo) addr() netip.AddrPort { return netip.MustParseAddrPort(e.conn.LocalAddr().String()) }

func (e *echo) sources() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.from)
}

func startProxy(t *testing.T, host string, backend netip.AddrPort, idle ...time.Duration) (*Proxy, netip.AddrPort) {
	t.Helper()
	front, err := Listen(netip.MustParseAddrPort(host))
	if err != nil {
		t.Fatal(err)
	}
	p, err := New(front, backend, quiet)
	if err != nil {
		t.Fatal(err)
	}
	if len(idle) > 0 {
		p.idle = idle[0]
	}
	done := make(chan error)
	go func() { done <- p.Run() }()
	t.Cleanup(func() {
		p.Close()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return p, netip.MustParseAddrPort(front.LocalAddr().String())
}

func roundTrips(t *testing.T, c *net.UDPConn, n int) {
	t.Helper()
	buf := make([]byte, BufSize)
	for i := range n {
		msg := fmt.Sprintf("datagram %d", i)
		c.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := c.Write([]byte(msg)); err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
		k, err := c.Read(buf)
		if err != nil || string(buf[:k]) != msg {
			t.Fatalf("datagram %d: got %q, %v", i, buf[:k], err)
		}
	}
}

func TestEchoThousandDatagrams(t *testing.T) {
	for _, tc := range []struct{ name, host, backend string }{
		{"ipv4", "127.0.0.1:0", "127.0.0.1:0"},
		{"ipv6", "[::1]:0", "[::1]:0"},
		{"ipv6 host to ipv4 container", "[::1]:0", "127.0.0.1:0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := startEcho(t, tc.backend)
			_, front := startProxy(t, tc.host, e.addr())
			c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(front))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			roundTrips(t, c, 1000)
		})
	}
}

func TestLargestDatagram(t *testing.T) {
	e := startEcho(t, "127.0.0.1:0")
	_, front := startProxy(t, "127.0.0.1:0", e.addr())
	c, _ := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(front))
	defer c.Close()
	big := make([]byte, BufSize)
	for i := range big {
		big[i] = byte(i)
	}
	c.SetDeadline(time.Now().Add(2 * time.Second))
	c.Write(big)
	got := make([]byte, BufSize+1)
	n, err := c.Read(got)
	if err != nil || n != BufSize || string(got[:n]) != string(big) {
		t.Fatalf("got %d bytes, %v", n, err)
	}
}

// Contract: "per-client connection table keyed by client address and port, each with its own
// connected socket to the container".
func TestFlowPerClient(t *testing.T) {
	e := startEcho(t, "127.0.0.1:0")
	p, front := startProxy(t, "127.0.0.1:0", e.addr())
	for range 3 {
		c, _ := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(front))
		roundTrips(t, c, 5)
		c.Close()
	}
	if p.Flows() != 3 || e.sources() != 3 {
		t.Fatalf("flows = %d, container saw %d sources; want 3 and 3", p.Flows(), e.sources())
	}
}

// Contract: "replies sent from the address the client sent to". The proxy listens on 0.0.0.0 and
// the client sends to 127.0.0.2: a reply from 127.0.0.1 would be dropped by the client's connected socket.
func TestRepliesComeFromTheAddressTheClientSentTo(t *testing.T) {
	e := startEcho(t, "127.0.0.1:0")
	_, front := startProxy(t, "0.0.0.0:0", e.addr())
	to := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.2"), front.Port())
	c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(to))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	roundTrips(t, c, 3)
}

// Contract: "ECONNREFUSED from the container ignored": a container that starts listening late
// gets the client's later datagrams on the same flow.
func TestRefusedByContainerIsIgnored(t *testing.T) {
	probe, _ := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	backend := netip.MustParseAddrPort(probe.LocalAddr().String())
	probe.Close()
	p, front := startProxy(t, "127.0.0.1:0", backend)
	c, _ := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(front))
	defer c.Close()
	for range 3 {
		c.Write([]byte("nobody home"))
	}
	time.Sleep(100 * time.Millisecond)
	if p.Flows() != 1 {
		t.Fatalf("flows = %d after refusals, want 1", p.Flows())
	}
	startEcho(t, backend.String())
	roundTrips(t, c, 3)
}

// Contract: "90 s idle timeout" (shortened here): an idle flow ends, an active one does not.
func TestIdleFlowsEnd(t *testing.T) {
	e := startEcho(t, "127.0.0.1:0")
	p, front := startProxy(t, "127.0.0.1:0", e.addr(), 300*time.Millisecond)
	if IdleTimeout != 90*time.Second {
		t.Fatalf("IdleTimeout = %s", IdleTimeout)
	}
	active, _ := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(front))
	idle, _ := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(front))
	roundTrips(t, idle, 1)
	for range 8 {
		roundTrips(t, active, 1)
		time.Sleep(100 * time.Millisecond)
	}
	if p.Flows() != 1 {
		t.Fatalf("flows = %d, want only the active one", p.Flows())
	}
	roundTrips(t, idle, 1) // a new flow for a returning client
	if p.Flows() != 2 {
		t.Fatalf("flows = %d, want 2", p.Flows())
	}
}

// Contract (bind-yourself era): "reports EADDRINUSE promptly ... in docker-proxy's wording".
func TestListenPortInUse(t *testing.T) {
	taken, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	addr := netip.MustParseAddrPort(taken.LocalAddr().String())
	_, err = Listen(addr)
	want := fmt.Sprintf("failed to listen on %s: listen udp4 %s: bind: address already in use", addr, addr)
	if err == nil || err.Error() != want {
		t.Fatalf("err = %v\nwant %s", err, want)
	}
}

// The counters the shim reports: every datagram and byte each way, live and started flows. A
// datagram the container never answers counts in, not out.
func TestStats(t *testing.T) {
	e := startEcho(t, "127.0.0.1:0")
	p, front := startProxy(t, "127.0.0.1:0", e.addr())
	if got := p.Stats(); got != (Stats{}) {
		t.Fatalf("before any traffic: %+v", got)
	}
	var bytes uint64
	for i := range 1000 {
		bytes += uint64(len(fmt.Sprintf("datagram %d", i)))
	}
	a, _ := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(front))
	defer a.Close()
	b, _ := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(front))
	defer b.Close()
	roundTrips(t, a, 1000)
	roundTrips(t, b, 1000)
	want := Stats{InDatagrams: 2000, InBytes: 2 * bytes, OutDatagrams: 2000, OutBytes: 2 * bytes, Flows: 2, FlowsTotal: 2}
	if got := p.Stats(); got != want {
		t.Fatalf("after 2 × 1000 round trips: %+v, want %+v", got, want)
	}
}
