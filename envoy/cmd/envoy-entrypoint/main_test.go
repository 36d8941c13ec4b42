package main_test

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
)

// TestSignalsStopEnvoyCleanly: docker stop (SIGTERM) and SIGINT of the Envoy container's entrypoint,
// with a real Envoy under it, exit 0 and log the stop.
func TestSignalsStopEnvoyCleanly(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary with a real Envoy")
	}
	envoy := testbed.EnvoyBinary(t)
	bin := testbed.BuildStatic(t, "github.com/envoy-docker-shim/envoy-docker-shim/envoy/cmd/envoy-entrypoint", "envoy-entrypoint")
	var admin int
	testbed.StopsCleanly(t, func(t *testing.T) *exec.Cmd {
		admin = testbed.FreePort(t)
		// --disable-hot-restart: no shared memory, so no base ID can collide with the testbed's Envoys.
		cmd := exec.Command(bin, "--disable-hot-restart")
		cmd.Env = append(os.Environ(),
			"ENVOY_BINARY="+envoy,
			"ENVOY_CONFIG_PATH="+filepath.Join(t.TempDir(), "envoy.yaml"),
			"ENVOY_PORT="+strconv.Itoa(admin),
			"ENVOY_UI_LISTEN_PORT=0",
			"ENVOY_CONCURRENCY=1",
			"EDS_XDS_ADDR=127.0.0.1:"+strconv.Itoa(testbed.FreePort(t)), // nobody: Envoy keeps retrying
		)
		return cmd
	}, func(string) bool {
		// Envoy is up once its admin interface answers.
		_, _, err := testbed.HTTPGet(t.Context(), fmt.Sprintf("http://127.0.0.1:%d/server_info", admin))
		return err == nil
	}, 5*time.Second)
}

// TestStopDrains: a stop first closes Envoy's listening sockets (new connections are refused here,
// where no shim shares the port), answers the next request of an open HTTP connection with
// "Connection: close", and keeps an idle connection open until ENVOY_DRAIN_TIME is up; only then
// does Envoy exit, and the entrypoint exits 0.
func TestStopDrains(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary with a real Envoy")
	}
	envoy := testbed.EnvoyBinary(t)
	bin := testbed.BuildStatic(t, "github.com/envoy-docker-shim/envoy-docker-shim/envoy/cmd/envoy-entrypoint", "envoy-entrypoint")
	const drain = 3 * time.Second
	ui, admin := testbed.FreePort(t), testbed.FreePort(t)
	uiAddr := fmt.Sprintf("127.0.0.1:%d", ui)
	cmd := exec.Command(bin, "--disable-hot-restart")
	cmd.Env = append(os.Environ(),
		"ENVOY_BINARY="+envoy,
		"ENVOY_CONFIG_PATH="+filepath.Join(t.TempDir(), "envoy.yaml"),
		"ENVOY_PORT="+strconv.Itoa(admin),
		"ENVOY_UI_LISTEN_PORT="+strconv.Itoa(ui),
		"ENVOY_CONCURRENCY=1",
		"ENVOY_DRAIN_TIME="+drain.String(),
		"EDS_XDS_ADDR=127.0.0.1:"+strconv.Itoa(testbed.FreePort(t)), // nobody: Envoy keeps retrying
	)
	var stderr strings.Builder
	var mu sync.Mutex
	cmd.Stderr = writerFunc(func(p []byte) (int, error) { mu.Lock(); defer mu.Unlock(); return stderr.Write(p) })
	exited := testbed.Start(t, cmd)
	logs := func() string { mu.Lock(); defer mu.Unlock(); return stderr.String() }

	// With no xDS server Envoy starts its listeners once the first fetch times out (15 s).
	testbed.WaitFor(t, 40*time.Second, "the UI listener", func() error {
		status, _, err := testbed.HTTPGet(t.Context(), "http://"+uiAddr+"/")
		if err == nil && status != 200 {
			err = fmt.Errorf("status %d", status)
		}
		return err
	})
	keepAlive := dialUI(t, uiAddr)
	if resp := getOn(t, keepAlive); resp.Close {
		t.Fatal("Envoy closes keep-alive connections before any stop")
	}
	idle := dialUI(t, uiAddr)
	// Until Envoy accepts it, a connection is the kernel's, which resets it when the listening
	// socket closes: wait for Envoy to hold both (a loaded machine delays the accept).
	stat := fmt.Sprintf("listener.%s.downstream_cx_active", strings.ReplaceAll(uiAddr, ":", "_"))
	testbed.WaitFor(t, 5*time.Second, "Envoy holds both connections", func() error {
		_, body, err := testbed.HTTPGet(t.Context(), fmt.Sprintf("http://127.0.0.1:%d/stats?filter=^%s$", admin, stat))
		if err == nil && strings.TrimSpace(body) != stat+": 2" {
			err = fmt.Errorf("%q", body)
		}
		return err
	})

	stopped := time.Now()
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	testbed.WaitFor(t, 2*time.Second, "Envoy's listening socket closed", func() error {
		c, err := net.DialTimeout("tcp", uiAddr, time.Second)
		if err == nil {
			c.Close()
			return errors.New("still accepting")
		}
		if !errors.Is(err, syscall.ECONNREFUSED) {
			return err
		}
		return nil
	})
	if resp := getOn(t, keepAlive); !resp.Close {
		t.Error("a request on an open connection during the drain was not answered with Connection: close")
	}
	select {
	case err := <-exited:
		exited <- err
		t.Fatalf("exited %v after the stop, before the drain time (%v) with a connection open: %v\n%s", time.Since(stopped), drain, err, logs())
	case <-time.After(drain - 500*time.Millisecond):
	}
	if _, err := idle.Write([]byte("GET / HTTP/1.1\r\nHost: ui\r\n\r\n")); err != nil {
		t.Errorf("the idle connection was cut during the drain: %v", err)
	}
	select {
	case err := <-exited:
		exited <- err
		if err != nil {
			t.Fatalf("exit: %v\n%s", err, logs())
		}
		t.Logf("exited %v after SIGTERM (drain time %v)", time.Since(stopped).Round(time.Millisecond), drain)
	case <-time.After(drain + 3*time.Second):
		t.Fatalf("still running %v after SIGTERM\n%s", time.Since(stopped), logs())
	}
	for _, want := range []string{"stopping: draining first", "drain: Envoy's listeners are closed", "stopped: envoy exited 0"} {
		if !strings.Contains(logs(), want) {
			t.Errorf("the log lacks %q:\n%s", want, logs())
		}
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

func dialUI(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := testbed.Dial(t.Context(), "tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// getOn sends GET / on c and reads the response, which must be a 200.
func getOn(t *testing.T, c net.Conn) *http.Response {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("GET / HTTP/1.1\r\nHost: ui\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("GET /: %s", resp.Status)
	}
	return resp
}
