package soak

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
)

// steadyLoad is keep-alive HTTP to one long-lived container, running beside the churn: the
// cycles' ports come and go, and this port must not notice. Each client holds one connection and
// writes its requests by hand, because net/http would silently redial a connection the proxy
// closed, and that is exactly what must be seen.
type steadyLoad struct {
	name string
	c    *testbed.Container // the steady container, when there is one

	requests   atomic.Int64
	errors     atomic.Int64
	reconnects atomic.Int64
	mu         sync.Mutex
	kinds      map[string]int
	examples   []string
	began      time.Time
	stop       context.CancelFunc
	done       sync.WaitGroup
}

// steadyTimeout bounds one request of the steady load.
const steadyTimeout = 5 * time.Second

// startSteady starts the steady container (waiting until it serves: it is not what races) and
// the load on it.
func startSteady(t *testing.T, d *testbed.Daemon, clients int, interval time.Duration) *steadyLoad {
	port := testbed.FreePort(t)
	c := d.Run(t, testbed.RunOptions{
		Name:    "soak-steady",
		Publish: []string{fmt.Sprintf("127.0.0.1:%d:80", port)},
		Labels:  map[string]string{"ServiceName": "soak-steady", "EnvironmentName": "test", "ProxyMode": "http"},
	})
	s := runSteady(t, net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), c.Name, clients, interval)
	s.c = c
	return s
}

// runSteady starts clients that each send a request to addr every interval until stopped, or
// until the test's deadline, whichever comes first; the answers must name name.
func runSteady(t *testing.T, addr, name string, clients int, interval time.Duration) *steadyLoad {
	s := &steadyLoad{name: name, kinds: map[string]int{}, began: time.Now()}
	// Bounded in time by the test's own deadline (go test -timeout), and in count by it too.
	until := time.Now().Add(3 * time.Hour)
	if dl, ok := t.Deadline(); ok {
		until = dl
	}
	ctx, cancel := context.WithDeadline(context.Background(), until)
	s.stop = cancel
	maxRequests := int64(time.Until(until)/interval) + 1
	for range clients {
		s.done.Go(func() { s.client(ctx, addr, interval, maxRequests) })
	}
	t.Cleanup(s.Stop)
	return s
}

// Stop ends the load and waits for the clients (idempotent).
func (s *steadyLoad) Stop() {
	s.stop()
	s.done.Wait()
}

func (s *steadyLoad) client(ctx context.Context, addr string, interval time.Duration, maxRequests int64) {
	var conn net.Conn
	var br *bufio.Reader
	defer func() {
		if conn != nil {
			conn.Close()
		}
	}()
	first := true
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for n := int64(0); n < maxRequests; n++ {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if conn == nil {
			c, err := testbed.Dial(ctx, "tcp", addr)
			if err != nil {
				if ctx.Err() != nil {
					return
				}
				s.fail("dial", err)
				continue
			}
			if !first {
				s.reconnects.Add(1)
			}
			first = false
			conn, br = c, bufio.NewReader(c)
		}
		if err := s.request(conn, br); err != nil {
			s.fail("request", err)
			conn.Close()
			conn = nil
		}
	}
}

// request sends one GET on the kept-alive connection and checks the steady container answered.
func (s *steadyLoad) request(conn net.Conn, br *bufio.Reader) error {
	s.requests.Add(1)
	_ = conn.SetDeadline(time.Now().Add(steadyTimeout))
	if _, err := io.WriteString(conn, "GET /steady HTTP/1.1\r\nHost: soak-steady\r\n\r\n"); err != nil {
		return err
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return err
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	if err != nil {
		return err
	}
	var reply struct{ Name string }
	if resp.StatusCode != http.StatusOK || json.Unmarshal(body, &reply) != nil || reply.Name != s.name {
		return fmt.Errorf("status %d: %.120q", resp.StatusCode, body)
	}
	if resp.Close {
		return fmt.Errorf("the proxy closes the kept-alive connection (Connection: close)")
	}
	return nil
}

func (s *steadyLoad) fail(what string, err error) {
	s.errors.Add(1)
	s.mu.Lock()
	s.kinds[what+": "+errorKind(err)]++
	if len(s.examples) < maxExamples {
		s.examples = append(s.examples, fmt.Sprintf("%v in: %s: %v", time.Since(s.began).Round(time.Millisecond), what, err))
	}
	s.mu.Unlock()
}

func (s *steadyLoad) result() steadyResult {
	s.mu.Lock()
	defer s.mu.Unlock()
	kinds := make(map[string]int, len(s.kinds))
	for k, v := range s.kinds {
		kinds[k] = v
	}
	return steadyResult{Requests: s.requests.Load(), Errors: s.errors.Load(), Reconnects: s.reconnects.Load(), Kinds: kinds, Examples: slices.Clone(s.examples)}
}
