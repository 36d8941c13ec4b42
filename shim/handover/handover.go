// Package handover keeps a published TCP port's host socket in the shim for the port's whole life
// and steers the port's connections to Envoy while Envoy serves it, back to the shim when Envoy
// is gone (restarted, upgraded, killed), so that no client is ever refused and no handshake reset.
// Envoy cannot adopt an inherited socket; it binds its own beside the shim's.
//
// The shim's socket ("S") is the one dockerd 28+ passes on fd 4 (-use-listen-fd: bound and
// listening, SO_REUSEADDR, V6ONLY for IPv6; Adopt), or for older daemons one the shim binds itself,
// as docker-proxy does (Listen). Whenever a connection reaches S, the shim proxies it to the
// container itself, as docker-proxy would.
//
// # How the port is shared
//
// The kernel lets several sockets share an address in a SO_REUSEPORT group: each new connection
// (each SYN) is given to one socket of the group, by hash or by a classic BPF program attached to
// the group. Envoy binds with SO_REUSEPORT, one socket per worker thread. So:
//
//  1. S has SO_REUSEPORT before the shim registers, so that Envoy's sockets can bind and listen
//     beside it; they join S's group, and from the moment they listen the kernel splits new
//     connections between S and them. The shim serves its share.
//  2. Once the server accepted the registration, Steer counts Envoy's sockets (waiting for some to
//     appear, as Envoy takes the port in the background): N, the other
//     sockets listening on exactly this address (from the kernel's sock_diag; N must hold still,
//     unless the server said Envoy acknowledged the port: see Acknowledged).
//     The group's array is then [S, E1..EN]: S was there first, and each socket is appended as
//     it listens.
//  3. It attaches a program to the group through S (SO_ATTACH_REUSEPORT_CBPF): "return 1 +
//     random % N". New connections spread evenly over E1..EN, never S. What S had queued or
//     half-open before stays there and the shim serves it: S never closes while the port lives,
//     so nothing is reset.
//  4. When Envoy's sockets close (a restart, an upgrade, kill -9), the kernel removes each from
//     the array, moving the last socket into its slot, and an index the program returns that is
//     no longer in the array falls back to the kernel's hash over the sockets left. With all of
//     Envoy's sockets gone only S is left: every new connection reaches S, none is refused.
//     With net.ipv4.tcp_migrate_req=1 (the server sets it) the kernel also moves the accept
//     queues and half-open handshakes of Envoy's closing sockets to another socket of the group
//     (S, or a worker still listening) instead of resetting them. Not covered, by any design: a
//     handshake whose last ACK the kernel processes in the very instant its socket stops
//     listening is reset (tcp_check_req finds the socket listening, and by the time
//     inet_csk_reqsk_queue_add queues the connection it no longer is), a few microseconds per
//     closing socket.
//  5. The first connection S accepts while steered says that Envoy's sockets changed: the shim
//     counts them again (sock_diag, backing off while there are none) and, once a new Envoy's
//     sockets listen and hold still, attaches "1 + random % N" for their count: step 3 again.
//     While Envoy is away this is the only work; while it serves, the shim's only activity is
//     one goroutine blocked in accept.
//
// The remaining blind spot: a new Envoy with more workers than the old one, started while no
// connection reached S, is not noticed until one does; its extra sockets then get none of this
// port's new connections (no failure: the other workers take them).
//
// On shutdown the shim attaches "return N" before closing S: while S is there index N is EN, and
// once S has left (EN moved into its slot) index N is out of range, so the kernel's plain hash
// shares the port over Envoy's N sockets, as if no program were attached.
//
// If Envoy's sockets never appear on this exact address (Envoy bound elsewhere, or a program
// cannot be attached), the shim keeps serving the port itself and says so in the log: the port
// never goes dark.
//
// Rejected alternatives: Envoy's hot restart needs the old and new Envoy alive at once, and
// compose stops the old container before it starts the new one; an eBPF SK_REUSEPORT program with
// a socket map needs Envoy's file descriptors; closing S once Envoy serves (an earlier design)
// left every port refused from Envoy's exit until the next Envoy listened.
//
// This package never touches fd 4 unless asked (Adopt), and never closes S while the port lives.
package handover

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/internal/wait"
	"github.com/envoy-docker-shim/envoy-docker-shim/shim/logging"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"

	"github.com/envoy-docker-shim/envoy-docker-shim/shim/tcpproxy"
)

