package testbed

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// echoName asks the echo server at an HTTP URL who it is.
func echoName(t testing.TB, url string) (string, error) {
	status, body, err := HTTPGet(t.Context(), url)
	if err != nil {
		return "", err
	}
	if status != http.StatusOK {
		return "", fmt.Errorf("GET %s: status %d: %s", url, status, body)
	}
	var reply struct{ Name, Path string }
	if err := json.Unmarshal([]byte(body), &reply); err != nil {
		return "", fmt.Errorf("GET %s: %w: %q", url, err, body)
	}
	return reply.Name, nil
}

func wantName(got, want string) error {
	if got != want {
		return fmt.Errorf("answered by %q, want %q", got, want)
	}
	return nil
}

// proxyArgs lists the command lines of the userland proxies the daemon runs.
func proxyArgs(d *Daemon) []string {
	var out []string
	for _, p := range instanceProcs(d.Root, "") {
		cmdline := string(bytes.ReplaceAll(bytes.TrimRight(readFile(fmt.Sprintf("/proc/%d/cmdline", p.pid)), "\x00"), []byte{0}, []byte{' '}))
		if strings.Contains(cmdline, "-container-port") {
			out = append(out, cmdline)
		}
	}
	return out
}

// TestStockDockerProxy proves the harness with the proxy the shim replaces, for each daemon
// generation with its own docker-proxy: every published protocol answers through loopback with
// the right container's name, and stopping the container closes the ports.
func TestStockDockerProxy(t *testing.T) {
	t.Parallel()
	for _, gen := range Generations(t) {
		t.Run(string(gen), func(t *testing.T) {
			t.Parallel()
			testStockDockerProxy(t, gen)
		})
	}
}

func testStockDockerProxy(t *testing.T, gen Generation) {
	d := StartDaemon(t, DaemonOptions{Generation: gen})
	// The bridge keeps its address as containers come and go, as dockerd's own bridges do: a
	// bridge that took its lowest port's would leave the containers' gateway entry pointing nowhere.
	bridgeMAC := func() string { return strings.TrimSpace(string(readFile("/sys/class/net/" + d.Bridge + "/address"))) }
	mac := bridgeMAC()
	httpPort, tcpPort, udpPort := FreePort(t), FreePort(t), FreePort(t)
	c := d.Run(t, RunOptions{Publish: []string{
		fmt.Sprintf("127.0.0.1:%d:80", httpPort),
		fmt.Sprintf("127.0.0.1:%d:7", tcpPort),
		fmt.Sprintf("127.0.0.1:%d:7/udp", udpPort),
	}})
	if !d.Subnet.Contains(c.IP) {
		t.Fatalf("container IP %v is not on the daemon's bridge %s", c.IP, d.Subnet)
	}
	proxies := proxyArgs(d)
	wantProxy := fmt.Sprintf("docker-proxy -proto udp -host-ip 127.0.0.1 -host-port %d -container-ip %s -container-port 7", udpPort, c.IP)
	if gen == Docker29 {
		// 28 and later bind the port themselves and pass it on fd 4.
		wantProxy += " -use-listen-fd"
	}
	if len(proxies) != 3 || !containsSuffix(proxies, wantProxy) {
		t.Fatalf("userland proxies = %q, want 3 including %q", proxies, wantProxy)
	}

	httpURL := fmt.Sprintf("http://127.0.0.1:%d/hello", httpPort)
	tcpAddr := net.JoinHostPort("127.0.0.1", strconv.Itoa(tcpPort))
	udpAddr := net.JoinHostPort("127.0.0.1", strconv.Itoa(udpPort))
	WaitFor(t, 10*time.Second, "HTTP through docker-proxy", func() error {
		name, err := echoName(t, httpURL)
		if err != nil {
			return err
		}
		return wantName(name, c.Name)
	})
	name, err := echoName(t, fmt.Sprintf("http://%s/direct", net.JoinHostPort(c.IP.String(), "80")))
	if err != nil || name != c.Name {
		t.Fatalf("HTTP straight to the container on the bridge: %q, %v", name, err)
	}

	got, err := TCPEcho(t.Context(), tcpAddr, []byte("WHOAMI\n"))
	if err != nil || string(got) != c.Name+"\n" {
		t.Fatalf("TCP WHOAMI through docker-proxy = %q, %v; want %q", got, err, c.Name+"\n")
	}
	payload := make([]byte, 1<<20)
	_, _ = rand.Read(payload)
	got, err = TCPEcho(t.Context(), tcpAddr, payload)
	if err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("TCP echo of %d bytes returned %d bytes (equal: %v), %v", len(payload), len(got), bytes.Equal(got, payload), err)
	}

	got, err = UDPEcho(t.Context(), udpAddr, []byte("WHOAMI"))
	if err != nil || string(got) != c.Name {
		t.Fatalf("UDP WHOAMI through docker-proxy = %q, %v; want %q", got, err, c.Name)
	}
	datagram := make([]byte, 1400)
	_, _ = rand.Read(datagram)
	if got, err = UDPEcho(t.Context(), udpAddr, datagram); err != nil || !bytes.Equal(got, datagram) {
		t.Fatalf("UDP echo of %d bytes returned %d bytes, %v", len(datagram), len(got), err)
	}

	if got := bridgeMAC(); got != mac {
		t.Errorf("the bridge's MAC address went from %s to %s with a container", mac, got)
	}
	d.Stop(t, c)
	if got := bridgeMAC(); got != mac {
		t.Errorf("the bridge's MAC address went from %s to %s when the container stopped", mac, got)
	}
	// 0 rather than 137 means the echo server exited on SIGTERM instead of waiting for SIGKILL.
	if code := d.MustDocker(t, "inspect", "-f", "{{.State.ExitCode}}", c.ID); code != "0" {
		t.Errorf("echo server exited with %s on docker stop, want 0", code)
	}
	if left := proxyArgs(d); len(left) != 0 {
		t.Errorf("userland proxies still running after stop: %q", left)
	}
	for _, addr := range []string{tcpAddr, net.JoinHostPort("127.0.0.1", strconv.Itoa(httpPort))} {
		if _, err := TCPEcho(t.Context(), addr, []byte("x")); !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("TCP %s after stop: %v, want connection refused", addr, err)
		}
	}
	ctx, cancel := context.WithTimeout(t.Context(), 500*time.Millisecond)
	defer cancel()
	if got, err := UDPEcho(ctx, udpAddr, []byte("WHOAMI")); err == nil {
		t.Errorf("UDP %s still answers after stop: %q", udpAddr, got)
	}
}

