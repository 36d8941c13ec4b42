package server_test

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
	"github.com/envoy-docker-shim/envoy-docker-shim/testbed/stack"
)

// TestE2EAccessLogLabel: a container's AccessLog label decides whether Envoy logs its traffic,
// whatever the server's EDS_ACCESS_LOG says; without the label the server's setting holds. A
// port that must not be logged gets its traffic first, so the line of a logged port, flushed
// later from the same buffer, proves the quiet one would have shown by then.
func TestE2EAccessLogLabel(t *testing.T) {
	testbed.RequireDocker(t)
	daemon := testbed.StartDaemon(t, testbed.DaemonOptions{})
	run := func(name, mode, accessLog string) *testbed.Container {
		labels := map[string]string{"ServiceName": name, "ProxyMode": mode}
		if accessLog != "" {
			labels["AccessLog"] = accessLog
		}
		return daemon.Run(t, testbed.RunOptions{Labels: labels})
	}
	labelOn, labelOnTCP := run("label-on", "http", "true"), run("label-on-tcp", "tcp", "true")
	labelOff, unlabelled := run("label-off", "http", "false"), run("unlabelled", "http", "")
	// The service each is named after: its ServiceName label.
	service := map[*testbed.Container]string{labelOn: "label-on", labelOnTCP: "label-on-tcp", labelOff: "label-off", unlabelled: "unlabelled"}
	for _, tc := range []struct {
		server            bool
		quiet             []*testbed.Container
		logged, loggedTCP *testbed.Container
	}{
		{server: false, quiet: []*testbed.Container{unlabelled, labelOff}, logged: labelOn, loggedTCP: labelOnTCP},
		{server: true, quiet: []*testbed.Container{labelOff}, logged: unlabelled, loggedTCP: labelOnTCP},
	} {
		t.Run(fmt.Sprintf("EDS_ACCESS_LOG=%v", tc.server), func(t *testing.T) {
			st := stack.Start(t, stack.Options{DockerHost: daemon.Host, AccessLog: tc.server})
			listener := func(c *testbed.Container) string {
				port := testbed.FreePort(t)
				ready(t, first(st.Register(t, stack.TCP(port, c.IP.String(), 80))))
				return fmt.Sprintf("127.0.0.1:%d", port)
			}
			var quiet []string
			for _, c := range tc.quiet {
				addr := listener(c)
				get(t, addr)
				quiet = append(quiet, "listener=tcp_"+strings.Replace(addr, ":", "_", 1))
			}
			logged := listener(tc.logged)
			get(t, logged)
			loggedTCP := listener(tc.loggedTCP)
			if _, err := testbed.TCPEcho(context.Background(), loggedTCP, []byte("ping")); err != nil {
				t.Fatal(err)
			}
			// A line names the service: service= (http) or cluster= (tcp, the cluster's stat name).
			want := []string{"service=" + service[tc.logged] + ` "GET / HTTP/1.1" 200`, "listener=tcp_" + strings.Replace(logged, ":", "_", 1),
				"cluster=" + service[tc.loggedTCP], "listener=tcp_" + strings.Replace(loggedTCP, ":", "_", 1)}
			// Envoy flushes its access log every 10 s (--file-flush-interval-msec) or when its buffer fills.
			var log string
			testbed.WaitFor(t, 15*time.Second, "the access-log lines of the logged ports", func() error {
				b, _ := os.ReadFile(st.Envoy.LogPath)
				log = string(b)
				for _, w := range want {
					if !strings.Contains(log, w) {
						return fmt.Errorf("no line with %s", w)
					}
				}
				return nil
			})
			// The line of an HTTP request carries the request ID Envoy gave it.
			if !regexp.MustCompile(`service=` + service[tc.logged] + ` .* id=[0-9a-f]{8}-[0-9a-f]{4}-`).MatchString(log) {
				t.Errorf("no request ID in the access-log line of %s:\n%s", service[tc.logged], log)
			}
			for _, q := range quiet {
				if strings.Contains(log, q) {
					t.Errorf("a port that must not be logged was: %s in\n%s", q, log)
				}
			}
		})
	}
}

func get(t *testing.T, addr string) {
	t.Helper()
	status, body, err := testbed.HTTPGet(context.Background(), "http://"+addr+"/")
	if err != nil || status != http.StatusOK {
		t.Fatalf("GET %s: %d %q %v", addr, status, body, err)
	}
}
