// Package shimlink is the link between envoy-docker-shim and envoy-docker-server. One
// registration is one connection on a SOCK_SEQPACKET Unix socket, where the kernel keeps message
// boundaries: a message is one packet, a URL query (net/url's encoding, readable in strace).
//
//	shim → server  Open    the mapping, once, first
//	server → shim  Ready   Envoy serves the port; or Failed with a reason for docker run
//	server → shim  Served  Envoy has taken the port over (once), to a shim whose Open asked
//	shim → server  Log     the shim's log lines, for as long as it lives
//	shim → server  Stats   the traffic a shim carries itself (UDP): every few seconds while it
//	                       changes, and once more at the end; cumulative, so a lost one loses
//	                       nothing; only to a server whose Ready asked for them
//	shim → server  end of stream (shutdown): deregistration; the server closes once Envoy let go
//
// The server ending the connection means it stopped; the shim re-registers when it is back. Both
// programs are built from this repository, so the link needs no versioned protocol of its own:
// unknown keys are ignored, so a newer shim and an older server (or the reverse) still agree.
// The package must stay light: the shim, one process per published port, links it.
package shimlink

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"net/url"
	"strconv"
	"syscall"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/internal/mapping"
)

// DefaultSocket is where envoy-docker-server listens for shims (EDS_SHIM_SOCKET).
const DefaultSocket = "/run/envoy-docker-shim/shim.sock"

// MaxMessage bounds a message; longer log lines are cut to fit.
const MaxMessage = 16 << 10

// Message is one of Open, Ready, Served, Failed, Log and Stats.
type Message interface{ values() url.Values }

// Open is what a shim registers.
type Open struct {
	Mapping mapping.Mapping
	PID     int
	Version string
	// ProxiesItself is set when the shim carries the traffic (UDP) and Envoy must not be configured.
	ProxiesItself bool
	// Serving says the shim serves the port itself until Envoy takes it over (a TCP shim holds
	// the port's socket for the port's life) or has served it for long (every re-registration):
	// the server answers once the registration is valid, without waiting for Envoy, and nothing
	// may make Envoy drop the port.
	Serving bool
	// WantsServed asks for Served once Envoy has the port: a shim that went idle before Envoy
	// took the port over (package idle's fast start) wakes for it, to steer the port to Envoy.
	WantsServed bool
}

// Served says Envoy has taken the port over: its listener is acknowledged.
type Served struct{}

// Ready says Envoy serves the port, and under which names.
type Ready struct {
	Service       string
	Mode          string
	ContainerID   string
	ContainerName string
	Listener      string
	// WantsStats asks a shim that carries the traffic itself for its counters (Stats). A server
	// from before Stats existed does not ask, and would end a registration that sent them.
	WantsStats bool
	// ConnectRetryWindow is how long a shim that carries a TCP connection itself keeps retrying
	// to connect to a container that refuses (its app is starting), as Envoy does; 0: once.
	ConnectRetryWindow time.Duration
}

// Failed is the server's refusal; Reason is written for the user of docker run.
type Failed struct{ Reason string }

func (f *Failed) Error() string { return f.Reason }

// Log is one log line of the shim (under dockerd its stdout and stderr are /dev/null).
type Log struct {
	Level   string
	Message string
}

// Stats are the counters of a shim that proxies a port itself (UDP), since the shim started.
type Stats struct {
	// In: datagrams and payload bytes from clients; Out: from the container back to clients.
	InDatagrams, InBytes, OutDatagrams, OutBytes uint64
	// Flows is the number of live flows (client address and port); FlowsTotal every one started.
	Flows, FlowsTotal uint64
}

func (o *Open) values() url.Values {
	v := url.Values{"type": {"open"}, "proto": {string(o.Mapping.Proto)},
		"host": {o.Mapping.Host().String()}, "container": {o.Mapping.Container().String()},
		"pid": {strconv.Itoa(o.PID)}, "version": {o.Version}}
	if o.ProxiesItself {
		v.Set("proxies_itself", "1")
	}
	if o.Serving {
		v.Set("serving", "1")
	}
	if o.WantsServed {
		v.Set("wants_served", "1")
	}
	return v
}

