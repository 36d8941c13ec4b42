package handover

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/shim/logging"

	"golang.org/x/sys/unix"

	"github.com/envoy-docker-shim/envoy-docker-shim/shim/shimtest"
)

var quiet = logging.Discard()

// server answers each line with its name and the line: "name:line".
func serveLines(l net.Listener, name string, count *atomic.Int64) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		count.Add(1)
		go func() {
			defer c.Close()
			r := bufio.NewReader(c)
			for {
				line, err := r.ReadString('\n')
				if err != nil {
					return
				}
				fmt.Fprintf(c, "%s:%s", name, line)
			}
		}()
	}
}

// fakeEnvoy listens with SO_REUSEPORT on addr with n sockets, as Envoy's workers do.
type fakeEnvoy struct {
	ls     []net.Listener
	counts []*atomic.Int64
}

func startFakeEnvoy(t *testing.T, addr netip.AddrPort, n int) *fakeEnvoy {
	t.Helper()
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1) })
		return serr
	}}
	lc.SetMultipathTCP(false) // Envoy's sockets are plain TCP
	e := &fakeEnvoy{}
	for i := range n {
		l, err := lc.Listen(context.Background(), "tcp", addr.String())
		if err != nil {
			t.Fatalf("envoy socket %d: %v", i, err)
		}
		c := new(atomic.Int64)
		e.ls, e.counts = append(e.ls, l), append(e.counts, c)
		go serveLines(l, "envoy", c)
	}
	t.Cleanup(func() {
		for _, l := range e.ls {
			l.Close()
		}
	})
	return e
}

// clients connect in a tight loop until stop, each doing one line round trip, and record who
// answered and every failure.
type clients struct {
	mu       sync.Mutex
	errs     []string
	byServer map[string]int
	after    map[string]int // answers to connections started after the mark
	mark     time.Time
	wg       sync.WaitGroup
}

func runClients(addr netip.AddrPort, workers int, stop <-chan struct{}) *clients {
	cl := &clients{byServer: map[string]int{}, after: map[string]int{}}
	for w := range workers {
		cl.wg.Add(1)
		go func() {
			defer cl.wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				start := time.Now()
				who, err := roundTrip(addr, fmt.Sprintf("w%d-%d", w, i))
				cl.mu.Lock()
				if err != nil {
					cl.errs = append(cl.errs, err.Error())
				} else {
					cl.byServer[who]++
					if !cl.mark.IsZero() && start.After(cl.mark) {
						cl.after[who]++
					}
				}
				cl.mu.Unlock()
			}
		}()
	}
	return cl
}

func (cl *clients) setMark() { cl.mu.Lock(); cl.mark = time.Now(); cl.mu.Unlock() }

func roundTrip(addr netip.AddrPort, msg string) (string, error) {
	c, err := net.DialTimeout("tcp", addr.String(), 2*time.Second)
	if err != nil {
		return "", err
	}
	// Close with a reset once done: thousands of TIME_WAIT sockets would make the loop itself
	// fail (ephemeral ports run out), which is not what is being tested.
	defer func() { c.(*net.TCPConn).SetLinger(0); c.Close() }()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := fmt.Fprintf(c, "%s\n", msg); err != nil {
		return "", err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("%s: %w", msg, err)
	}
	who, rest, ok := strings.Cut(strings.TrimSpace(line), ":")
	if !ok || rest != msg {
		return "", fmt.Errorf("%s: bad answer %q", msg, line)
	}
	return who, nil
}

func adopt(t *testing.T, host netip.AddrPort) (*Listener, netip.AddrPort, *os.File) {
	t.Helper()
	backend, err := net.Listen("tcp", netip.AddrPortFrom(host.Addr(), 0).String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { backend.Close() })
	go serveLines(backend, "container", new(atomic.Int64))
	sock, err := shimtest.ListenTCP(host) // as dockerd 28+ creates it
	if err != nil {
		t.Fatal(err)
	}
	daemonCopy, err := dupFile(sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { daemonCopy.Close() })
	sa, _ := unix.Getsockname(int(sock.Fd()))
	host = sockaddr(sa)
	l, err := Adopt(sock, host, netip.MustParseAddrPort(backend.Addr().String()), quiet)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- l.Serve() }()
	t.Cleanup(func() {
		l.Close()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return l, host, daemonCopy
}

func dupFile(f *os.File) (*os.File, error) {
	fd, err := unix.Dup(int(f.Fd()))
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(fd), "daemon copy"), nil
}