// Bounds of the steering. None delays dockerd: steering starts after the shim reported ready.
const (
	// settle is how long Envoy's socket count must hold still before it is trusted.
	settle = 50 * time.Millisecond
	// retryMin and retryMax bound the pause between counts while Envoy's sockets are not there.
	retryMin = 20 * time.Millisecond
	retryMax = 500 * time.Millisecond
	// warnAfter is when a wait for Envoy's sockets gets logged as a warning.
	warnAfter = 5 * time.Second
)

// Listener is the port's host socket, S: served by the shim whenever a connection reaches it.
type Listener struct {
	l     *net.TCPListener
	raw   syscall.RawConn
	addr  netip.AddrPort
	inode uint64
	proxy *tcpproxy.Proxy
	log   *logging.Logger

	// steered is the number of Envoy sockets the attached program spreads over; 0 while S takes
	// its share of the port (before Envoy serves it, or while Envoy is away).
	steered atomic.Int64
	// moved is signalled by an accept while steered: Envoy's sockets changed.
	moved chan struct{}
	// lastAccept is when S last accepted a connection (unix ns), or when the Listener was made.
	lastAccept atomic.Int64
	closing    atomic.Bool
	// pause, while not nil, asks the accept loop to stop accepting: it answers on pause.stopped
	// and waits for pause.resume (see Quiesce).
	pauseMu sync.Mutex
	pause   *pause
	// peersIn runs a sock_diag query; tests run it in the network namespace of their sockets.
	peersIn func(func() error) error
	// acked is closed once Envoy has acknowledged the port's listener (Acknowledged); ackUsed is
	// set once the first steering is past the point where that could speed it up.
	acked     chan struct{}
	ackedOnce sync.Once
	ackUsed   atomic.Bool
	// settle is how long a count of Envoy's sockets must hold still (the package's settle).
	settle time.Duration
}

// Adopt takes f (fd 4) as host's listening TCP socket, forwarding to container. It checks that f
// is what dockerd promised, makes it non-blocking and sets SO_REUSEPORT on it so Envoy can bind
// beside it. f is closed; the Listener holds a duplicate.
func Adopt(f *os.File, host, container netip.AddrPort, log *logging.Logger) (*Listener, error) {
	defer f.Close()
	fd := int(f.Fd())
	if typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE); err != nil || typ != unix.SOCK_STREAM {
		return nil, fmt.Errorf("fd 4 is not a TCP socket (-use-listen-fd with -proto tcp)")
	}
	if on, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || on != 1 {
		return nil, fmt.Errorf("the TCP socket passed on fd 4 is not listening")
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return nil, fmt.Errorf("the socket passed on fd 4: %w", err)
	}
	if got := sockaddr(sa); got != host {
		return nil, fmt.Errorf("the socket passed on fd 4 is bound to %s, not to %s", got, host)
	}
	unix.SetNonblock(fd, true)
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
		return nil, fmt.Errorf("cannot share the socket passed on fd 4 with Envoy (SO_REUSEPORT): %w", err)
	}
	fl, err := net.FileListener(f)
	if err != nil {
		return nil, fmt.Errorf("the socket passed on fd 4 is not usable: %w", err)
	}
	tl, ok := fl.(*net.TCPListener)
	if !ok {
		fl.Close()
		return nil, fmt.Errorf("fd 4 is not a TCP socket (-use-listen-fd with -proto tcp)")
	}
	return newListener(tl, host, container, log)
}

