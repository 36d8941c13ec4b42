// Package udpproxy is the shim's UDP data plane, with docker-proxy's semantics: a flow per client
// address and port, each with its own connected socket to the container; a flow ends after 90 s
// without traffic; 65,507-byte buffers; replies leave from the address the client sent to (read
// from IP_PKTINFO / IPV6_PKTINFO, which matters on multi-homed hosts); ECONNREFUSED from the
// container (nothing listening yet) is ignored.
//
// It works in both daemon eras: Listen binds the host port itself (daemon 27 and earlier) and
// File adopts the socket dockerd 28+ passes on fd 4. It never depends on envoy-docker-server:
// UDP keeps working while the server is down.
package udpproxy

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/shim/logging"

	"golang.org/x/sys/unix"
)

const (
	// IdleTimeout ends a flow with no datagram in either direction (docker-proxy's conntrack timeout).
	IdleTimeout = 90 * time.Second
	// BufSize is docker-proxy's datagram buffer: the largest UDP payload over IPv4.
	BufSize = 65507
)

// Listen binds host the way docker-proxy does (udp4, or udp6 with IPV6_V6ONLY) and turns on
// packet info. A port in use fails at once, in docker-proxy's words.
func Listen(host netip.AddrPort) (*net.UDPConn, error) {
	network := "udp4"
	if host.Addr().Is6() {
		network = "udp6" // Go sets IPV6_V6ONLY for udp6
	}
	c, err := net.ListenUDP(network, net.UDPAddrFromAddrPort(host))
	if err != nil {
		return nil, fmt.Errorf("failed to listen on %s: %w", host, err)
	}
	return c, nil
}

// File adopts the bound UDP socket dockerd 28+ passes (fd 4) for host. f is closed; the returned
// conn holds a duplicate.
func File(f *os.File, host netip.AddrPort) (*net.UDPConn, error) {
	defer f.Close()
	pc, err := net.FilePacketConn(f)
	if err != nil {
		return nil, fmt.Errorf("fd 4 is not a UDP socket (-use-listen-fd with -proto udp): %w", err)
	}
	c, ok := pc.(*net.UDPConn)
	if !ok {
		pc.Close()
		return nil, fmt.Errorf("fd 4 is a %s socket, not UDP (-use-listen-fd with -proto udp)", pc.LocalAddr().Network())
	}
	if got, _ := netip.ParseAddrPort(c.LocalAddr().String()); got.Addr().Unmap() != host.Addr() || got.Port() != host.Port() {
		c.Close()
		return nil, fmt.Errorf("the socket passed on fd 4 is bound to %s, not to %s", got, host)
	}
	return c, nil
}

// Proxy forwards datagrams between clients on a host socket and one container address.
type Proxy struct {
	front   *net.UDPConn
	v6      bool // the host socket's family (decides the packet-info format)
	backend netip.AddrPort
	log     *logging.Logger
	idle    time.Duration

	mu     sync.Mutex
	flows  map[netip.AddrPort]*flow
	closed bool
	wg     sync.WaitGroup

	// Counters since the shim started, read by Stats while the proxy runs.
	inDatagrams, inBytes, outDatagrams, outBytes, flowsTotal atomic.Uint64
}

// Stats are a proxy's counters since it started: what the shim reports to envoy-docker-server,
// cumulative, so that a lost report loses nothing.
type Stats struct {
	// In: datagrams (and their payload bytes) received from clients.
	InDatagrams, InBytes uint64
	// Out: datagrams (and their payload bytes) from the container, sent back to clients.
	OutDatagrams, OutBytes uint64
	// Flows is the number of live flows; FlowsTotal counts every flow started.
	Flows      int
	FlowsTotal uint64
}

// Stats returns the proxy's counters.
func (p *Proxy) Stats() Stats {
	return Stats{
		InDatagrams: p.inDatagrams.Load(), InBytes: p.inBytes.Load(),
		OutDatagrams: p.outDatagrams.Load(), OutBytes: p.outBytes.Load(),
		Flows: p.Flows(), FlowsTotal: p.flowsTotal.Load(),
	}
}

type flow struct {
	conn   *net.UDPConn   // connected to the container
	client netip.AddrPort // where replies go
	oob    []byte         // packet info setting the reply's source address
	last   time.Time      // last datagram either way; guarded by Proxy.mu
	ended  bool           // guarded by Proxy.mu
}

// New returns a proxy on front (from Listen or File) to backend, and turns on packet info.
func New(front *net.UDPConn, backend netip.AddrPort, log *logging.Logger) (*Proxy, error) {
	local, _ := netip.ParseAddrPort(front.LocalAddr().String())
	p := &Proxy{front: front, v6: local.Addr().Is6() && !local.Addr().Is4In6(), backend: backend, log: log, idle: IdleTimeout, flows: map[netip.AddrPort]*flow{}}
	level, opt := unix.IPPROTO_IP, unix.IP_PKTINFO
	if p.v6 {
		level, opt = unix.IPPROTO_IPV6, unix.IPV6_RECVPKTINFO
	}
	raw, err := front.SyscallConn()
	if err == nil {
		cerr := raw.Control(func(fd uintptr) { err = unix.SetsockoptInt(int(fd), level, opt, 1) })
		err = errors.Join(cerr, err)
	}
	if err != nil {
		return nil, fmt.Errorf("failed to enable packet info on %s: %w", local, err)
	}
	return p, nil
}

