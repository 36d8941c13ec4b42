// Package handover takes the TCP socket dockerd 28+ passes on fd 4 (-use-listen-fd: bound and
// listening, SO_REUSEADDR, V6ONLY for IPv6) and hands the port to Envoy with no moment at which a
// client is refused or reset. Envoy cannot adopt an inherited socket; it binds its own.
//
// Until Envoy has taken over, the shim serves the socket itself (accept, proxy to the container,
// as docker-proxy would), so connections queued before and during the handover are answered.
//
// # How the port moves
//
// The kernel lets several sockets share an address in a SO_REUSEPORT group: each new connection
// (each SYN) is given to one socket of the group, by hash or by a BPF program attached to the
// group. Envoy binds with SO_REUSEPORT, one socket per worker thread. So:
//
//  1. Adopt sets SO_REUSEPORT on the passed socket (ours, "O") before the shim registers, so that
//     Envoy's sockets can bind and listen beside it; they join O's group and, from the moment they
//     listen, the kernel splits new connections between O and them. The shim serves its share.
//  2. When the server says Envoy serves the port, HandOver counts Envoy's sockets: N, the other
//     sockets listening on exactly this address (from the kernel's sock_diag; N must hold still).
//     The group's array is then [O, E1..EN]: O allocated the group when E1 joined, and each
//     socket is appended as it listens.
//  3. It attaches a classic BPF program to the group through O (SO_ATTACH_REUSEPORT_CBPF):
//     "return 1 + random % N". New connections now spread evenly over E1..EN, never O.
//  4. Connections that chose O before that may still be mid-handshake (SYN_RECV: a request
//     socket tied to O, completed by the client's ACK). Closing O would drop them and the ACK
//     would be answered with a reset. So it snapshots the handshakes in progress to this address,
//     waits until every one of them has completed or vanished (bounded by maxGrace), and keeps
//     accepting on O meanwhile. Handshakes that start after step 3 belong to Envoy's sockets.
//  5. It replaces the program with "return N" (step 7 explains why), waits until O's accept
//     queue is empty (TCP_INFO's unacked of a listener is its queue length), then shuts O down
//     (SHUT_RD, which unhashes it at once even if another process still holds a copy) and closes
//     it. Nothing can be queued on O at that moment, so nothing is reset. Connections the shim
//     already accepted keep running through it until they end.
//  6. Envoy's sockets receive everything from then on.
//  7. The program outlives O: it stays attached to the group for as long as Envoy's sockets live.
//     When O leaves, the kernel moves the last socket into O's slot ([EN, E1..EN-1]), and a
//     program returning an index that no longer exists falls back to the kernel's hash. "1 +
//     random % N" would then send 1/N of the traffic to the missing index N and most of it to
//     E1..EN-1: EN would get almost nothing. "return N" is the only program that, before O
//     leaves, never picks O (index N is EN) and, after O leaves, always falls back to the plain
//     hash over Envoy's N sockets, exactly as if no program were attached. It is attached for
//     the microseconds between step 5 and O's shutdown, so it pins one worker only for that long.
//     The remaining pitfall: if the group later grows past N sockets while these are alive (Envoy
//     creating new sockets for the same address before closing the old ones), index N would take
//     every new connection until the group shrinks again. Envoy keeps its sockets across in-place
//     listener updates and a restarted Envoy starts a fresh group (the old one, program included,
//     is freed with its last socket), so this needs an unusual overlap of two sets of sockets.
//
// If Envoy's sockets never appear on this exact address (Envoy bound elsewhere, or a program
// cannot be attached), the shim keeps serving the port itself and says so in the log: the port
// never goes dark.
//
// Rejected alternatives: closing O as soon as Envoy listens resets whatever O had queued; the
// tcp_migrate_req sysctl would migrate O's queue but changes a host-wide setting; an eBPF
// SK_REUSEPORT program with a socket map needs Envoy's file descriptors; keeping a placeholder
// socket of the shim's in the group forever would leave the shim holding the port after the
// handover.
//
// This package never touches fd 4 unless asked (Adopt), and never closes O while a connection
// can still arrive on it.
package handover

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/shim/logging"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"

	"github.com/envoy-docker-shim/envoy-docker-shim/shim/tcpproxy"
)