// Listen binds host and listens, as docker-proxy does for daemons that do not pass the socket
// (before 28): with SO_REUSEPORT, so that Envoy's sockets can join it, and V6ONLY for IPv6, as
// dockerd 28+ binds. A port another program holds fails here, with the reason for the user.
func Listen(host, container netip.AddrPort, log *logging.Logger) (*Listener, error) {
	network := "tcp4"
	if host.Addr().Is6() {
		network = "tcp6" // Go sets IPV6_V6ONLY for tcp6
	}
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1) }); err != nil {
			return err
		}
		return serr
	}}
	lc.SetMultipathTCP(false) // plain TCP, like Envoy's sockets: MPTCP ones would not share a group
	l, err := lc.Listen(context.Background(), network, host.String())
	if err != nil {
		return nil, fmt.Errorf("failed to listen on %s: %w", host, err) // as udpproxy.Listen says it
	}
	return newListener(l.(*net.TCPListener), host, container, log)
}

func newListener(tl *net.TCPListener, host, container netip.AddrPort, log *logging.Logger) (*Listener, error) {
	raw, err := tl.SyscallConn()
	if err != nil {
		tl.Close()
		return nil, err
	}
	var st unix.Stat_t
	var serr error
	if err := raw.Control(func(fd uintptr) { serr = unix.Fstat(int(fd), &st) }); err != nil || serr != nil {
		tl.Close()
		return nil, fmt.Errorf("the socket of %s: %w", host, errors.Join(err, serr))
	}
	l := &Listener{l: tl, raw: raw, addr: host, inode: st.Ino, proxy: tcpproxy.New(container, log), log: log,
		moved: make(chan struct{}, 1), acked: make(chan struct{}), settle: settle}
	l.lastAccept.Store(time.Now().UnixNano())
	return l, nil
}

func sockaddr(sa unix.Sockaddr) netip.AddrPort {
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port))
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(a.Addr).Unmap(), uint16(a.Port))
	}
	return netip.AddrPort{}
}

// Serve accepts and proxies until Close, then returns nil.
func (l *Listener) Serve() error {
	err := l.proxy.Serve(watched{l.l, l})
	if l.closing.Load() {
		return nil
	}
	return fmt.Errorf("accepting on %s: %w", l.addr, err)
}

// watched tells its Listener of every connection accepted.
type watched struct {
	*net.TCPListener
	l *Listener
}

func (w watched) Accept() (net.Conn, error) {
	for {
		c, err := w.TCPListener.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				// Quiesce cut the accept short: every connection accepted so far is tracked.
				if p := w.l.paused(); p != nil {
					close(p.stopped)
					<-p.resume
				}
				w.l.pauseMu.Lock()
				if w.l.pause == nil { // else another Quiesce set the deadline again
					_ = w.TCPListener.SetDeadline(time.Time{})
				}
				w.l.pauseMu.Unlock()
				continue
			}
		}
		if err == nil {
			w.l.lastAccept.Store(time.Now().UnixNano())
		}
		if err == nil && w.l.steered.Load() > 0 {
			select {
			case w.l.moved <- struct{}{}:
			default:
			}
		}
		return c, err
	}
}

type pause struct{ stopped, resume chan struct{} }

func (l *Listener) paused() *pause {
	l.pauseMu.Lock()
	defer l.pauseMu.Unlock()
	return l.pause
}

// Quiesce runs fn while the shim accepts nothing, with no connection running through it: it stops
// the accept loop (connections that arrive meanwhile wait in the socket's queue), and if the shim
// proxies no connection, runs fn and returns its error (fn may replace the process: package idle);
// else it returns ErrActive. Serving resumes when it returns. Call it while Serve runs, from one
// goroutine at a time.
func (l *Listener) Quiesce(ctx context.Context, fn func() error) error {
	p := &pause{stopped: make(chan struct{}), resume: make(chan struct{})}
	l.pauseMu.Lock()
	l.pause = p
	err := l.l.SetDeadline(time.Now())
	l.pauseMu.Unlock()
	defer func() {
		l.pauseMu.Lock()
		l.pause = nil
		l.pauseMu.Unlock()
		close(p.resume)
	}()
	if err != nil {
		return err
	}
	select {
	case <-p.stopped:
	case <-ctx.Done():
		return ctx.Err()
	}
	if l.proxy.Active() > 0 {
		return ErrActive
	}
	return fn()
}

