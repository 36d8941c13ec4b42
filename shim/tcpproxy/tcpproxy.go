// Package tcpproxy is docker-proxy's TCP data plane: accept, dial the container, copy both ways
// with half-close. The shim uses it only for connections that reach the port's socket while
// Envoy does not serve the port (before Envoy takes it over, and while Envoy restarts); Envoy
// carries everything else. Like Envoy, it retries a container that refuses the connection (its
// app is still starting) for a bounded time.
//
// Stopping the accept loop never touches connections already accepted: they run to their end,
// or until Close at shutdown.
package tcpproxy

import (
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/shim/logging"
)

// Proxy forwards accepted connections to one backend (the container).
type Proxy struct {
	backend netip.AddrPort
	log     *logging.Logger
	// retryWindow bounds the retries of a refused connection to the container.
	retryWindow atomic.Int64

	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	closed bool
	wg     sync.WaitGroup
}

// New returns a proxy to backend.
func New(backend netip.AddrPort, log *logging.Logger) *Proxy {
	p := &Proxy{backend: backend, log: log, conns: map[net.Conn]struct{}{}}
	p.retryWindow.Store(int64(DefaultRetryWindow))
	return p
}

// DefaultRetryWindow is the bound of the retries until SetRetryWindow: the server's default
// (EDS_CONNECT_RETRY_WINDOW), which the server tells the shim once registered.
const DefaultRetryWindow = 3 * time.Second

// SetRetryWindow sets how long a connection the container refuses is retried; 0: not at all.
func (p *Proxy) SetRetryWindow(d time.Duration) { p.retryWindow.Store(int64(max(d, 0))) }

// RetryWindow is what SetRetryWindow set.
func (p *Proxy) RetryWindow() time.Duration { return time.Duration(p.retryWindow.Load()) }

// Bounds of the random pause between two connection attempts, as Envoy's (25 ms, growing to
// 250 ms): the app behind the port is expected to start listening within a few seconds.
const (
	retryBase = 25 * time.Millisecond
	retryMax  = 250 * time.Millisecond
)

// dial connects to the container, retrying while it refuses, up to the retry window.
func (p *Proxy) dial() (*net.TCPConn, error) {
	deadline := time.Now().Add(time.Duration(p.retryWindow.Load()))
	for bound := retryBase; ; bound = min(2*bound, retryMax) {
		c, err := net.DialTCP("tcp", nil, net.TCPAddrFromAddrPort(p.backend))
		if err == nil || !errors.Is(err, syscall.ECONNREFUSED) {
			return c, err
		}
		wait := time.Duration(rand.Int64N(int64(bound)))
		if time.Now().Add(wait).After(deadline) {
			return nil, err
		}
		time.Sleep(wait)
	}
}

// Serve accepts on l until Accept fails (l closed or shut down) and proxies every connection.
// It returns the error that stopped it.
func (p *Proxy) Serve(l net.Listener) error {
	for {
		c, err := l.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			if errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) || errors.Is(err, syscall.ENOBUFS) ||
				errors.Is(err, syscall.ENOMEM) || errors.Is(err, syscall.ECONNABORTED) {
				// Out of resources for a moment: the connection stays queued; try again shortly.
				p.log.Warn("accepting a connection", "err", err)
				time.Sleep(10 * time.Millisecond)
				continue
			}
			return err
		}
		if !p.track(c) {
			c.Close()
			continue
		}
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			defer p.untrack(c)
			p.forward(c.(*net.TCPConn))
		}()
	}
}

func (p *Proxy) forward(client *net.TCPConn) {
	backend, err := p.dial()
	if err != nil {
		p.log.Warn("cannot forward a connection to the container", "container", p.backend, "err", err)
		client.Close()
		return
	}
	if !p.track(backend) {
		client.Close()
		backend.Close()
		return
	}
	defer p.untrack(backend)
	var wg sync.WaitGroup
	pipe := func(to, from *net.TCPConn) {
		defer wg.Done()
		io.Copy(to, from)
		from.CloseRead()
		to.CloseWrite()
	}
	wg.Add(2)
	go pipe(client, backend)
	go pipe(backend, client)
	wg.Wait()
	client.Close()
	backend.Close()
}

func (p *Proxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.conns[c] = struct{}{}
	return true
}

func (p *Proxy) untrack(c net.Conn) {
	p.mu.Lock()
	delete(p.conns, c)
	p.mu.Unlock()
}

// Active is the number of connections being forwarded (each counts its two sides).
func (p *Proxy) Active() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.conns)
}

// Close ends every forwarded connection and waits for their goroutines. The listener is the
// caller's to close.
func (p *Proxy) Close() {
	p.mu.Lock()
	p.closed = true
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}
