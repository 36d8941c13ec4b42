package testbed

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// defaultIOTimeout bounds a traffic helper whose context has no deadline: a test must fail, not
// hang, when a proxy swallows a connection.
const defaultIOTimeout = 10 * time.Second

// ErrForbiddenTarget is returned for traffic to anything but loopback or a live test bridge.
var ErrForbiddenTarget = errors.New("testbed: forbidden traffic target")

// bridgeNets holds the subnets of the live daemons of this process: their containers are the only
// non-loopback addresses tests may reach. A count per prefix, since instances come and go.
var bridgeNets = struct {
	sync.Mutex
	count map[netip.Prefix]int
}{count: map[netip.Prefix]int{}}

func allowNet(p netip.Prefix) {
	bridgeNets.Lock()
	defer bridgeNets.Unlock()
	bridgeNets.count[p.Masked()]++
}

func disallowNet(p netip.Prefix) {
	bridgeNets.Lock()
	defer bridgeNets.Unlock()
	if bridgeNets.count[p.Masked()]--; bridgeNets.count[p.Masked()] <= 0 {
		delete(bridgeNets.count, p.Masked())
	}
}

func allowedNets() []netip.Prefix {
	bridgeNets.Lock()
	defer bridgeNets.Unlock()
	out := make([]netip.Prefix, 0, len(bridgeNets.count))
	for p := range bridgeNets.count {
		out = append(out, p)
	}
	return out
}

// checkAddr is the traffic rule: loopback, or an address inside one of nets (never the network or
// gateway address of those: the gateway is the host itself, reached that way only by mistake).
func checkAddr(a netip.Addr, nets []netip.Prefix) error {
	a = a.Unmap()
	if a.IsLoopback() {
		return nil
	}
	for _, p := range nets {
		if p.Contains(a) && a != p.Masked().Addr() {
			return nil
		}
	}
	return fmt.Errorf("%w: %s is neither loopback nor on a live test bridge %v", ErrForbiddenTarget, a, nets)
}

// checkHostPort vets a dial target before any name lookup: only IP literals and "localhost" are
// accepted, because resolving any other name would itself send a DNS query off the machine.
func checkHostPort(hostport string, nets []netip.Prefix) error {
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		return fmt.Errorf("%w: %q: %v", ErrForbiddenTarget, hostport, err)
	}
	if strings.EqualFold(host, "localhost") {
		return nil
	}
	a, err := netip.ParseAddr(host)
	if err != nil {
		return fmt.Errorf("%w: %q is not an IP address or localhost", ErrForbiddenTarget, host)
	}
	return checkAddr(a, nets)
}

// CheckTarget returns an error wrapping ErrForbiddenTarget unless hostport ("127.0.0.1:80",
// "[::1]:80", "localhost:80", or a container on a live test bridge) may receive test traffic.
func CheckTarget(hostport string) error {
	return checkHostPort(hostport, allowedNets())
}

// guardedDialer re-checks the address actually dialled, after name resolution and on redirects.
var guardedDialer = &net.Dialer{
	Timeout: defaultIOTimeout,
	Control: func(network, address string, _ syscall.RawConn) error {
		ap, err := netip.ParseAddrPort(address)
		if err != nil {
			return fmt.Errorf("%w: %s", ErrForbiddenTarget, address)
		}
		return checkAddr(ap.Addr(), allowedNets())
	},
}

// Dial connects like net.Dialer.DialContext, but only to targets CheckTarget allows.
func Dial(ctx context.Context, network, address string) (net.Conn, error) {
	if err := CheckTarget(address); err != nil {
		return nil, err
	}
	return guardedDialer.DialContext(ctx, network, address)
}

// HTTPClient returns a client that dials only allowed targets, ignores proxy settings from the
// environment (a proxy would be a forbidden target) and keeps no idle connections between tests.
func HTTPClient() *http.Client {
	return &http.Client{Transport: &http.Transport{
		Proxy:             nil,
		DialContext:       Dial,
		DisableKeepAlives: true,
	}}
}

