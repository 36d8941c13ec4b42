package e2e

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	pb "github.com/envoy-docker-shim/envoy-docker-shim/services/registration/registrationpb"
	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
)

// testConnectionLoop: clients connect back to back, each connection one echo round trip, while
// a port of a serving container is published, and for a while after. Before the port first opens
// a refusal is expected; from then on every connection must get its echo. Under dockerd 29 the
// daemon binds the port and passes it to the shim on fd 4, under 20.10 the shim binds it; either
// way the shim serves it until Envoy's listener joins, and then steers new connections to Envoy
// meanwhile: this is that handover under a real daemon (issue 9).
//
// The port is published by `docker network connect` of a running container whose only network
// so far was internal (no gateway, so no published port): `docker run -p` publishes before the
// container's process starts, and a connection in between is answered by nobody, through
// docker-proxy just as through the shim.
func testConnectionLoop(t *testing.T, s *setup) {
	d := s.daemon
	const inside = "loop-internal"
	d.MustDocker(t, "network", "create", "--internal", inside)
	port := testbed.FreePort(t)
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	c := d.Run(t, testbed.RunOptions{
		Publish: []string{fmt.Sprintf("127.0.0.1:%d:7", port)},
		Labels:  map[string]string{"ServiceName": "loop", "EnvironmentName": "test", "ProxyMode": "tcp"},
		Flags:   []string{"--network", inside},
	})
	if shims := s.shims(port); len(shims) != 0 {
		t.Fatalf("port %d published on an internal network: shims %v", port, shims)
	}
	loop := startConnectionLoop(addr, 8, 30*time.Second)
	time.Sleep(100 * time.Millisecond) // refused meanwhile: nothing listens yet
	d.MustDocker(t, "network", "connect", "bridge", c.ID)
	returned := time.Since(loop.began)
	for _, r := range s.listed(t, port) {
		if r.GetService() != "loop-test" || r.GetMode() != pb.Mode_MODE_TCP || r.GetContainerId() != c.ID {
			t.Errorf("registration %v; want service loop-test in tcp mode, container %s", r, c.ID)
		}
	}
	testbed.WaitFor(t, 10*time.Second, "the shim's log of the handover", func() error {
		if line := serverLogLine(s.stack.LogPath, "port handed over to Envoy", addr); line == "" {
			return errors.New("not logged yet")
		}
		return nil
	})
	time.Sleep(500 * time.Millisecond) // the loop goes on through Envoy alone for a while
	res := loop.stop()
	t.Logf("%s: %d round trips, %d refused before the port opened, %d failures; the port opened %s and docker network connect returned %s after the loop began",
		c.Name, res.ok, res.early, len(res.errs), res.opened.Sub(loop.began).Round(time.Millisecond), returned.Round(time.Millisecond))
	if len(res.errs) > 0 {
		t.Errorf("%d connections failed (want 0), e.g. %q", len(res.errs), res.errs[:min(5, len(res.errs))])
	}
	if res.ok < 100 {
		t.Fatalf("only %d round trips: the loop was not tight", res.ok)
	}
	var envoy int64
	testbed.WaitFor(t, 5*time.Second, "Envoy's count of the loop's connections", func() error {
		envoy, _ = s.stack.Envoy.Stat(t, "tcp.loop-test.downstream_cx_total")
		if envoy < 1 {
			return fmt.Errorf("tcp.loop-test.downstream_cx_total = %d", envoy)
		}
		return nil
	})
	// The shim's socket served the connections that came before Envoy's listener, and the shim
	// keeps it (for whenever Envoy is away): it holds one of the sockets listening on the port.
	if shim := int64(res.ok) - envoy; shim <= 0 {
		t.Errorf("the loop never went through the shim's socket (Envoy counted %d of %d)", envoy, res.ok)
	} else {
		t.Logf("served through the shim's socket before the handover: %d; by Envoy: %d", shim, envoy)
	}
	listening := listeningInodes(t, port)
	if len(listening) == 0 {
		t.Fatalf("nothing listens on %s", addr)
	}
	held := 0
	for _, pid := range s.shims(port) {
		for _, ino := range socketInodes(t, pid) {
			if listening[ino] {
				held++
			}
		}
	}
	if held != 1 || len(listening) < 2 {
		t.Errorf("%d of the %d sockets listening on %s are the shim's, want 1 beside Envoy's", held, len(listening), addr)
	}
}

