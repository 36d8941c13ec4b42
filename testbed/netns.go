package testbed

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Outside is a host beyond the machine, as far as containers can tell: a network namespace of
// the test's own, joined to the host by a veth pair, with addresses in the benchmarking ranges
// (198.18.0.0/15, 2001:2::/48) and no route but its own link, as the internet has no route to a
// container subnet. A container reaches it only if the host forwards the container's traffic and
// rewrites its source to the host's address (masquerade).
//
// It answers on Port, TCP and UDP, with the address it sees the client at ("198.18.3.1\n"): a
// TCP client sends anything and half-closes, a UDP client sends one datagram.
type Outside struct {
	Addr4, Addr6 netip.Addr // the outside host; Addr6 is invalid when the kernel has no IPv6
	// HostAddr4 and HostAddr6 are the host's end of the link: a masqueraded container's address.
	HostAddr4, HostAddr6 netip.Addr
	Link                 string // the host's end of the veth pair
	Port                 int
	NS                   *os.File
}

// HostHasIPv6 reports whether the kernel does IPv6 (not disabled at boot or by sysctl).
func HostHasIPv6() bool {
	b, err := os.ReadFile("/proc/sys/net/ipv6/conf/all/disable_ipv6")
	return err == nil && strings.TrimSpace(string(b)) == "0"
}

// StartOutside creates the outside host for daemon d: its addresses and link are derived from the
// daemon's slot, so outside hosts of parallel tests never share addresses. The namespace lives as
// long as the test (or the test process): when it goes, its link goes with it, on the host too.
// Traffic to it is allowed (CheckTarget) while it lives.
func StartOutside(t testing.TB, d *Daemon) *Outside {
	t.Helper()
	slot := d.inst.state.Slot
	o := &Outside{
		Addr4:     netip.AddrFrom4([4]byte{198, 18, byte(slot), 2}),
		HostAddr4: netip.AddrFrom4([4]byte{198, 18, byte(slot), 1}),
		Link:      fmt.Sprintf("edso%d", slot),
		Port:      7,
	}
	net4 := netip.PrefixFrom(o.HostAddr4, 30).Masked()
	var net6 netip.Prefix
	if HostHasIPv6() {
		net6 = netip.MustParsePrefix(fmt.Sprintf("2001:2:0:%x::/64", slot))
		o.HostAddr6 = net6.Addr().Next()
		o.Addr6 = o.HostAddr6.Next()
	}
	ns, err := NewNetns()
	if err != nil {
		t.Fatalf("StartOutside: %v", err)
	}
	o.NS = ns
	t.Cleanup(func() { ns.Close() })

	// The pair is made on the host with its other end straight in the namespace, named by the file
	// the test holds (passed as fd 3). Not `netns PID` from inside: that names the namespace of the
	// process's main thread, which may be a thread in some namespace of a test at that moment.
	add := exec.Command("ip", "link", "add", o.Link, "type", "veth", "peer", "name", "eth0", "netns", "/proc/self/fd/3")
	add.ExtraFiles = []*os.File{ns}
	if out, err := add.CombinedOutput(); err != nil {
		t.Fatalf("StartOutside: %s: %v: %s", add, err, strings.TrimSpace(string(out)))
	}
	inside := [][]string{
		{"link", "set", "lo", "up"},
		{"addr", "add", netip.PrefixFrom(o.Addr4, 30).String(), "dev", "eth0"},
		{"link", "set", "eth0", "up"},
	}
	host := [][]string{
		{"addr", "add", netip.PrefixFrom(o.HostAddr4, 30).String(), "dev", o.Link},
		{"link", "set", o.Link, "up"},
	}
	if o.Addr6.IsValid() {
		inside = append(inside, []string{"-6", "addr", "add", netip.PrefixFrom(o.Addr6, 64).String(), "dev", "eth0", "nodad"})
		host = append(host, []string{"-6", "addr", "add", netip.PrefixFrom(o.HostAddr6, 64).String(), "dev", o.Link, "nodad"})
	}
	err = InNetns(ns, func() error { return runIP(inside) })
	if err == nil {
		err = runIP(host)
	}
	if err != nil {
		t.Fatalf("StartOutside: %v", err)
	}
	allowNet(net4)
	t.Cleanup(func() { disallowNet(net4) })
	if net6.IsValid() {
		allowNet(net6)
		t.Cleanup(func() { disallowNet(net6) })
	}
	if err := o.serve(t); err != nil {
		t.Fatalf("StartOutside: %v", err)
	}
	t.Logf("testbed: outside host %s %s on link %s (host side %s %s)", o.Addr4, o.Addr6, o.Link, o.HostAddr4, o.HostAddr6)
	return o
}

func runIP(cmds [][]string) error {
	for _, args := range cmds {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
		}
	}
	return nil
}

