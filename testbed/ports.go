package testbed

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
)

// Test ports come from below the kernel's ephemeral range: a port the kernel has handed to some
// outgoing connection cannot be published, and that failure would look like a bug in the proxy.
const (
	portRangeLow  = 20000
	portRangeHigh = 45000 // exclusive
)

// portRangeFor returns the range FreePort draws from, given the text of
// /proc/sys/net/ipv4/ip_local_port_range. If the ephemeral range leaves too little room below
// it, the whole default range is used and collisions are left to the bind check.
func portRangeFor(ephemeral string) (lo, hi int) {
	fields := strings.Fields(ephemeral)
	if len(fields) != 2 {
		return portRangeLow, portRangeHigh
	}
	ephLo, err1 := strconv.Atoi(fields[0])
	ephHi, err2 := strconv.Atoi(fields[1])
	if err1 != nil || err2 != nil || ephHi < ephLo {
		return portRangeLow, portRangeHigh
	}
	if ephLo >= portRangeHigh || ephHi < portRangeLow {
		return portRangeLow, portRangeHigh
	}
	if ephLo-portRangeLow >= 2000 {
		return portRangeLow, ephLo
	}
	if portRangeHigh-ephHi-1 >= 2000 {
		return ephHi + 1, portRangeHigh
	}
	return portRangeLow, portRangeHigh
}

// ports hands out ports within one process; leases extend that across test processes.
var ports struct {
	sync.Mutex
	lo, hi, next int
	given        map[int]bool
}

// FreePort returns a port that is free on 127.0.0.1 and ::1 for both TCP and UDP and that no other caller
// in any test process holds. The port stays reserved until the test ends; a process never hands
// out the same port twice, so a port a finished test left in TIME_WAIT is not reused.
func FreePort(t testing.TB) int {
	t.Helper()
	ports.Lock()
	defer ports.Unlock()
	initPorts()
	dir := filepath.Join(testbedRoot(), "ports")
	_ = os.MkdirAll(dir, 0o755) // failure shows up as leasePort's error, handled below
	span := ports.hi - ports.lo
	for range span {
		p := ports.next
		ports.next++
		if ports.next >= ports.hi {
			ports.next = ports.lo
		}
		if ports.given[p] {
			continue
		}
		lease, err := leasePort(dir, p)
		if errors.Is(err, errLeaseHeld) {
			continue
		}
		if err != nil {
			// Leases only guard against other test processes; without a writable lease
			// directory (an unprivileged run) the bind check alone has to do.
			lease = nil
		}
		if err := portFree(p); err != nil {
			lease.release()
			continue
		}
		ports.given[p] = true
		t.Cleanup(lease.release)
		return p
	}
	t.Fatalf("FreePort: no free port in [%d, %d)", ports.lo, ports.hi)
	return 0
}

// FreePortRange returns the first of n consecutive ports, each as FreePort would return it: free
// on loopback for TCP and UDP, leased for the test's life, never handed out before by this process.
// It is for publishing a range (`-p 127.0.0.1:lo-hi:...`), which needs the ports side by side.
func FreePortRange(t testing.TB, n int) int {
	t.Helper()
	if n < 1 {
		t.Fatalf("FreePortRange(%d): want at least one port", n)
	}
	ports.Lock()
	defer ports.Unlock()
	initPorts()
	dir := filepath.Join(testbedRoot(), "ports")
	_ = os.MkdirAll(dir, 0o755)
	span := ports.hi - ports.lo
	if n > span {
		t.Fatalf("FreePortRange(%d): the test port range [%d, %d) is smaller", n, ports.lo, ports.hi)
	}
	first := ports.next
	var held []*portLease
	releaseAll := func() {
		for _, l := range held {
			l.release()
		}
		held = nil
	}
	// Slide a window over the range: on a taken port, start again just after it.
	for tried := 0; tried < span; {
		if first+n > ports.hi {
			releaseAll()
			tried += ports.hi - first
			first = ports.lo
			continue
		}
		ok := true
		for p := first + len(held); p < first+n; p++ {
			lease, err := leasePort(dir, p)
			if errors.Is(err, errLeaseHeld) || ports.given[p] {
				lease.release()
				ok = false
			} else {
				if err != nil {
					lease = nil // no lease directory: the bind check alone has to do
				}
				if portFree(p) != nil {
					lease.release()
					ok = false
				}
			}
			if !ok {
				releaseAll()
				tried += p + 1 - first
				first = p + 1
				break
			}
			held = append(held, lease)
		}
		if ok {
			for p := first; p < first+n; p++ {
				ports.given[p] = true
			}
			ports.next = first + n
			if ports.next >= ports.hi {
				ports.next = ports.lo
			}
			for _, l := range held {
				t.Cleanup(l.release)
			}
			return first
		}
	}
	t.Fatalf("FreePortRange: no %d free consecutive ports in [%d, %d)", n, ports.lo, ports.hi)
	return 0
}

// initPorts sets up the range on first use; callers hold ports.
func initPorts() {
	if ports.given != nil {
		return
	}
	b, _ := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	ports.lo, ports.hi = portRangeFor(string(b))
	// A random start keeps concurrent test processes out of each other's way.
	ports.next = ports.lo + rand.IntN(ports.hi-ports.lo)
	ports.given = map[int]bool{}
}

type portLease struct{ f *os.File }

// errLeaseHeld means another caller holds the port.
var errLeaseHeld = errors.New("port lease held")

// leasePort locks the port's lease file. The lease is held for the test's life through the
// open file, so a crashed test process releases it without any cleaning.
func leasePort(dir string, port int) (*portLease, error) {
	path := filepath.Join(dir, strconv.Itoa(port))
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, errLeaseHeld
		}
		return nil, err
	}
	// The holder removes the file before unlocking it; if that happened between our open and
	// our lock, we locked an orphaned inode and the lease is not ours.
	var opened, current syscall.Stat_t
	if syscall.Fstat(int(f.Fd()), &opened) != nil || syscall.Stat(path, &current) != nil || opened.Ino != current.Ino {
		f.Close()
		return nil, errLeaseHeld
	}
	return &portLease{f: f}, nil
}

func (l *portLease) release() {
	if l == nil {
		return
	}
	_ = os.Remove(l.f.Name())
	l.f.Close()
}

// portFree checks by binding: TCP and UDP must both be available on 127.0.0.1 and, where the
// host has IPv6 loopback, on ::1, since tests publish on either.
func portFree(port int) error {
	for _, host := range []string{"127.0.0.1", "::1"} {
		addr := net.JoinHostPort(host, strconv.Itoa(port))
		for _, network := range []string{"tcp", "udp"} {
			err := bindBriefly(network, addr)
			if err != nil && host == "::1" && noIPv6(err) {
				break
			}
			if err != nil {
				return fmt.Errorf("%s %s: %w", network, addr, err)
			}
		}
	}
	return nil
}

func bindBriefly(network, addr string) error {
	if network == "tcp" {
		ln, err := net.Listen(network, addr)
		if err != nil {
			return err
		}
		return ln.Close()
	}
	pc, err := net.ListenPacket(network, addr)
	if err != nil {
		return err
	}
	return pc.Close()
}

// noIPv6 tells a host without IPv6 loopback from a port that is taken.
func noIPv6(err error) bool {
	return errors.Is(err, syscall.EADDRNOTAVAIL) || errors.Is(err, syscall.EAFNOSUPPORT)
}