type loopResult struct {
	ok     int
	early  int       // refused before the port first opened
	opened time.Time // when the first round trip succeeded
	errs   []string
}

type connectionLoop struct {
	wg       sync.WaitGroup
	done     chan struct{}
	once     sync.Once
	openedAt atomic.Int64 // UnixNano of the first success; 0 before
	mu       sync.Mutex
	res      loopResult
	began    time.Time
}

// startConnectionLoop runs workers that connect back to back until stop or limit. A refusal
// counts as a failure only if its attempt began after the first success: the port was open by
// then; any other error (a reset, a connection that is never answered) always counts. Each
// connection ends with a reset after its round trip, so that thousands of TIME_WAIT sockets do
// not exhaust the ephemeral ports (a failure of the loop, not of the port).
func startConnectionLoop(addr string, workers int, limit time.Duration) *connectionLoop {
	l := &connectionLoop{done: make(chan struct{}), began: time.Now()}
	end := time.Now().Add(limit)
	for w := range workers {
		l.wg.Go(func() {
			for i := 0; time.Now().Before(end); i++ {
				select {
				case <-l.done:
					return
				default:
				}
				began := time.Now()
				err := roundTrip(addr, fmt.Sprintf("w%d-%d\n", w, i))
				opened := l.openedAt.Load()
				l.mu.Lock()
				switch {
				case err == nil:
					l.res.ok++
					if opened == 0 {
						l.openedAt.CompareAndSwap(0, time.Now().UnixNano())
					}
				case errors.Is(err, syscall.ECONNREFUSED) && (opened == 0 || began.UnixNano() < opened):
					l.res.early++
				default:
					l.res.errs = append(l.res.errs, err.Error())
				}
				l.mu.Unlock()
				if err != nil && opened == 0 {
					time.Sleep(time.Millisecond) // refused: the port is not there yet
				}
			}
		})
	}
	return l
}

func (l *connectionLoop) stop() loopResult {
	l.once.Do(func() { close(l.done) })
	l.wg.Wait()
	if n := l.openedAt.Load(); n != 0 {
		l.res.opened = time.Unix(0, n)
	}
	return l.res
}

func roundTrip(addr, msg string) error {
	c, err := testbed.Dial(context.Background(), "tcp", addr)
	if err != nil {
		return err
	}
	defer func() { _ = c.(*net.TCPConn).SetLinger(0); c.Close() }()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := io.WriteString(c, msg); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if string(buf) != msg {
		return fmt.Errorf("echo %q, want %q", buf, msg)
	}
	return nil
}

// serverLogLine returns the first line of the server's log that contains all of parts.
func serverLogLine(path string, parts ...string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		line := sc.Text()
		all := true
		for _, p := range parts {
			all = all && strings.Contains(line, p)
		}
		if all {
			return line
		}
	}
	return ""
}

// listeningInodes lists the inodes of the IPv4 TCP sockets listening on port.
func listeningInodes(t *testing.T, port int) map[uint64]bool {
	t.Helper()
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		t.Fatal(err)
	}
	out := map[uint64]bool{}
	suffix := fmt.Sprintf(":%04X", port)
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		// sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
		if len(f) < 10 || !strings.HasSuffix(f[1], suffix) || f[3] != "0A" {
			continue
		}
		if ino, err := strconv.ParseUint(f[9], 10, 64); err == nil {
			out[ino] = true
		}
	}
	return out
}

// socketInodes lists the socket inodes pid holds.
func socketInodes(t *testing.T, pid int) []uint64 {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []uint64
	for _, e := range entries {
		target, err := os.Readlink(dir + "/" + e.Name())
		if err != nil {
			continue
		}
		var ino uint64
		if _, err := fmt.Sscanf(target, "socket:[%d]", &ino); err == nil {
			out = append(out, ino)
		}
	}
	return out
}