// withDefaultTimeout gives ctx a deadline if it has none.
func withDefaultTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, defaultIOTimeout)
}

// HTTPGet fetches url and returns the status and body (at most 8 MiB).
func HTTPGet(ctx context.Context, url string) (status int, body string, err error) {
	ctx, cancel := withDefaultTimeout(ctx)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, "", fmt.Errorf("GET %s: %w", url, err)
	}
	resp, err := HTTPClient().Do(req)
	if err != nil {
		return 0, "", fmt.Errorf("GET %s: %w", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	if err != nil {
		return resp.StatusCode, string(b), fmt.Errorf("GET %s: reading body: %w", url, err)
	}
	return resp.StatusCode, string(b), nil
}

// deadlineConn ties a connection's deadline to ctx, so a cancelled test unblocks its reads.
func deadlineConn(ctx context.Context, c net.Conn) (stop func() bool) {
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	return context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Unix(1, 0)) })
}

// TCPEcho connects to addr, sends payload, half-closes, and returns everything received until the
// server closes. Against the echo server that is payload itself, or the container's name and a
// newline for "WHOAMI\n".
func TCPEcho(ctx context.Context, addr string, payload []byte) ([]byte, error) {
	return tcpEcho(ctx, func(ctx context.Context) (net.Conn, error) { return Dial(ctx, "tcp", addr) }, addr, payload)
}

func tcpEcho(ctx context.Context, dial func(context.Context) (net.Conn, error), addr string, payload []byte) ([]byte, error) {
	ctx, cancel := withDefaultTimeout(ctx)
	defer cancel()
	c, err := dial(ctx)
	if err != nil {
		return nil, fmt.Errorf("tcp echo %s: %w", addr, err)
	}
	defer c.Close()
	defer deadlineConn(ctx, c)()
	if _, err := c.Write(payload); err != nil {
		return nil, fmt.Errorf("tcp echo %s: write: %w", addr, err)
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		return nil, fmt.Errorf("tcp echo %s: half-close: %w", addr, err)
	}
	got, err := io.ReadAll(c)
	if err != nil {
		return got, fmt.Errorf("tcp echo %s: read after %d bytes: %w", addr, len(got), err)
	}
	return got, nil
}

// UDPEcho sends one datagram to addr and returns the first datagram that comes back. A closed
// port shows as an error (ICMP port unreachable reads as "connection refused") or a timeout.
func UDPEcho(ctx context.Context, addr string, payload []byte) ([]byte, error) {
	return udpEcho(ctx, func(ctx context.Context) (net.Conn, error) { return Dial(ctx, "udp", addr) }, addr, payload)
}

func udpEcho(ctx context.Context, dial func(context.Context) (net.Conn, error), addr string, payload []byte) ([]byte, error) {
	ctx, cancel := withDefaultTimeout(ctx)
	defer cancel()
	c, err := dial(ctx)
	if err != nil {
		return nil, fmt.Errorf("udp echo %s: %w", addr, err)
	}
	defer c.Close()
	defer deadlineConn(ctx, c)()
	if _, err := c.Write(payload); err != nil {
		return nil, fmt.Errorf("udp echo %s: write: %w", addr, err)
	}
	buf := make([]byte, 65535)
	n, err := c.Read(buf)
	if err != nil {
		return nil, fmt.Errorf("udp echo %s: read: %w", addr, err)
	}
	return buf[:n], nil
}

// WaitFor polls cond until it returns nil, failing the test with cond's last error once timeout
// has passed.
func WaitFor(t testing.TB, timeout time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	interval := 20 * time.Millisecond
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s: %v", timeout, what, err)
			return
		}
		time.Sleep(interval)
		interval = min(interval*2, 250*time.Millisecond)
	}
}
