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

// Like Envoy (EDS_CONNECT_RETRY_WINDOW), the shim retries a container that refuses while its app
// starts, within the window; with no window it fails at once, as docker-proxy does.
func TestRetriesARefusingContainer(t *testing.T) {
	for _, tc := range []struct {
		name        string
		window      time.Duration
		listenAfter time.Duration // 0: never
		served      bool
		within      time.Duration
	}{
		{"app listens 300 ms late", 3 * time.Second, 300 * time.Millisecond, true, 2 * time.Second},
		{"app never listens", 400 * time.Millisecond, 0, false, 400*time.Millisecond + 300*time.Millisecond},
		{"no window", 0, 300 * time.Millisecond, false, 100 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// A free port nobody listens on yet.
			probe, err := net.Listen("tcp4", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			backendAddr := probe.Addr().String()
			probe.Close()
			front, err := net.Listen("tcp4", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			p := New(netip.MustParseAddrPort(backendAddr), logging.Discard())
			p.SetRetryWindow(tc.window)
			go p.Serve(front)
			defer func() { front.Close(); p.Close() }()

			start := time.Now()
			c, err := net.Dial("tcp4", front.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if tc.listenAfter > 0 {
				listening := make(chan net.Listener, 1)
				defer func() {
					if l := <-listening; l != nil {
						l.Close()
					}
				}()
				time.AfterFunc(tc.listenAfter, func() {
					backend, err := net.Listen("tcp4", backendAddr)
					if err != nil {
						listening <- nil
						return // the test then fails on the answer
					}
					listening <- backend
					go func() {
						for {
							b, err := backend.Accept()
							if err != nil {
								return
							}
							b.Write([]byte("app"))
							b.Close()
						}
					}()
				})
			}
			c.SetDeadline(time.Now().Add(5 * time.Second))
			got, _ := io.ReadAll(c)
			took := time.Since(start)
			if served := string(got) == "app"; served != tc.served {
				t.Fatalf("answer %q after %v; want served=%v", got, took, tc.served)
			}
			if took > tc.within {
				t.Errorf("took %v, want at most %v", took, tc.within)
			}
		})
	}
}
