package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// drainPoll is how often the drain looks at Envoy's open connections.
const drainPoll = 100 * time.Millisecond

// admin is Envoy's admin interface.
type admin struct {
	base   string // http://127.0.0.1:9901
	client *http.Client
}

// drain is what a planned stop (docker stop, compose restart, an upgrade) does before Envoy
// exits, so that nothing is refused and no request is cut:
//
//  1. POST /healthcheck/fail: from now on every HTTP response closes its connection
//     ("Connection: close"), so keep-alive clients open new connections;
//  2. POST /drain_listeners: Envoy closes its listening sockets at once, and each port's new
//     connections go to the shim's socket beside them (package shim/handover), which serves the
//     port until the next Envoy listens; what Envoy's sockets had queued moves there too
//     (net.ipv4.tcp_migrate_req, which the server sets);
//  3. it waits until Envoy has no downstream connection left (its listeners'
//     downstream_cx_active), or until limit: a long-lived TCP connection is cut then.
//
// Any step failing (Envoy not up yet) ends the drain early: the stop goes on.
func (a admin) drain(ctx context.Context, limit time.Duration, log *slog.Logger) {
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	for _, path := range []string{"/healthcheck/fail", "/drain_listeners"} {
		if err := a.post(ctx, path); err != nil {
			log.Warn("drain: Envoy did not answer; stopping it without draining", "err", err)
			return
		}
	}
	log.Info("drain: Envoy's listeners are closed; the shims take new connections", "took", time.Since(start).Round(time.Millisecond))
	for {
		n, err := a.connections(ctx)
		if err == nil && n == 0 {
			log.Info("drain: no connection left", "took", time.Since(start).Round(time.Millisecond))
			return
		}
		select {
		case <-ctx.Done():
			log.Info("drain: time is up; the connections left are cut", "connections", n, "limit", limit, "err", err)
			return
		case <-time.After(drainPoll):
		}
	}
}

func (a admin) post(ctx context.Context, path string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, a.base+path, nil)
	if err != nil {
		return err
	}
	resp, err := a.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("POST %s: %s %s", path, resp.Status, strings.TrimSpace(string(body)))
	}
	return nil
}

// connections is Envoy's count of open downstream connections, on every listener but the admin
// interface's. (server.total_connections would be simpler, but Envoy updates it only when it
// flushes its stats, every 5 s.)
func (a admin) connections(ctx context.Context) (int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, a.base+"/stats?filter=%5Elistener%5C..*%5C.downstream_cx_active%24", nil)
	if err != nil {
		return 0, err
	}
	resp, err := a.client.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return 0, err
	}
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("GET /stats: %s", resp.Status)
	}
	return parseActiveConnections(string(body))
}

// parseActiveConnections sums "listener.<address>.downstream_cx_active: N" over Envoy's text
// stats, leaving out the admin interface and the per-thread breakdowns of the same counts.
func parseActiveConnections(stats string) (int, error) {
	total := 0
	for line := range strings.Lines(stats) {
		name, value, ok := strings.Cut(strings.TrimSpace(line), ": ")
		if !ok || !strings.HasPrefix(name, "listener.") || !strings.HasSuffix(name, ".downstream_cx_active") ||
			strings.HasPrefix(name, "listener.admin.") || strings.Contains(name, ".worker_") || strings.Contains(name, ".main_thread.") {
			continue
		}
		n, err := strconv.Atoi(value)
		if err != nil {
			return 0, fmt.Errorf("stat %s of Envoy: %q is not a count", name, value)
		}
		total += n
	}
	return total, nil
}
