// Package appliance runs the compose appliance (compose.yaml and the images of images/) against a
// private testbed daemon, for end-to-end tests: the images are built from the repository with
// stand-in base images (see GoStandin), `docker compose up -d` brings up installer, server, Envoy
// and resync, and the daemon runs the shim the installer put in place.
//
// The fake host lives in a temporary directory: the installer's target directory, the
// registration socket's directory and /etc/docker are directories there, passed to compose through
// its environment variables; the daemon's --userland-proxy-path is the shim's path there and its
// environment names the socket, as a real host's dockerd would be configured. Ports (xDS, the
// server's HTTP, Envoy's admin) are free loopback ports and Envoy's base ID is the daemon's own,
// so that appliances of parallel tests, and a real one on the machine, never meet.
//
// It never touches the machine's own /usr/local/bin, /etc/docker or /run, and sends traffic only
// to loopback.
package appliance

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/services/netfilter"
	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
)

const (
	// ShimPackage is the shim's main package; until it exists the installer image cannot be built.
	ShimPackage = "shim/cmd/envoy-docker-shim"
	// envoyBaseIDOffset keeps the appliance's Envoy clear of testbed's own Envoys (47000+slot) and
	// of a real appliance (0): base IDs name Envoy's hot-restart sockets, which live in the host's
	// network namespace that the Envoy container shares.
	envoyBaseIDOffset = 49000
	buildTimeout      = 10 * time.Minute
	composeTimeout    = 3 * time.Minute
)

// Options shape one appliance.
type Options struct {
	// Generation is the daemon the appliance runs on (default testbed.Docker20).
	Generation testbed.Generation
	// DaemonJSON is the fake host's /etc/docker/daemon.json before the installer runs; empty means
	// the file does not exist.
	DaemonJSON string
	// ConfigureDockerd is the installer's EDS_CONFIGURE_DOCKERD.
	ConfigureDockerd bool
	// Images is an archive of the appliance's images written by SaveImages, loaded instead of
	// building them: the images are the same whatever daemon runs them, and a build costs minutes
	// (several on Docker 29, whose containerd image store makes each of the classic builder's
	// layer commits slow). Empty: build them on this daemon.
	Images string
	// Shipped keeps compose.yaml's defaults for what tests otherwise speed up or make verbose
	// (Envoy's worker count, the healthcheck interval, the server's log level), as a benchmark
	// of the appliance as users run it needs.
	Shipped bool
}

// Appliance is compose.yaml running against a private daemon.
type Appliance struct {
	Repo   string
	Daemon *testbed.Daemon
	// The fake host's directories, as given to compose.
	InstallDir, RunDir, DockerConfigDir string
	// SysctlDir stands in for the host's /proc/sys/net (EDS_SYSCTL_NET_DIR): the server turns IP
	// forwarding and tcp_migrate_req on there, not in the machine's kernel, which other tests share.
	SysctlDir string
	// ShimPath is where the installer puts the shim: the daemon's userland proxy.
	ShimPath string
	// Socket is the registration socket as the host's shims reach it.
	Socket string
	// NetfilterTable is the server's nftables table (EDS_NETFILTER_TABLE), one per appliance so
	// that appliances of parallel tests, and a real one, never meet. It lives in the host's
	// ruleset: teardown removes it, since compose down keeps it by design.
	NetfilterTable netfilter.Table
	// Loopback addresses of the server's xDS and HTTP endpoints and Envoy's admin interface.
	XDSAddr, HTTPAddr, AdminAddr, UIAddr string
	Project                              string
	// HasShim is false while the shim's package does not exist yet: then the installer is neither
	// built nor run, and the daemon's userland proxy stays a placeholder that fails every port.
	HasShim bool

	compose  []string
	env      []string
	services []string // what build and up name; nil means all
}

