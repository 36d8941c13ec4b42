package testbed

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

const (
	// AdminPortPlaceholder in EnvoyOptions.Bootstrap is replaced by a free loopback port.
	AdminPortPlaceholder = "{{ADMIN_PORT}}"
	// envoyBaseIDOffset keeps test base IDs clear of the 0 that a real appliance on the same
	// machine would use: base IDs name Envoy's shared memory and hot-restart sockets.
	envoyBaseIDOffset   = 47000
	defaultReadyTimeout = 30 * time.Second
	envoyStopGrace      = 5 * time.Second
)

// EnvoyOptions configure one Envoy process.
type EnvoyOptions struct {
	// Bootstrap is the YAML configuration. Its admin port should be AdminPortPlaceholder.
	Bootstrap string
	// Concurrency is the number of worker threads: default 2; negative passes no --concurrency,
	// so Envoy's own default (one per CPU) applies.
	Concurrency int
	ExtraArgs   []string
	Env         []string
	// NoWaitReady returns as soon as the process runs, instead of once /ready answers 200.
	NoWaitReady bool
	// ReadyTimeout bounds the wait for /ready; default 30 s.
	ReadyTimeout time.Duration
}

// Envoy is a running Envoy started by StartEnvoy.
type Envoy struct {
	AdminAddr string // 127.0.0.1:port; empty if the bootstrap had no AdminPortPlaceholder
	BaseID    int
	LogPath   string // Envoy's stdout and stderr

	inst   *instance
	cmd    *exec.Cmd
	exited chan struct{}
}

// StartEnvoy runs the Envoy binary (see EnvoyBinary) with the bootstrap, a base ID of its own and
// its files in an instance directory, waits until it is ready, and stops it at test end
// (SIGTERM, SIGKILL after 5 s). Its log is printed if the test failed.
func StartEnvoy(t testing.TB, opts EnvoyOptions) *Envoy {
	t.Helper()
	if testing.Short() {
		t.Skip("skipping end-to-end test in -short mode")
	}
	bin := EnvoyBinary(t)
	if opts.Concurrency == 0 {
		opts.Concurrency = 2
	}
	if opts.ReadyTimeout == 0 {
		opts.ReadyTimeout = defaultReadyTimeout
	}
	bootstrap := opts.Bootstrap
	var adminAddr string
	if strings.Contains(bootstrap, AdminPortPlaceholder) {
		port := FreePort(t)
		adminAddr = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		bootstrap = strings.ReplaceAll(bootstrap, AdminPortPlaceholder, strconv.Itoa(port))
	} else if !opts.NoWaitReady {
		t.Fatalf("StartEnvoy: the bootstrap has no %s admin port, so readiness cannot be checked (set NoWaitReady)", AdminPortPlaceholder)
	}
	inst, err := newInstance(t, kindEnvoy, func(slot int, st *instanceState) error {
		baseID := envoyBaseIDOffset + slot
		if _, err := os.Stat(envoyShmPath(baseID)); err == nil {
			// Another Envoy on this machine, not one of ours, uses this base ID.
			return fmt.Errorf("base ID %d in use (%s exists)", baseID, envoyShmPath(baseID))
		}
		st.BaseID = baseID
		return nil
	})
	if err != nil {
		t.Fatalf("StartEnvoy: %v", err)
	}
	e := &Envoy{
		AdminAddr: adminAddr,
		BaseID:    inst.state.BaseID,
		LogPath:   filepath.Join(inst.dir, "envoy.log"),
		inst:      inst,
		exited:    make(chan struct{}),
	}
	t.Cleanup(func() { e.teardown(t) })
	t.Logf("testbed: envoy instance %s, base ID %d, admin %s", inst.dir, e.BaseID, e.AdminAddr)
	if err := e.start(bin, bootstrap, opts); err != nil {
		t.Fatalf("StartEnvoy: %v", err)
	}
	if !opts.NoWaitReady {
		if err := e.waitReady(opts.ReadyTimeout); err != nil {
			t.Fatalf("StartEnvoy: %v; its log:\n%s", err, tailFile(e.LogPath, 60))
		}
	}
	return e
}