// ErrActive says the shim is proxying connections: Quiesce did not run its function.
var ErrActive = errors.New("the shim is proxying connections")

// Steered returns the number of Envoy sockets the port's new connections go to; 0 while the
// shim's socket takes its share.
func (l *Listener) Steered() int { return int(l.steered.Load()) }

// Quiet is how long ago the shim's socket last accepted a connection (or was taken, if never).
func (l *Listener) Quiet() time.Duration { return time.Since(time.Unix(0, l.lastAccept.Load())) }

// Socket is the port's host socket, for the idle program to hold (package idle).
func (l *Listener) Socket() syscall.Conn { return l.l }

// SetRetryWindow bounds the retries of a connection the container refuses (package tcpproxy).
func (l *Listener) SetRetryWindow(d time.Duration) { l.proxy.SetRetryWindow(d) }

// RetryWindow is what SetRetryWindow set.
func (l *Listener) RetryWindow() time.Duration { return l.proxy.RetryWindow() }

// Active is the number of connections the shim is proxying itself.
func (l *Listener) Active() int { return l.proxy.Active() }

// Close stops serving and ends the connections the shim is proxying: the shim is shutting down.
// Envoy's sockets keep the port, shared by the kernel's hash (see the package documentation).
func (l *Listener) Close() {
	if !l.closing.Swap(true) {
		if n := l.steered.Load(); n > 0 {
			if err := l.attach(last(int(n))); err != nil {
				l.log.Debug("steering: the program for after the shim", "err", err)
			}
		}
	}
	l.l.Close()
	l.proxy.Close()
}

// Steer sends the port's new connections to Envoy's sockets whenever they listen, and lets them
// reach the shim's socket whenever they do not, as the package documentation describes. Call it
// once the server accepted the registration; it runs until ctx ends and returns ctx's error, or
// another error if the kernel refuses the program.
func (l *Listener) Steer(ctx context.Context) error {
	start := time.Now()
	defer l.ackUsed.Store(true)
	for first := true; ; first = false {
		n, err := l.waitPeers(ctx, first)
		if err != nil {
			return err
		}
		err = l.attach(spread(n))
		if err == nil {
			if prev := l.steered.Swap(int64(n)); prev != int64(n) {
				l.log.Info("port handed over to Envoy: new connections go to its sockets", "addr", l.addr, "envoy_sockets", n, "took", time.Since(start).Round(time.Millisecond))
			}
		}
		l.ackUsed.Store(true)
		if err != nil {
			if !errors.Is(err, unix.EINVAL) {
				return err
			}
			// S is in no group: the sockets on this address did not join it.
			l.log.Debug("steering: Envoy's sockets are not in the shim's socket's group", "err", err)
			if !wait.Sleep(ctx, retryMax) {
				return ctx.Err()
			}
			continue
		}
		// Wait for a connection to reach S. Those that chose S before the program may still be
		// accepted now: they only cause a recount that finds the same sockets.
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-l.moved:
		}
		start = time.Now()
	}
}

// Acknowledged tells the Listener that Envoy has acknowledged the port's listener (the server's
// Served). Envoy makes all of a listener's sockets listen, in one pass of its main thread, before
// it acknowledges the listener; so from then on a count of its sockets that is not zero is whole,
// and the first steering trusts it at once instead of waiting settle for it to hold still: those
// 50 ms left the first connections after a lone docker run to the shim, outside Envoy's stats.
func (l *Listener) Acknowledged() { l.ackedOnce.Do(func() { close(l.acked) }) }

// Acknowledging reports whether Envoy's acknowledgement came and the first steering has not yet
// acted on it: the shim is about to steer the port (so it should not go idle now: the steering
// would be lost with the Go runtime, and the acknowledgement with it).
func (l *Listener) Acknowledging() bool { return closed(l.acked) && !l.ackUsed.Load() }