// Start builds the images, brings the appliance up, and waits until the installer and resync have
// exited 0 and server and Envoy are healthy. Teardown (compose down, then the daemon's own) is
// registered with t.Cleanup.
func Start(t testing.TB, opts Options) *Appliance {
	t.Helper()
	testbed.RequireDocker(t)
	envoyBin := testbed.EnvoyBinary(t)
	repo := RepoRoot(t)
	composeCmd, err := composeCommand()
	if err != nil {
		if ci, _ := strconv.ParseBool(os.Getenv("CI")); ci {
			t.Fatalf("prerequisite missing under CI=true: %v", err)
		}
		t.Skipf("skipping: %v; run `make provision` (Debian package docker-compose)", err)
	}

	dir := t.TempDir()
	a := &Appliance{
		Repo:            repo,
		InstallDir:      filepath.Join(dir, "bin"),
		RunDir:          filepath.Join(dir, "run"),
		DockerConfigDir: filepath.Join(dir, "etc-docker"),
		SysctlDir:       testbed.SysctlStandIn(t),
		XDSAddr:         loopback(testbed.FreePort(t)),
		HTTPAddr:        loopback(testbed.FreePort(t)),
		AdminAddr:       loopback(testbed.FreePort(t)),
		UIAddr:          loopback(testbed.FreePort(t)),
		Project:         "edse2e" + randomHex(4),
		compose:         composeCmd,
	}
	a.NetfilterTable = netfilter.Table{Name: "eds_" + a.Project}
	if _, err := os.Stat(filepath.Join(repo, ShimPackage)); err == nil {
		a.HasShim = true
	} else {
		// Until the shim is written there is no installer image: the rest still builds and runs.
		a.services = []string{"server", "envoy", "resync"}
		t.Logf("appliance: %s is not in this tree yet: building and starting only %q", ShimPackage, a.services)
	}
	a.ShimPath = filepath.Join(a.InstallDir, "envoy-docker-shim")
	a.Socket = filepath.Join(a.RunDir, "server.sock")
	for _, d := range []string{a.InstallDir, a.RunDir, a.DockerConfigDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if opts.DaemonJSON != "" {
		if err := os.WriteFile(filepath.Join(a.DockerConfigDir, "daemon.json"), []byte(opts.DaemonJSON), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// dockerd wants its userland proxy to exist when it starts; the installer replaces this
	// placeholder, which fails every port with a clear message until then.
	placeholder := "#!/bin/sh\nprintf '1\\nenvoy-docker-shim is not installed yet (placeholder)' >&3\nexit 1\n"
	if err := os.WriteFile(a.ShimPath, []byte(placeholder), 0o755); err != nil {
		t.Fatal(err)
	}

	a.Daemon = testbed.StartDaemon(t, testbed.DaemonOptions{
		Generation:        opts.Generation,
		UserlandProxyPath: a.ShimPath,
		Env:               []string{"EDS_SHIM_SOCKET=" + filepath.Join(a.RunDir, "shim.sock")},
	})
	t.Cleanup(func() { a.teardown(t) })

	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), buildTimeout)
	defer cancel()
	if opts.Images != "" {
		// No base images either: with nothing to build, compose never asks for them.
		a.env = a.composeEnv(opts, "", "")
		if _, err := a.Daemon.Docker(ctx, "load", "-q", "-i", opts.Images); err != nil {
			t.Fatalf("loading the images: %v", err)
		}
		t.Logf("appliance: images loaded from %s in %s", opts.Images, time.Since(start).Round(100*time.Millisecond))
	} else {
		goImage, envoyImage := ImportStandins(t, a.Daemon, GoStandin(t, repo), EnvoyStandin(t, envoyBin))
		a.env = a.composeEnv(opts, goImage, envoyImage)
		start = time.Now()
		out, err := a.ComposeErr(ctx, append([]string{"build"}, a.services...)...)
		if err != nil {
			t.Fatalf("building the images: %v", err)
		}
		t.Logf("appliance: images built in %s", time.Since(start).Round(100*time.Millisecond))
		if testing.Verbose() {
			t.Logf("appliance: build output:\n%s", tail(out, 12))
		}
	}
	a.Up(t)
	return a
}

// TestDrainTime is the appliance's ENVOY_DRAIN_TIME unless Options.Shipped.
const TestDrainTime = 2 * time.Second

// imageVersion is the tag (EDS_VERSION) of the images the appliance builds and runs.
const imageVersion = "e2e"

// SaveImages writes the appliance's images into an archive at path, for Options.Images.
func (a *Appliance) SaveImages(t testing.TB, path string) {
	t.Helper()
	services := a.services
	if services == nil {
		services = []string{"server", "envoy", "installer", "resync"}
	}
	args := []string{"save", "-o", path}
	for _, svc := range services {
		args = append(args, "envoy-docker-shim/"+svc+":"+imageVersion)
	}
	start := time.Now()
	a.Daemon.MustDocker(t, args...)
	t.Logf("appliance: images saved in %s", time.Since(start).Round(100*time.Millisecond))
}

// composeEnv is the environment compose runs in: the test's, without anything that would point
// compose or the components elsewhere, plus the appliance's settings.
func (a *Appliance) composeEnv(opts Options, goImage, envoyImage string) []string {
	env := slices.DeleteFunc(os.Environ(), func(kv string) bool {
		k, _, _ := strings.Cut(kv, "=")
		return strings.HasPrefix(k, "DOCKER_") || strings.HasPrefix(k, "COMPOSE_") || strings.HasPrefix(k, "EDS_") ||
			strings.HasPrefix(k, "ENVOY_") || k == "GOPROXY" || k == "GOFLAGS"
	})
	slot := 0
	if m := regexp.MustCompile(`^d(\d+)-`).FindStringSubmatch(filepath.Base(a.Daemon.Root)); m != nil {
		slot, _ = strconv.Atoi(m[1])
	}
	env = append(env,
		"DOCKER_HOST="+a.Daemon.Host,
		"DOCKER_CONFIG="+filepath.Join(filepath.Dir(a.RunDir), "docker-cli"),
		"DOCKER_BUILDKIT=0", // no buildx here: the classic builder
		"DOCKER_CLI_HINTS=false",
		"COMPOSE_PROJECT_NAME="+a.Project,
		"EDS_VERSION="+imageVersion,
		"EDS_GO_IMAGE="+goImage,
		"EDS_ENVOY_IMAGE="+envoyImage,
		"EDS_RUNTIME_IMAGE=scratch",
		"GOPROXY="+GoProxyInStandin,
		"GOFLAGS=-mod=readonly",
		"EDS_RUN_DIR="+a.RunDir,
		"EDS_DOCKER_SOCKET="+a.Daemon.Socket,
		"EDS_INSTALL_DIR="+a.InstallDir,
		"EDS_DOCKER_CONFIG_DIR="+a.DockerConfigDir,
		"EDS_SYSCTL_NET_DIR="+a.SysctlDir,
		"EDS_CONFIGURE_DOCKERD="+strconv.FormatBool(opts.ConfigureDockerd),
		"EDS_XDS_ADDR="+a.XDSAddr,
		"EDS_HTTP_ADDR="+a.HTTPAddr,
		"EDS_NETFILTER_TABLE="+a.NetfilterTable.Name,
		"ENVOY_PORT="+portOf(a.AdminAddr),
		"ENVOY_UI_LISTEN_PORT="+portOf(a.UIAddr),
		"ENVOY_BASE_ID="+strconv.Itoa(envoyBaseIDOffset+slot),
	)
	if !opts.Shipped {
		// A short drain keeps Envoy's restarts (each waits for its long-lived connections) quick.
		env = append(env, "EDS_HEALTHCHECK_INTERVAL=1s", "EDS_LOG_LEVEL=debug", "ENVOY_CONCURRENCY=2",
			"ENVOY_DRAIN_TIME="+TestDrainTime.String(), "ENVOY_STOP_GRACE_PERIOD=10s")
	}
	return env
}

// Up runs `compose up -d` and waits until the appliance is ready (see WaitReady).
func (a *Appliance) Up(t testing.TB) {
	t.Helper()
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), composeTimeout)
	defer cancel()
	if _, err := a.ComposeErr(ctx, append([]string{"up", "-d"}, a.services...)...); err != nil {
		t.Fatal(err)
	}
	a.WaitReady(t)
	t.Logf("appliance: up and ready in %s", time.Since(start).Round(100*time.Millisecond))
}