// Run forwards datagrams until Close; then it returns nil.
func (p *Proxy) Run() error {
	buf := make([]byte, BufSize)
	oob := make([]byte, unix.CmsgSpace(unix.SizeofInet6Pktinfo)) // room for either family's
	for {
		n, oobn, _, from, err := p.front.ReadMsgUDPAddrPort(buf, oob)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("reading from %s: %w", p.front.LocalAddr(), err)
		}
		p.inDatagrams.Add(1)
		p.inBytes.Add(uint64(n))
		f, err := p.flowFor(from, oob[:oobn])
		if err != nil {
			p.log.Warn("cannot proxy a datagram to the container", "container", p.backend, "client", from, "err", err)
			continue
		}
		if f == nil {
			return nil // closed
		}
		if _, err := f.conn.Write(buf[:n]); err != nil && !errors.Is(err, syscall.ECONNREFUSED) && !errors.Is(err, net.ErrClosed) {
			p.log.Debug("cannot proxy a datagram to the container", "container", p.backend, "err", err)
		}
	}
}

// flowFor returns the live flow of client, creating it. It marks the flow active under the lock,
// so an idle flow cannot end between this and the write.
func (p *Proxy) flowFor(client netip.AddrPort, oob []byte) (*flow, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil, nil
	}
	if f, ok := p.flows[client]; ok {
		f.last = time.Now()
		return f, nil
	}
	conn, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(p.backend))
	if err != nil {
		return nil, err
	}
	f := &flow{conn: conn, client: client, oob: p.replySource(oob), last: time.Now()}
	p.flows[client] = f
	p.flowsTotal.Add(1)
	p.wg.Add(1)
	go p.replies(f)
	return f, nil
}

// replySource turns the packet info of a client's datagram into the control message that sends
// replies from the address the client sent to. Without packet info the kernel picks the source.
func (p *Proxy) replySource(oob []byte) []byte {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil
	}
	for _, m := range msgs {
		switch {
		case !p.v6 && m.Header.Level == unix.IPPROTO_IP && m.Header.Type == unix.IP_PKTINFO && len(m.Data) >= unix.SizeofInet4Pktinfo:
			// struct in_pktinfo { int ipi_ifindex; struct in_addr ipi_spec_dst, ipi_addr; }:
			// the datagram's destination (ipi_addr) becomes the reply's source (ipi_spec_dst).
			var info unix.Inet4Pktinfo
			copy(info.Spec_dst[:], m.Data[8:12])
			return unix.PktInfo4(&info)
		case p.v6 && m.Header.Level == unix.IPPROTO_IPV6 && m.Header.Type == unix.IPV6_PKTINFO && len(m.Data) >= unix.SizeofInet6Pktinfo:
			// struct in6_pktinfo { struct in6_addr ipi6_addr; int ipi6_ifindex; }
			var info unix.Inet6Pktinfo
			copy(info.Addr[:], m.Data[:16])
			return unix.PktInfo6(&info)
		}
	}
	return nil
}

// replies copies the container's datagrams back to the client until the flow is idle.
func (p *Proxy) replies(f *flow) {
	defer p.wg.Done()
	defer f.conn.Close()
	buf := make([]byte, BufSize)
	for {
		p.mu.Lock()
		last := f.last
		p.mu.Unlock()
		f.conn.SetReadDeadline(last.Add(p.idle))
		n, err := f.conn.Read(buf)
		if err != nil {
			if errors.Is(err, syscall.ECONNREFUSED) {
				continue // nothing listens in the container (yet): keep the flow
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() && !p.expire(f, false) {
				continue // traffic arrived meanwhile
			}
			p.expire(f, true)
			return
		}
		p.mu.Lock()
		f.last = time.Now()
		p.mu.Unlock()
		// Counted before the write, so a client that has its reply finds it counted.
		p.outDatagrams.Add(1)
		p.outBytes.Add(uint64(n))
		if _, _, err := p.front.WriteMsgUDPAddrPort(buf[:n], f.oob, f.client); err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			p.log.Debug("cannot return a datagram to the client", "client", f.client, "err", err)
		}
	}
}

// expire ends f if force is set or it has been idle for the timeout, and reports whether f has
// ended.
func (p *Proxy) expire(f *flow, force bool) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if f.ended {
		return true
	}
	if !force && time.Since(f.last) < p.idle {
		return false
	}
	f.ended = true
	if p.flows[f.client] == f {
		delete(p.flows, f.client)
	}
	return true
}

// Flows is the number of live flows.
func (p *Proxy) Flows() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.flows)
}

// Close stops Run and ends every flow.
func (p *Proxy) Close() error {
	p.mu.Lock()
	p.closed = true
	err := p.front.Close()
	for _, f := range p.flows {
		f.ended = true
		f.conn.Close()
	}
	p.flows = map[netip.AddrPort]*flow{}
	p.mu.Unlock()
	p.wg.Wait()
	return err
}