func (e *Envoy) start(bin, bootstrap string, opts EnvoyOptions) error {
	dir := e.inst.dir
	config := filepath.Join(dir, "bootstrap.yaml")
	if err := os.WriteFile(config, []byte(bootstrap), 0o644); err != nil {
		return err
	}
	logf, err := os.OpenFile(e.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	args := []string{"-c", config, "--base-id", strconv.Itoa(e.BaseID)}
	if opts.Concurrency > 0 {
		args = append(args, "--concurrency", strconv.Itoa(opts.Concurrency))
	}
	cmd := exec.Command(bin, append(args, opts.ExtraArgs...)...)
	cmd.Dir = dir
	cmd.Env = toolEnv(append([]string{markerEnv + "=" + dir}, opts.Env...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting %s: %w", bin, err)
	}
	e.cmd = cmd
	go func() {
		_ = cmd.Wait()
		close(e.exited)
	}()
	return e.inst.recordPid(cmd.Process.Pid)
}

func (e *Envoy) waitReady(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		status, _, err := e.adminGet(context.Background(), "/ready")
		switch {
		case err != nil:
			last = err
		case status == http.StatusOK:
			return nil
		default:
			last = fmt.Errorf("/ready answered %d", status)
		}
		select {
		case <-e.exited:
			return fmt.Errorf("envoy exited before it was ready (%s)", e.cmd.ProcessState)
		case <-time.After(50 * time.Millisecond):
		}
	}
	return fmt.Errorf("envoy not ready within %s: %v", timeout, last)
}

func (e *Envoy) adminDo(ctx context.Context, method, path string) (int, []byte, error) {
	if e.AdminAddr == "" {
		return 0, nil, fmt.Errorf("envoy admin address unknown: the bootstrap had no %s", AdminPortPlaceholder)
	}
	ctx, cancel := withDefaultTimeout(ctx)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, "http://"+e.AdminAddr+path, nil)
	if err != nil {
		return 0, nil, err
	}
	resp, err := HTTPClient().Do(req)
	if err != nil {
		return 0, nil, fmt.Errorf("envoy admin %s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return resp.StatusCode, body, fmt.Errorf("envoy admin %s %s: reading body: %w", method, path, err)
	}
	return resp.StatusCode, body, nil
}

func (e *Envoy) adminGet(ctx context.Context, path string) (int, []byte, error) {
	return e.adminDo(ctx, http.MethodGet, path)
}

// Admin GETs path ("/config_dump", "/listeners?format=json") from the admin interface and
// fails the test unless the answer is 200.
func (e *Envoy) Admin(t testing.TB, path string) []byte {
	t.Helper()
	status, body, err := e.adminGet(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	if status != http.StatusOK {
		t.Fatalf("envoy admin GET %s: status %d: %s", path, status, body)
	}
	return body
}

// AdminPost POSTs to an admin endpoint ("/healthcheck/fail", "/drain_listeners") and fails the
// test unless the answer is 200.
func (e *Envoy) AdminPost(t testing.TB, path string) []byte {
	t.Helper()
	status, body, err := e.adminDo(context.Background(), http.MethodPost, path)
	if err != nil {
		t.Fatal(err)
	}
	if status != http.StatusOK {
		t.Fatalf("envoy admin POST %s: status %d: %s", path, status, body)
	}
	return body
}

// Stat returns the value of one counter or gauge by its exact name, and whether Envoy has it.
func (e *Envoy) Stat(t testing.TB, name string) (int64, bool) {
	t.Helper()
	q := url.Values{"format": {"json"}, "filter": {"^" + regexp.QuoteMeta(name) + "$"}}
	v, ok, err := statValue(e.Admin(t, "/stats?"+q.Encode()), name)
	if err != nil {
		t.Fatal(err)
	}
	return v, ok
}

// statValue finds a counter or gauge in /stats?format=json output, whose "stats" array mixes
// {"name","value"} objects with one {"histograms":...} object.
func statValue(statsJSON []byte, name string) (int64, bool, error) {
	var doc struct {
		Stats []struct {
			Name  string `json:"name"`
			Value *int64 `json:"value"`
		} `json:"stats"`
	}
	if err := json.Unmarshal(statsJSON, &doc); err != nil {
		return 0, false, fmt.Errorf("decoding envoy stats: %w", err)
	}
	for _, s := range doc.Stats {
		if s.Name == name && s.Value != nil {
			return *s.Value, true, nil
		}
	}
	return 0, false, nil
}

// Pid is the Envoy process's ID.
func (e *Envoy) Pid() int {
	if e.cmd == nil {
		return 0
	}
	return e.cmd.Process.Pid
}

// Stop sends SIGTERM and waits for the exit, with SIGKILL after 5 s. Stopping a stopped Envoy is
// a no-op.
func (e *Envoy) Stop(t testing.TB) {
	t.Helper()
	if e.cmd == nil {
		return
	}
	_ = e.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-e.exited:
	case <-time.After(envoyStopGrace):
		t.Logf("testbed: envoy (pid %d) ignored SIGTERM for %s; killing it", e.Pid(), envoyStopGrace)
		_ = e.cmd.Process.Kill()
		<-e.exited
	}
}

// Kill SIGKILLs Envoy and waits until it is gone, as a crash would.
func (e *Envoy) Kill(t testing.TB) {
	t.Helper()
	if e.cmd == nil {
		return
	}
	_ = e.cmd.Process.Kill()
	<-e.exited
}

func (e *Envoy) teardown(t testing.TB) {
	e.Stop(t)
	if t.Failed() {
		t.Logf("testbed: envoy log %s, last lines:\n%s", e.LogPath, tailFile(e.LogPath, 40))
	}
	if err := e.inst.release(t.Logf); err != nil {
		t.Errorf("testbed: removing envoy instance %s: %v", e.inst.dir, err)
	}
}

// TCPProxyBootstrap is a static Envoy bootstrap with one listener, named name (also its stat
// prefix), proxying TCP from listen to upstream through a cluster also named name. The listener
// uses SO_REUSEPORT, one socket per worker, as envoy-docker-server configures every port.
func TCPProxyBootstrap(name string, listen, upstream netip.AddrPort) string {
	return fmt.Sprintf(`admin:
  address: {socket_address: {address: 127.0.0.1, port_value: %s}}
static_resources:
  listeners:
  - name: %[2]s
    stat_prefix: %[2]s
    enable_reuse_port: true
    address: {socket_address: {address: "%[3]s", port_value: %[4]d}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: %[2]s
          cluster: %[2]s
  clusters:
  - name: %[2]s
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: %[2]s
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: "%[5]s", port_value: %[6]d}}}}]}]
`, AdminPortPlaceholder, name, listen.Addr(), listen.Port(), upstream.Addr(), upstream.Port())
}