// Down runs `compose down`.
func (a *Appliance) Down(t testing.TB) {
	t.Helper()
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), composeTimeout)
	defer cancel()
	if _, err := a.ComposeErr(ctx, "down", "-t", "5"); err != nil {
		t.Fatal(err)
	}
	t.Logf("appliance: down in %s", time.Since(start).Round(100*time.Millisecond))
}

// WaitReady waits until installer (if there is a shim to install) and resync have exited 0 and
// server and Envoy are healthy.
func (a *Appliance) WaitReady(t testing.TB) {
	t.Helper()
	oneShots := []string{"installer", "resync"}
	if !a.HasShim {
		oneShots = oneShots[1:]
	}
	for _, svc := range oneShots {
		if code, logs := a.WaitExited(t, svc, time.Minute); code != 0 {
			t.Fatalf("%s exited %d:\n%s", svc, code, logs)
		}
	}
	a.WaitHealthy(t, time.Minute, "server", "envoy")
}

// ComposeErr runs compose with args in the appliance's environment and returns its output
// (stdout then stderr; compose reports progress on stderr).
func (a *Appliance) ComposeErr(ctx context.Context, args ...string) (string, error) {
	return a.ComposeEnvErr(ctx, nil, args...)
}

// ComposeEnvErr is ComposeErr with more environment variables (KEY=value) for compose to
// interpolate, as an operator would set them: EDS_UNINSTALL=true, for example.
func (a *Appliance) ComposeEnvErr(ctx context.Context, env []string, args ...string) (string, error) {
	full := append(slices.Clone(a.compose[1:]), "-f", filepath.Join(a.Repo, "compose.yaml"), "--project-directory", a.Repo)
	full = append(full, args...)
	cmd := exec.CommandContext(ctx, a.compose[0], full...)
	cmd.Dir, cmd.Env = a.Repo, append(slices.Clone(a.env), env...)
	cmd.WaitDelay = 5 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	out := stdout.String() + stderr.String()
	if err != nil {
		return out, fmt.Errorf("%s %s: %w:\n%s", strings.Join(a.compose, " "), strings.Join(args, " "), err, tail(out, 60))
	}
	return out, nil
}