func (*Served) values() url.Values { return url.Values{"type": {"served"}} }

func (r *Ready) values() url.Values {
	v := url.Values{"type": {"ready"}, "service": {r.Service}, "mode": {r.Mode},
		"container_id": {r.ContainerID}, "container_name": {r.ContainerName}, "listener": {r.Listener}}
	if r.WantsStats {
		v.Set("stats", "1")
	}
	if r.ConnectRetryWindow > 0 {
		v.Set("connect_retry_ms", strconv.FormatInt(r.ConnectRetryWindow.Milliseconds(), 10))
	}
	return v
}

func (f *Failed) values() url.Values { return url.Values{"type": {"failed"}, "reason": {f.Reason}} }

func (l *Log) values() url.Values {
	return url.Values{"type": {"log"}, "level": {l.Level}, "message": {l.Message}}
}

func (s *Stats) values() url.Values {
	u := func(n uint64) []string { return []string{strconv.FormatUint(n, 10)} }
	return url.Values{"type": {"stats"}, "in": u(s.InDatagrams), "in_bytes": u(s.InBytes),
		"out": u(s.OutDatagrams), "out_bytes": u(s.OutBytes), "flows": u(s.Flows), "flows_total": u(s.FlowsTotal)}
}

// Encode is the packet of m.
func Encode(m Message) []byte { return []byte(m.values().Encode()) }

// Decode reads one packet. It rejects what no peer sends: an unknown type, a malformed mapping.
func Decode(b []byte) (Message, error) {
	v, err := url.ParseQuery(string(b))
	if err != nil {
		return nil, fmt.Errorf("malformed message: %w", err)
	}
	switch t := v.Get("type"); t {
	case "open":
		return decodeOpen(v)
	case "ready":
		r := &Ready{Service: v.Get("service"), Mode: v.Get("mode"), ContainerID: v.Get("container_id"),
			ContainerName: v.Get("container_name"), Listener: v.Get("listener"), WantsStats: v.Get("stats") == "1"}
		if ms := v.Get("connect_retry_ms"); ms != "" {
			n, err := strconv.ParseUint(ms, 10, 32)
			if err != nil {
				return nil, fmt.Errorf("malformed connect_retry_ms %q", ms)
			}
			r.ConnectRetryWindow = time.Duration(n) * time.Millisecond
		}
		return r, nil
	case "failed":
		return &Failed{Reason: v.Get("reason")}, nil
	case "served":
		return &Served{}, nil
	case "log":
		return &Log{Level: v.Get("level"), Message: v.Get("message")}, nil
	case "stats":
		return decodeStats(v)
	default:
		return nil, fmt.Errorf("unknown message type %q", t)
	}
}

func decodeOpen(v url.Values) (*Open, error) {
	proto, err := mapping.ParseProtocol(v.Get("proto"))
	if err != nil {
		return nil, err
	}
	host, err := netip.ParseAddrPort(v.Get("host"))
	if err != nil {
		return nil, fmt.Errorf("host address: %w", err)
	}
	container, err := netip.ParseAddrPort(v.Get("container"))
	if err != nil {
		return nil, fmt.Errorf("container address: %w", err)
	}
	pid, err := strconv.Atoi(v.Get("pid"))
	if err != nil {
		return nil, fmt.Errorf("pid: %w", err)
	}
	m := mapping.Mapping{
		Key:           mapping.Key{Proto: proto, HostIP: host.Addr().Unmap(), HostPort: host.Port()},
		ContainerIP:   container.Addr().Unmap(),
		ContainerPort: container.Port(),
	}
	if err := m.Validate(); err != nil {
		return nil, err
	}
	return &Open{Mapping: m, PID: pid, Version: v.Get("version"),
		ProxiesItself: v.Get("proxies_itself") == "1", Serving: v.Get("serving") == "1",
		WantsServed: v.Get("wants_served") == "1"}, nil
}