// serve answers on Port inside the namespace until the test ends.
func (o *Outside) serve(t testing.TB) error {
	var ln net.Listener
	var pc net.PacketConn
	err := InNetns(o.NS, func() error {
		var err error
		if ln, err = net.Listen("tcp", ":"+strconv.Itoa(o.Port)); err != nil {
			return err
		}
		pc, err = net.ListenPacket("udp", ":"+strconv.Itoa(o.Port))
		return err
	})
	if err != nil {
		if ln != nil {
			ln.Close()
		}
		return fmt.Errorf("outside host's servers: %w", err)
	}
	t.Cleanup(func() { ln.Close(); pc.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(defaultIOTimeout))
				_, _ = io.Copy(io.Discard, c)
				_, _ = fmt.Fprintf(c, "%s\n", addrOf(c.RemoteAddr()))
			}()
		}
	}()
	go func() {
		buf := make([]byte, 65535)
		for {
			_, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo([]byte(addrOf(from).String()+"\n"), from)
		}
	}()
	return nil
}

func addrOf(a net.Addr) netip.Addr {
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr().Unmap()
}

// Ask asks the outside host, over proto ("tcp" or "udp") from the network namespace ns (a
// container's: see ContainerNetns), which address it sees the asker at.
func (o *Outside) Ask(ctx context.Context, ns *os.File, proto string, addr netip.Addr) (netip.Addr, error) {
	target := netip.AddrPortFrom(addr, uint16(o.Port)).String()
	var reply []byte
	var err error
	switch proto {
	case "tcp":
		reply, err = TCPEchoFrom(ctx, ns, target, []byte("who am I?\n"))
	case "udp":
		reply, err = UDPEchoFrom(ctx, ns, target, []byte("who am I?\n"))
	default:
		return netip.Addr{}, fmt.Errorf("Ask: protocol %q, want tcp or udp", proto)
	}
	if err != nil {
		return netip.Addr{}, err
	}
	line, _, _ := strings.Cut(string(reply), "\n")
	seen, perr := netip.ParseAddr(line)
	if perr != nil {
		return netip.Addr{}, fmt.Errorf("outside host %s answered %q", target, reply)
	}
	return seen, nil
}

// NewNetns creates a network namespace that lives as long as the returned file is open (or a
// process is in it).
func NewNetns() (*os.File, error) {
	var ns *os.File
	err := onLockedThread(func() error {
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("unshare(CLONE_NEWNET): %w", err)
		}
		f, err := os.Open("/proc/thread-self/ns/net")
		ns = f
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("new network namespace: %w", err)
	}
	return ns, nil
}

// InNetns runs fn with its thread in the network namespace ns: sockets fn opens belong to ns for
// their whole life, and processes fn starts run in ns.
func InNetns(ns *os.File, fn func() error) error {
	return onLockedThread(func() error {
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("setns: %w", err)
		}
		return fn()
	})
}

// onLockedThread runs fn on a thread of its own and puts the thread back into the process's
// network namespace afterwards. A thread that cannot go back is never reused: a goroutine that
// ends locked to its thread takes the thread with it.
func onLockedThread(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		home, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			errc <- err
			return
		}
		defer home.Close()
		err = fn()
		if unix.Setns(int(home.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	return <-errc
}

// ContainerNetns opens the network namespace of a running container, closed when the test ends.
func (d *Daemon) ContainerNetns(t testing.TB, c *Container) *os.File {
	t.Helper()
	pid := d.MustDocker(t, "inspect", "-f", "{{.State.Pid}}", c.ID)
	if pid == "" || pid == "0" {
		t.Fatalf("ContainerNetns: container %s is not running", c.Name)
	}
	f, err := os.Open("/proc/" + pid + "/ns/net")
	if err != nil {
		t.Fatalf("ContainerNetns: %v", err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// DialFrom is Dial from inside the network namespace ns: only to targets CheckTarget allows.
func DialFrom(ctx context.Context, ns *os.File, network, address string) (net.Conn, error) {
	if err := CheckTarget(address); err != nil {
		return nil, err
	}
	var c net.Conn
	err := InNetns(ns, func() error {
		var err error
		c, err = guardedDialer.DialContext(ctx, network, address)
		return err
	})
	return c, err
}

// TCPEchoFrom is TCPEcho from inside the network namespace ns.
func TCPEchoFrom(ctx context.Context, ns *os.File, addr string, payload []byte) ([]byte, error) {
	return tcpEcho(ctx, func(ctx context.Context) (net.Conn, error) { return DialFrom(ctx, ns, "tcp", addr) }, addr, payload)
}

// UDPEchoFrom is UDPEcho from inside the network namespace ns.
func UDPEchoFrom(ctx context.Context, ns *os.File, addr string, payload []byte) ([]byte, error) {
	return udpEcho(ctx, func(ctx context.Context) (net.Conn, error) { return DialFrom(ctx, ns, "udp", addr) }, addr, payload)
}

// IsTimeout reports whether err is a timeout: what a dropped packet looks like to its sender.
func IsTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout() || errors.Is(err, context.DeadlineExceeded)
}

// RandomULA returns a unique local /48 of the test's own (RFC 4193: fd + 40 random bits), as a
// function giving its /64 number i, so that IPv6 networks of parallel tests never meet.
func RandomULA(t testing.TB) func(i int) string {
	b := make([]byte, 5)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	prefix := fmt.Sprintf("fd%02x:%02x%02x:%02x%02x", b[0], b[1], b[2], b[3], b[4])
	return func(i int) string { return fmt.Sprintf("%s:%x::/64", prefix, i) }
}
