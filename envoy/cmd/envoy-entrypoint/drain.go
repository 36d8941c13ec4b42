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
//  3. it waits until Envoy has no downstream connection left (server.total_connections), or
//     until limit: a long-lived TCP connection is cut then.
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

// connections is Envoy's count of open downstream connections, on every listener (not the
// admin interface's).
func (a admin) connections(ctx context.Context) (int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, a.base+"/stats?filter=%5Eserver%5C.total_connections%24", nil)
	if err != nil {
		return 0, err
	}
	resp, err := a.client.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if err != nil {
		return 0, err
	}
	return parseTotalConnections(string(body))
}

// parseTotalConnections reads "server.total_connections: N" from Envoy's text stats.
func parseTotalConnections(stats string) (int, error) {
	for line := range strings.Lines(stats) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "server.total_connections: "); ok {
			return strconv.Atoi(v)
		}
	}
	return 0, fmt.Errorf("no server.total_connections in Envoy's stats: %.200q", stats)
}