func decodeStats(v url.Values) (*Stats, error) {
	var s Stats
	for _, f := range []struct {
		key string
		to  *uint64
	}{{"in", &s.InDatagrams}, {"in_bytes", &s.InBytes}, {"out", &s.OutDatagrams}, {"out_bytes", &s.OutBytes},
		{"flows", &s.Flows}, {"flows_total", &s.FlowsTotal}} {
		n, err := strconv.ParseUint(v.Get(f.key), 10, 64)
		if err != nil {
			return nil, fmt.Errorf("stats %s: %w", f.key, err)
		}
		*f.to = n
	}
	return &s, nil
}

// Conn is one registration's connection, from either end. Send and Recv may run concurrently
// with each other, but not with themselves. It holds no buffer while it waits: the server has a
// Conn per published port, each mostly waiting for years.
type Conn struct {
	uc *net.UnixConn
}

// NewConn wraps a SOCK_SEQPACKET connection, as Listener.Accept returns it.
func NewConn(uc *net.UnixConn) *Conn { return &Conn{uc: uc} }

// Dial connects to the server's socket. It is net.DialUnix rather than a net.Dialer: connecting to
// a Unix socket does not block, and a Dialer would link Go's DNS resolver into every shim (90 KB
// of code, which an idle shim's memory follows).
func Dial(path string) (*Conn, error) {
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return nil, err
	}
	return NewConn(c), nil
}

// Listen serves the link on path (which must not exist).
func Listen(path string) (*net.UnixListener, error) {
	return net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
}

// Send writes m as one packet; a log line too long for one is cut.
func (c *Conn) Send(m Message) error {
	b := Encode(m)
	if l, ok := m.(*Log); ok && len(b) > MaxMessage {
		cut := *l
		for len(b) > MaxMessage && cut.Message != "" {
			cut.Message = cut.Message[:len(cut.Message)*3/4]
			b = Encode(&cut)
		}
	}
	_, err := c.uc.Write(b)
	return err
}

// Recv reads the next message; io.EOF once the peer ended its side.
func (c *Conn) Recv() (Message, error) {
	// Wait for the next packet and learn its length without a buffer (MSG_PEEK|MSG_TRUNC gives a
	// packet's real length), then read it into one of that size.
	raw, err := c.uc.SyscallConn()
	if err != nil {
		return nil, err
	}
	size := 0
	var peekErr error
	if err := raw.Read(func(fd uintptr) bool {
		size, _, peekErr = syscall.Recvfrom(int(fd), nil, syscall.MSG_PEEK|syscall.MSG_TRUNC)
		return peekErr != syscall.EAGAIN
	}); err != nil {
		return nil, err
	}
	if peekErr != nil {
		return nil, &net.OpError{Op: "read", Net: "unixpacket", Err: peekErr}
	}
	if size == 0 {
		// SOCK_SEQPACKET: an empty read is the peer's shutdown, never a message. Take it, so
		// the next Recv sees the end as well.
		return nil, io.EOF
	}
	buf := make([]byte, min(size, MaxMessage+1))
	n, _, flags, _, err := c.uc.ReadMsgUnix(buf, nil)
	if err != nil {
		return nil, err
	}
	if n == 0 {
		return nil, io.EOF
	}
	if flags&syscall.MSG_TRUNC != 0 || n > MaxMessage {
		return nil, errors.New("message longer than shimlink.MaxMessage")
	}
	return Decode(buf[:n])
}

// Unix is the connection's socket.
func (c *Conn) Unix() *net.UnixConn { return c.uc }

// CloseWrite ends this side: the peer reads io.EOF.
func (c *Conn) CloseWrite() error { return c.uc.CloseWrite() }

// Close ends the connection.
func (c *Conn) Close() error { return c.uc.Close() }