func containsSuffix(list []string, suffix string) bool {
	for _, s := range list {
		if strings.HasSuffix(s, suffix) {
			return true
		}
	}
	return false
}

// TestStartRacesTheApp proves what the soak suite relies on: Start returns while the application
// in the container is still starting, ECHO_LISTEN_DELAY keeps the echo server's ports closed that
// long (docker-proxy, already listening, can only drop the client), and Processes finds the
// daemon's userland proxies and sees them go with the container.
func TestStartRacesTheApp(t *testing.T) {
	t.Parallel()
	d := StartDaemon(t, DaemonOptions{})
	d.EchoImage(t)
	port := FreePort(t)
	const delay = 5 * time.Second
	started := time.Now()
	id, name, err := d.Start(t.Context(), RunOptions{
		Publish: []string{fmt.Sprintf("127.0.0.1:%d:80", port)},
		Env:     map[string]string{"ECHO_LISTEN_DELAY": delay.String()},
	})
	if err != nil {
		t.Fatal(err)
	}
	url := fmt.Sprintf("http://127.0.0.1:%d/", port)
	status, body, err := HTTPGet(t.Context(), url)
	if answered := time.Since(started); answered >= delay {
		t.Fatalf("the first request was answered %v after docker run started, past the %v listen delay: the test proves nothing on a machine this slow", answered, delay)
	}
	if err == nil {
		t.Fatalf("GET %s before the app listens: %d %q, want an error", url, status, body)
	}
	if pids := d.Processes("docker-proxy"); len(pids) != 1 {
		t.Fatalf("docker-proxy processes of the daemon: %v, want 1", pids)
	}
	c := &Container{ID: id, Name: name}
	if err := d.waitEchoServing(t.Context(), c); err != nil {
		t.Fatal(err)
	}
	if serving := time.Since(started); serving < delay {
		t.Fatalf("echo server reported serving %v after docker run started, before its %v listen delay", serving, delay)
	}
	got, err := echoName(t, url)
	if err != nil || got != name {
		t.Fatalf("GET %s once the app serves: %q, %v; want %q", url, got, err, name)
	}
	d.Remove(t, c)
	WaitFor(t, 5*time.Second, "docker-proxy gone with its container", func() error {
		if pids := d.Processes("docker-proxy"); len(pids) != 0 {
			return fmt.Errorf("docker-proxy processes %v", pids)
		}
		return nil
	})
}