// waitPeers returns the number of Envoy's sockets once there are some and it holds still (or,
// first, once Envoy acknowledged the port). While there are none, S takes every new connection.
func (l *Listener) waitPeers(ctx context.Context, first bool) (int, error) {
	var acked <-chan struct{}
	if first {
		acked = l.acked
	}
	start := time.Now()
	warned := false
	pause := retryMin
	for {
		n, err := l.stablePeers(ctx, acked)
		if err != nil || n > 0 {
			return n, err
		}
		if closed(acked) {
			acked = nil // acknowledged, yet no socket of Envoy's on this address: count as before
			l.ackUsed.Store(true)
		}
		if l.steered.Swap(0) > 0 {
			l.log.Info("Envoy's sockets are gone: the shim serves the port until Envoy is back", "addr", l.addr)
		}
		if !warned && time.Since(start) > warnAfter {
			warned = true
			if first {
				l.log.Warn("Envoy has not taken the port over yet; the shim keeps serving it", "addr", l.addr)
			} else {
				l.log.Warn("Envoy has not come back to the port yet; the shim keeps serving it", "addr", l.addr, "for", time.Since(start).Round(time.Second))
			}
		}
		if !wait.SleepUnless(ctx, pause, acked) {
			return 0, ctx.Err()
		}
		pause = min(2*pause, retryMax)
	}
}

// peers counts Envoy's sockets.
func (l *Listener) peers() (n int, err error) {
	if l.peersIn == nil {
		return peers(l.addr, l.inode)
	}
	if nerr := l.peersIn(func() error { n, err = peers(l.addr, l.inode); return nil }); nerr != nil {
		return 0, nerr
	}
	return n, err
}

// stablePeers returns the number of Envoy's sockets once it holds still for settle, or the first
// count once acked is closed.
func (l *Listener) stablePeers(ctx context.Context, acked <-chan struct{}) (int, error) {
	n, err := l.peers()
	for err == nil {
		if closed(acked) {
			return n, nil // whole; or none, which needs no settling either
		}
		if !wait.SleepUnless(ctx, l.settle, acked) {
			return 0, ctx.Err()
		}
		var again int
		if again, err = l.peers(); err == nil && again == n {
			return n, nil
		}
		n = again
	}
	return 0, fmt.Errorf("steering: reading sockets: %w", err)
}

func closed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

func (l *Listener) attach(prog []bpf.Instruction) error {
	raw, err := bpf.Assemble(prog)
	if err != nil {
		return err
	}
	filter := make([]unix.SockFilter, len(raw))
	for i, r := range raw {
		filter[i] = unix.SockFilter{Code: r.Op, Jt: r.Jt, Jf: r.Jf, K: r.K}
	}
	fprog := unix.SockFprog{Len: uint16(len(filter)), Filter: &filter[0]}
	var serr error
	if err := l.raw.Control(func(fd uintptr) {
		serr = unix.SetsockoptSockFprog(int(fd), unix.SOL_SOCKET, unix.SO_ATTACH_REUSEPORT_CBPF, &fprog)
	}); err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("attaching a reuseport program to %s: %w", l.addr, serr)
	}
	return nil
}

// spread picks one of Envoy's n sockets (indices 1..n) at random, never S (index 0).
func spread(n int) []bpf.Instruction {
	return []bpf.Instruction{
		bpf.LoadExtension{Num: bpf.ExtRand},
		bpf.ALUOpConstant{Op: bpf.ALUOpMod, Val: uint32(n)},
		bpf.ALUOpConstant{Op: bpf.ALUOpAdd, Val: 1},
		bpf.RetA{},
	}
}

// last picks index n: Envoy's last socket while S is in the group, and an index out of range (so
// the kernel's own hash) once S has left.
func last(n int) []bpf.Instruction {
	return []bpf.Instruction{bpf.RetConstant{Val: uint32(n)}}
}