// Compose is ComposeErr failing the test on error.
func (a *Appliance) Compose(t testing.TB, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), composeTimeout)
	defer cancel()
	out, err := a.ComposeErr(ctx, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Containers lists the IDs of the project's containers (excluding `compose run` ones) for a
// service, or for all services if service is empty, newest first.
func (a *Appliance) Containers(t testing.TB, service string) []string {
	t.Helper()
	args := []string{"ps", "-a", "-q", "--no-trunc", "--filter", "label=com.docker.compose.project=" + a.Project,
		"--filter", "label=com.docker.compose.oneoff=False"}
	if service != "" {
		args = append(args, "--filter", "label=com.docker.compose.service="+service)
	}
	return strings.Fields(a.Daemon.MustDocker(t, args...))
}

// Container is the ID of the service's container; it fails the test unless there is exactly one.
func (a *Appliance) Container(t testing.TB, service string) string {
	t.Helper()
	ids := a.Containers(t, service)
	if len(ids) != 1 {
		t.Fatalf("service %s has %d containers (%q), want 1", service, len(ids), ids)
	}
	return ids[0]
}

// WaitHealthy waits until each service's container reports healthy.
func (a *Appliance) WaitHealthy(t testing.TB, timeout time.Duration, services ...string) {
	t.Helper()
	for _, svc := range services {
		testbed.WaitFor(t, timeout, svc+" healthy", func() error {
			ids := a.Containers(t, svc)
			if len(ids) != 1 {
				return fmt.Errorf("%d containers", len(ids))
			}
			st := a.Daemon.MustDocker(t, "inspect", "-f", "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}", ids[0])
			if st != "running healthy" {
				return fmt.Errorf("state %q; last health output: %s", st, a.Daemon.MustDocker(t, "inspect", "-f",
					"{{if .State.Health}}{{range .State.Health.Log}}{{.Output}}{{end}}{{end}}", ids[0]))
			}
			return nil
		})
	}
}

// WaitExited waits until the service's (one-shot) container has exited and returns its exit
// code and its log.
func (a *Appliance) WaitExited(t testing.TB, service string, timeout time.Duration) (int, string) {
	t.Helper()
	var id string
	testbed.WaitFor(t, timeout, service+" exited", func() error {
		ids := a.Containers(t, service)
		if len(ids) != 1 {
			return fmt.Errorf("%d containers", len(ids))
		}
		id = ids[0]
		if st := a.Daemon.MustDocker(t, "inspect", "-f", "{{.State.Status}}", id); st != "exited" {
			return fmt.Errorf("state %s", st)
		}
		return nil
	})
	code, err := strconv.Atoi(a.Daemon.MustDocker(t, "inspect", "-f", "{{.State.ExitCode}}", id))
	if err != nil {
		t.Fatal(err)
	}
	return code, a.Logs(t, id)
}

// Logs returns a container's stdout and stderr.
func (a *Appliance) Logs(t testing.TB, id string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := a.Daemon.Logs(ctx, id)
	if err != nil {
		return fmt.Sprintf("(%v) %s", err, out)
	}
	return out
}

// EnvoyStat returns one of Envoy's counters or gauges by its exact name, and whether Envoy has it.
func (a *Appliance) EnvoyStat(t testing.TB, name string) (int64, bool) {
	t.Helper()
	v, ok, err := a.envoyStatErr(name)
	if err != nil {
		t.Fatal(err)
	}
	return v, ok
}

// envoyStatErr is EnvoyStat for an Envoy that may be restarting.
func (a *Appliance) envoyStatErr(name string) (int64, bool, error) {
	q := url.Values{"format": {"json"}, "filter": {"^" + regexp.QuoteMeta(name) + "$"}}
	u := "http://" + a.AdminAddr + "/stats?" + q.Encode()
	status, body, err := testbed.HTTPGet(context.Background(), u)
	if err != nil {
		return 0, false, err
	}
	if status != http.StatusOK {
		return 0, false, fmt.Errorf("GET %s: %d %s", u, status, body)
	}
	var doc struct {
		Stats []struct {
			Name  string `json:"name"`
			Value *int64 `json:"value"`
		} `json:"stats"`
	}
	if err := json.Unmarshal([]byte(body), &doc); err != nil {
		return 0, false, fmt.Errorf("envoy stats: %w: %s", err, body)
	}
	for _, s := range doc.Stats {
		if s.Name == name && s.Value != nil {
			return *s.Value, true, nil
		}
	}
	return 0, false, nil
}

// Listeners returns the names of Envoy's active listeners, sorted.
func (a *Appliance) Listeners(t testing.TB) []string {
	t.Helper()
	var doc struct {
		ListenerStatuses []struct {
			Name string `json:"name"`
		} `json:"listener_statuses"`
	}
	body := a.get(t, "http://"+a.AdminAddr+"/listeners?format=json")
	if err := json.Unmarshal([]byte(body), &doc); err != nil {
		t.Fatalf("envoy listeners: %v: %s", err, body)
	}
	var names []string
	for _, l := range doc.ListenerStatuses {
		names = append(names, l.Name)
	}
	slices.Sort(names)
	return names
}

// Registration is the part of the server's /registrations entry that must survive restarts.
type Registration struct {
	Mapping struct {
		Proto         string `json:"proto"`
		HostIP        string `json:"hostIp"`
		HostPort      int    `json:"hostPort"`
		ContainerIP   string `json:"containerIp"`
		ContainerPort int    `json:"containerPort"`
	} `json:"mapping"`
	ContainerID string `json:"containerId"`
	Service     string `json:"service"`
	Mode        string `json:"mode"`
	Listener    string `json:"listener"`
	Cluster     string `json:"cluster"`
}

// Registrations returns the server's live registrations.
func (a *Appliance) Registrations(t testing.TB) []Registration {
	t.Helper()
	regs, err := a.registrationsErr()
	if err != nil {
		t.Fatal(err)
	}
	return regs
}

// registrationsErr is Registrations for a server that may be restarting.
func (a *Appliance) registrationsErr() ([]Registration, error) {
	status, body, err := testbed.HTTPGet(context.Background(), "http://"+a.HTTPAddr+"/registrations")
	if err != nil {
		return nil, err
	}
	if status != http.StatusOK {
		return nil, fmt.Errorf("GET /registrations: %d %s", status, body)
	}
	var doc struct {
		Registrations []Registration `json:"registrations"`
	}
	if err := json.Unmarshal([]byte(body), &doc); err != nil {
		return nil, fmt.Errorf("server registrations: %w: %s", err, body)
	}
	return doc.Registrations, nil
}

func (a *Appliance) get(t testing.TB, u string) string {
	t.Helper()
	status, body, err := testbed.HTTPGet(context.Background(), u)
	if err != nil {
		t.Fatal(err)
	}
	if status != http.StatusOK {
		t.Fatalf("GET %s: %d %s", u, status, body)
	}
	return body
}

func (a *Appliance) teardown(t testing.TB) {
	if a.env == nil {
		return // compose never ran
	}
	if t.Failed() {
		for _, id := range a.Containers(t, "") {
			name := a.Daemon.MustDocker(t, "inspect", "-f", "{{.Name}}", id)
			t.Logf("appliance: log of %s:\n%s", name, tail(a.Logs(t, id), 40))
		}
	}
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), composeTimeout)
	defer cancel()
	if _, err := a.ComposeErr(ctx, "down", "-t", "2", "--remove-orphans"); err != nil {
		t.Errorf("appliance teardown: %v", err)
	}
	if _, err := a.NetfilterTable.Remove(); err != nil {
		t.Errorf("appliance teardown: %v", err)
	}
	t.Logf("appliance: torn down in %s", time.Since(start).Round(100*time.Millisecond))
}

// composeCommand is `docker compose` when the v2 plugin is there, else Debian's docker-compose.
func composeCommand() ([]string, error) {
	if docker, err := exec.LookPath("docker"); err == nil {
		if exec.Command(docker, "compose", "version").Run() == nil {
			return []string{docker, "compose"}, nil
		}
	}
	if p, err := exec.LookPath("docker-compose"); err == nil {
		return []string{p}, nil
	}
	return nil, fmt.Errorf("neither `docker compose` nor docker-compose is installed")
}

// RepoRoot finds the repository (the directory of this module's go.mod) above the working
// directory, which for a test is its package directory.
func RepoRoot(t testing.TB) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if b, err := os.ReadFile(filepath.Join(dir, "go.mod")); err == nil && bytes.Contains(b, []byte("module github.com/envoy-docker-shim/envoy-docker-shim\n")) {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("no envoy-docker-shim go.mod above the working directory")
		}
		dir = parent
	}
}

func loopback(port int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(port)) }

func portOf(addr string) string {
	_, p, _ := net.SplitHostPort(addr)
	return p
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = append([]string{fmt.Sprintf("... (%d earlier lines)", len(lines)-n)}, lines[len(lines)-n:]...)
	}
	return strings.Join(lines, "\n")
}
