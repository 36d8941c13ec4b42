package tcpproxy

import (
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/shim/logging"

	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
)

// Contract (docker-proxy's data plane): "TCP: accept, dial the container, copy both ways with
// half-close". The client half-closes after its request; the backend answers after reading EOF.
func TestForwardsWithHalfClose(t *testing.T) {
	backend, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer backend.Close()
	go func() {
		c, err := backend.Accept()
		if err != nil {
			return
		}
		req, _ := io.ReadAll(c) // until the client's half-close arrives
		c.Write(append([]byte("got:"), req...))
		c.Close()
	}()
	front, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := New(netip.MustParseAddrPort(backend.Addr().String()), logging.Discard())
	served := make(chan error)
	go func() { served <- p.Serve(front) }()

	c, err := net.Dial("tcp4", front.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	c.Write([]byte("hello"))
	c.(*net.TCPConn).CloseWrite()
	resp, err := io.ReadAll(c)
	if err != nil || string(resp) != "got:hello" {
		t.Fatalf("response %q, %v", resp, err)
	}
	c.Close()

	front.Close()
	if err := <-served; err == nil {
		t.Fatal("Serve returned nil after its listener closed")
	}
	p.Close()
	if n := p.Active(); n != 0 {
		t.Errorf("%d connections left", n)
	}
}

func TestUnreachableBackendClosesClient(t *testing.T) {
	addr := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(testbed.FreePort(t))) // nothing listens there
	front, _ := net.Listen("tcp4", "127.0.0.1:0")
	defer front.Close()
	p := New(addr, logging.Discard())
	defer p.Close()
	go p.Serve(front)
	c, err := net.Dial("tcp4", front.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatal("read succeeded")
	}
}