// The contract's handover requirement: "hand the port over to Envoy without a window in which
// clients are refused" — zero refused or reset connections while Envoy's sockets join and the
// shim's socket leaves, and afterwards only Envoy answers, on all of its sockets.
func TestHandOverLosesNoConnection(t *testing.T) {
	for _, tc := range []struct {
		name    string
		host    string
		sockets int
	}{
		{"ipv4 two workers", "127.0.0.1:0", 2},
		{"ipv4 one worker", "127.0.0.1:0", 1},
		{"ipv4 four workers", "127.0.0.1:0", 4},
		{"ipv6", "[::1]:0", 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l, host, daemonCopy := adopt(t, netip.MustParseAddrPort(tc.host))
			stop := make(chan struct{})
			cl := runClients(host, 4, stop)
			time.Sleep(200 * time.Millisecond) // the shim alone serves
			daemonCopy.Close()                 // dockerd closes its copy after "0\n"

			envoy := startFakeEnvoy(t, host, tc.sockets)
			time.Sleep(100 * time.Millisecond) // shared: the kernel splits between shim and Envoy
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := l.HandOver(ctx); err != nil {
				t.Fatalf("HandOver: %v", err)
			}
			if !l.HandedOver() {
				t.Fatal("not handed over")
			}
			cl.setMark()
			time.Sleep(300 * time.Millisecond)
			close(stop)
			cl.wg.Wait()

			if len(cl.errs) > 0 {
				t.Fatalf("%d failed connections, e.g. %v", len(cl.errs), cl.errs[:min(5, len(cl.errs))])
			}
			if cl.byServer["container"] == 0 {
				t.Error("the shim served nothing before the handover")
			}
			if cl.after["container"] != 0 || cl.after["envoy"] == 0 {
				t.Errorf("after the handover: %v, want Envoy only", cl.after)
			}
			for i, c := range envoy.counts {
				if c.Load() == 0 {
					t.Errorf("Envoy socket %d got no connection: %v", i, envoy.counts)
				}
			}
			if still, _ := listening(host, l.inode); still {
				t.Error("the shim's socket still listens")
			}
			t.Logf("answers: %v; after handover: %v", cl.byServer, cl.after)
		})
	}
}

// After the handover the program left in the group must behave like the kernel's plain hash:
// no Envoy socket is starved.
func TestAfterHandOverEnvoySocketsShareEvenly(t *testing.T) {
	l, host, daemonCopy := adopt(t, netip.MustParseAddrPort("127.0.0.1:0"))
	daemonCopy.Close()
	envoy := startFakeEnvoy(t, host, 2)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := l.HandOver(ctx); err != nil {
		t.Fatal(err)
	}
	before := []int64{envoy.counts[0].Load(), envoy.counts[1].Load()}
	for i := range 400 {
		if _, err := roundTrip(host, fmt.Sprint(i)); err != nil {
			t.Fatal(err)
		}
	}
	a, b := envoy.counts[0].Load()-before[0], envoy.counts[1].Load()-before[1]
	if a < 120 || b < 120 { // 200 each expected; "1 + rand % N" left behind would give ~300/100
		t.Errorf("connections per Envoy socket after handover: %d and %d", a, b)
	}
}

// Without Envoy's sockets on the address the shim keeps serving and HandOver waits.
func TestNoEnvoyKeepsServing(t *testing.T) {
	l, host, _ := adopt(t, netip.MustParseAddrPort("127.0.0.1:0"))
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	if err := l.HandOver(ctx); err == nil {
		t.Fatal("HandOver succeeded without Envoy")
	}
	if who, err := roundTrip(host, "still there"); err != nil || who != "container" {
		t.Fatalf("after a failed handover: %q, %v", who, err)
	}
}

func TestSockDiagSeesListener(t *testing.T) {
	f, err := shimtest.ListenTCP(netip.MustParseAddrPort("127.0.0.1:0"))
	if err != nil {
		t.Fatal(err)
	}
	sa, _ := unix.Getsockname(int(f.Fd()))
	var st unix.Stat_t
	unix.Fstat(int(f.Fd()), &st)
	addr := sockaddr(sa)
	if ok, err := listening(addr, st.Ino); !ok || err != nil {
		t.Fatalf("listening = %v, %v", ok, err)
	}
	if n, err := peers(addr, st.Ino); n != 0 || err != nil {
		t.Fatalf("peers = %d, %v", n, err)
	}
	f.Close()
	if ok, err := listening(addr, st.Ino); ok || err != nil {
		t.Fatalf("after close: listening = %v, %v", ok, err)
	}
}

func TestAdoptChecksTheSocket(t *testing.T) {
	host := netip.MustParseAddrPort("127.0.0.1:0")
	udp, err := shimtest.BindUDP(host)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Adopt(udp, host, host, quiet); err == nil || !strings.Contains(err.Error(), "not a TCP socket") {
		t.Errorf("UDP socket: %v", err)
	}
	tcp, err := shimtest.ListenTCP(host)
	if err != nil {
		t.Fatal(err)
	}
	other := netip.MustParseAddrPort("127.0.0.1:1")
	if _, err := Adopt(tcp, other, host, quiet); err == nil || !strings.Contains(err.Error(), "not to 127.0.0.1:1") {
		t.Errorf("wrong address: %v", err)
	}
}
