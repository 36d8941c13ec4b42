package server_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
	"github.com/envoy-docker-shim/envoy-docker-shim/testbed/stack"
)

// clientIP is the loopback address the tests' clients connect from: not the 127.0.0.1 that
// Envoy's own connections or a default would show, so seeing it proves the client's address
// was passed on.
const clientIP = "127.0.0.7"

// dialFrom connects to addr (an allowed test target) from clientIP.
func dialFrom(ctx context.Context, addr string) (net.Conn, error) {
	if err := testbed.CheckTarget(addr); err != nil {
		return nil, err
	}
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(clientIP)}, Timeout: 5 * time.Second}
	return d.DialContext(ctx, "tcp", addr)
}

// TestE2EClientAddress: the container learns the client's address, which docker-proxy hides. In
// http mode it is the X-Forwarded-For header Envoy adds; in tcp mode, a container labelled
// ProxyProtocol=v1 or v2 gets a PROXY protocol header of that version in front of the client's
// bytes, naming the client's address and port and the published address; one without the label
// gets the client's bytes alone. ProxyProtocol on an http-mode container fails its registration
// with a message saying what to do.
func TestE2EClientAddress(t *testing.T) {
	testbed.RequireDocker(t)
	daemon := testbed.StartDaemon(t, testbed.DaemonOptions{})
	web := daemon.Run(t, testbed.RunOptions{Labels: map[string]string{"ServiceName": "web"}})
	proxied := map[string]*testbed.Container{}
	for _, version := range []string{"v1", "v2"} {
		proxied[version] = daemon.Run(t, testbed.RunOptions{
			Labels: map[string]string{"ServiceName": "pp-" + version, "ProxyMode": "tcp", "ProxyProtocol": version},
			Env:    map[string]string{"ECHO_PROXY_PORTS": "8"},
		})
	}
	plain := daemon.Run(t, testbed.RunOptions{Labels: map[string]string{"ServiceName": "plain", "ProxyMode": "tcp"}})
	misplaced := daemon.Run(t, testbed.RunOptions{Labels: map[string]string{"ServiceName": "misplaced", "ProxyProtocol": "v1"}})
	st := stack.Start(t, stack.Options{DockerHost: daemon.Host})

	t.Run("http mode: X-Forwarded-For", func(t *testing.T) {
		port := testbed.FreePort(t)
		ready(t, first(st.Register(t, stack.TCP(port, web.IP.String(), 80))))
		client := &http.Client{Transport: &http.Transport{Proxy: nil, DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			return dialFrom(ctx, addr)
		}, DisableKeepAlives: true}}
		// get sends a request with the X-Forwarded-For the client claims ("" for none) and
		// returns what the container received and its peer's address.
		get := func(claimed string) (xff []string, peer string) {
			t.Helper()
			req, err := http.NewRequest(http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d/", port), nil)
			if err != nil {
				t.Fatal(err)
			}
			if claimed != "" {
				req.Header.Set("X-Forwarded-For", claimed)
			}
			resp, err := client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			var reply struct {
				Remote  string      `json:"remote"`
				Headers http.Header `json:"headers"`
			}
			if err := json.NewDecoder(resp.Body).Decode(&reply); err != nil {
				t.Fatal(err)
			}
			return reply.Headers.Values("X-Forwarded-For"), reply.Remote
		}
		xff, peer := get("")
		if len(xff) != 1 || xff[0] != clientIP {
			t.Errorf("the container got X-Forwarded-For %q, want %q (its peer is %s)", xff, clientIP, peer)
		}
		// What the header makes up for: the container's peer is Envoy, not the client.
		if strings.HasPrefix(peer, clientIP+":") {
			t.Errorf("the container's peer is the client %s itself: nothing proxied the request", peer)
		}
		// A client's own claim stays in front; the address Envoy saw is the last one.
		xff, _ = get("203.0.113.9")
		if list := strings.Split(strings.Join(xff, ","), ","); len(list) != 2 || strings.TrimSpace(list[0]) != "203.0.113.9" || strings.TrimSpace(list[1]) != clientIP {
			t.Errorf("with a claimed 203.0.113.9, the container got X-Forwarded-For %q, want 203.0.113.9 then %s", xff, clientIP)
		}
	})

	for _, version := range []string{"v1", "v2"} {
		t.Run("tcp mode: ProxyProtocol="+version, func(t *testing.T) {
			port := testbed.FreePort(t)
			ready(t, first(st.Register(t, stack.TCP(port, proxied[version].IP.String(), 8))))
			published := fmt.Sprintf("127.0.0.1:%d", port)
			conn, err := dialFrom(context.Background(), published)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
			if _, err := io.WriteString(conn, "hello\n"); err != nil {
				t.Fatal(err)
			}
			r := bufio.NewReader(conn)
			header, err := r.ReadString('\n')
			if err != nil {
				t.Fatalf("reading the container's answer: %q, %v", header, err)
			}
			want := fmt.Sprintf("PROXY %s %s %s\n", version, conn.LocalAddr(), published)
			if header != want {
				t.Errorf("the container read the PROXY header as %q, want %q", header, want)
			}
			if echo, err := r.ReadString('\n'); err != nil || echo != "hello\n" {
				t.Errorf("echo after the header: %q, %v", echo, err)
			}
		})
	}

	t.Run("tcp mode without the label: the client's bytes alone", func(t *testing.T) {
		port := testbed.FreePort(t)
		ready(t, first(st.Register(t, stack.TCP(port, plain.IP.String(), 7))))
		got, err := testbed.TCPEcho(context.Background(), fmt.Sprintf("127.0.0.1:%d", port), []byte("hello"))
		if err != nil || string(got) != "hello" {
			t.Fatalf("echo: %q, %v", got, err)
		}
	})

	t.Run("ProxyProtocol in http mode is refused with what to do", func(t *testing.T) {
		resp, _ := st.Register(t, stack.TCP(testbed.FreePort(t), misplaced.IP.String(), 80))
		if msg := resp.GetFailed().GetReason(); !strings.Contains(msg, "ProxyProtocol=v1 needs ProxyMode=tcp") {
			t.Errorf("registration answered %v, want a failure naming ProxyMode=tcp", resp)
		}
	})
}