// Bounds of the handover. None delays dockerd: the handover runs after the shim reported ready.
const (
	// settle is how long Envoy's socket count must hold still before it is trusted.
	settle = 50 * time.Millisecond
	// pollEvery is how often handshakes and queues are looked at while draining.
	pollEvery = 5 * time.Millisecond
	// maxGrace bounds the wait for handshakes that chose O to complete; it covers one SYN-ACK
	// retransmission (1 s) on a slow path.
	maxGrace = 3 * time.Second
	// maxQueueDrain bounds the wait for the shim to accept what is queued on O.
	maxQueueDrain = 2 * time.Second
	// retryMax is the longest pause between attempts while Envoy's sockets are not there.
	retryMax = 2 * time.Second
	// warnAfter is when a handover still waiting for Envoy's sockets gets logged as a warning.
	warnAfter = 5 * time.Second
)

// Listener is the socket dockerd passed, served by the shim until Envoy has the port.
type Listener struct {
	l     *net.TCPListener
	raw   syscall.RawConn
	addr  netip.AddrPort
	inode uint64
	proxy *tcpproxy.Proxy
	log   *logging.Logger

	handedOver atomic.Bool
	closing    atomic.Bool
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
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("the socket passed on fd 4: %w", err)
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
	raw, err := tl.SyscallConn()
	if err != nil {
		tl.Close()
		return nil, err
	}
	return &Listener{l: tl, raw: raw, addr: host, inode: st.Ino, proxy: tcpproxy.New(container, log), log: log}, nil
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

// Serve accepts and proxies until the port is handed over (then it returns nil) or Close.
func (l *Listener) Serve() error {
	err := l.proxy.Serve(l.l)
	if l.handedOver.Load() || l.closing.Load() {
		return nil
	}
	return fmt.Errorf("accepting on %s: %w", l.addr, err)
}

// HandedOver reports whether Envoy has the port and the shim's socket is closed.
func (l *Listener) HandedOver() bool { return l.handedOver.Load() }

// Active is the number of connections the shim is proxying itself.
func (l *Listener) Active() int { return l.proxy.Active() }

// Close stops serving (without a handover) and ends the connections the shim is proxying: the
// shim is shutting down.
func (l *Listener) Close() {
	l.closing.Store(true)
	l.l.Close()
	l.proxy.Close()
}

// HandOver moves the port to Envoy, as the package documentation describes. Call it once the
// server said Envoy serves the port. It returns nil once the shim's socket is closed, or ctx's
// error; until then the shim keeps serving.
func (l *Listener) HandOver(ctx context.Context) error {
	start := time.Now()
	warned := false
	wait := 20 * time.Millisecond
	retry := func(why string, args ...any) error {
		if !warned && time.Since(start) > warnAfter {
			warned = true
			l.log.Warn("Envoy has not taken the port over yet; the shim keeps serving it: "+why, args...)
		} else {
			l.log.Debug("handover: "+why, args...)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
		wait = min(2*wait, retryMax)
		return nil
	}
	for {
		n, err := l.stablePeers(ctx)
		if err != nil {
			return err
		}
		if n == 0 {
			if err := retry("no Envoy socket listens on this address", "addr", l.addr); err != nil {
				return err
			}
			continue
		}
		done, err := l.tryHandOver(ctx, n)
		if done || err != nil {
			if done {
				l.log.Info("port handed over to Envoy", "addr", l.addr, "envoy_sockets", n, "took", time.Since(start).Round(time.Millisecond))
			}
			return err
		}
		if err := retry("Envoy's sockets changed during the handover", "addr", l.addr); err != nil {
			return err
		}
	}
}

// stablePeers returns the number of Envoy's sockets once it holds still for settle.
func (l *Listener) stablePeers(ctx context.Context) (int, error) {
	n, err := peers(l.addr, l.inode)
	for err == nil {
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(settle):
		}
		var again int
		again, err = peers(l.addr, l.inode)
		if err == nil && again == n {
			return n, nil
		}
		n = again
	}
	return 0, fmt.Errorf("handover: reading sockets: %w", err)
}

// tryHandOver runs steps 3 to 5 with n Envoy sockets. It reports false (and no error) when the
// group changed under it, after restoring a program that keeps O out.
func (l *Listener) tryHandOver(ctx context.Context, n int) (bool, error) {
	if err := l.attach(spread(n)); err != nil {
		if errors.Is(err, unix.EINVAL) {
			// O is in no group: the sockets on this address did not join it.
			l.log.Debug("handover: Envoy's sockets are not in the passed socket's group", "err", err)
			return false, nil
		}
		return false, err
	}
	same := func() bool { m, err := peers(l.addr, l.inode); return err == nil && m == n }
	if !same() {
		return false, nil
	}
	// Step 4: handshakes that may have chosen O before the program.
	pending, err := halfOpen(l.addr)
	if err != nil {
		return false, err
	}
	graceEnd := time.Now().Add(maxGrace)
	for len(pending) > 0 && time.Now().Before(graceEnd) {
		if err := sleep(ctx, pollEvery); err != nil {
			return false, err
		}
		now, err := halfOpen(l.addr)
		if err != nil {
			return false, err
		}
		for remote := range pending {
			if !now[remote] {
				delete(pending, remote)
			}
		}
		if !same() {
			return false, nil
		}
	}
	if len(pending) > 0 {
		l.log.Warn("handover: handshakes to the shim's socket still incomplete; they may be reset", "count", len(pending))
	}
	// Step 5.
	if err := l.attach(last(n)); err != nil {
		return false, err
	}
	if !same() {
		return false, l.attach(spread(n)) // keep O out until the next attempt
	}
	queueEnd := time.Now().Add(maxQueueDrain)
	for {
		q, err := l.queued()
		if err != nil {
			return false, err
		}
		if q == 0 {
			break
		}
		if time.Now().After(queueEnd) {
			l.log.Warn("handover: the shim's socket still has queued connections; they may be reset", "count", q)
			break
		}
		if err := sleep(ctx, pollEvery); err != nil {
			return false, err
		}
	}
	l.handedOver.Store(true)
	var serr error
	l.raw.Control(func(fd uintptr) { serr = unix.Shutdown(int(fd), unix.SHUT_RD) })
	l.l.Close()
	if serr != nil {
		l.log.Warn("handover: shutting the shim's socket down", "err", serr)
	}
	if still, _ := listening(l.addr, l.inode); still {
		l.log.Warn("handover: the passed socket still listens after the shim closed it")
	}
	return true, nil
}

// queued is the length of O's accept queue.
func (l *Listener) queued() (int, error) {
	var info *unix.TCPInfo
	var err error
	if cerr := l.raw.Control(func(fd uintptr) { info, err = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO) }); cerr != nil {
		return 0, cerr
	}
	if err != nil {
		return 0, err
	}
	return int(info.Unacked), nil
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

// spread picks one of Envoy's n sockets (indices 1..n) at random, never O (index 0).
func spread(n int) []bpf.Instruction {
	return []bpf.Instruction{
		bpf.LoadExtension{Num: bpf.ExtRand},
		bpf.ALUOpConstant{Op: bpf.ALUOpMod, Val: uint32(n)},
		bpf.ALUOpConstant{Op: bpf.ALUOpAdd, Val: 1},
		bpf.RetA{},
	}
}

// last picks index n: Envoy's last socket while O is in the group, and an index out of range (so
// the kernel's own hash) once O has left.
func last(n int) []bpf.Instruction {
	return []bpf.Instruction{bpf.RetConstant{Val: uint32(n)}}
}

func sleep(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}
