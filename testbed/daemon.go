package testbed

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

const (
	bridgePrefix  = "edsb"
	daemonExecDir = "exec"
	// daemonStartTimeout bounds dockerd's start; it takes about a second, plus a first-run
	// overlay2 check.
	daemonStartTimeout = 30 * time.Second
	// daemonStopTimeout is how long dockerd gets to stop after SIGTERM before SIGKILL.
	daemonStopTimeout = 20 * time.Second
	// dockerCommandTimeout bounds MustDocker and the harness's own docker calls.
	dockerCommandTimeout = 2 * time.Minute
)

// DaemonOptions configure a private dockerd.
type DaemonOptions struct {
	// Generation is the dockerd to run: Docker20 (the default) or Docker29.
	Generation Generation
	// UserlandProxyPath is the proxy dockerd runs for published ports; default is the stock
	// docker-proxy of the daemon's generation.
	UserlandProxyPath string
	// Env is added to dockerd's environment, which the proxies it runs inherit.
	Env []string
	// ExtraArgs are appended to dockerd's command line; a flag given again overrides the
	// harness's (e.g. "--iptables=true").
	ExtraArgs []string
	// NetNS, when set, is a network namespace of the test's own (NewNetns) that dockerd, its
	// bridge and its containers live in, so that what dockerd does to the network (iptables rules
	// with "--iptables=true") stays there and leaves with it.
	NetNS *os.File
	// ConfigJSON is the daemon's configuration file, e.g. a daemon.json as the installer writes it.
	// Then the file alone decides how ports are published (iptables, ip6tables, userland-proxy,
	// userland-proxy-path: dockerd's defaults where it says nothing, UserlandProxyPath unused),
	// and the harness's other flags are left off for the settings it makes (dockerd refuses to
	// start when a setting is both a flag and in the file). Empty: "{}" and the harness's flags.
	ConfigJSON string
}

// Daemon is a private dockerd with its own bridge, data, sockets, containerd and cgroups.
type Daemon struct {
	Generation Generation
	// Version is what the daemon reports, e.g. "20.10.24+dfsg1 (API 1.41)".
	Version string
	Root    string // instance directory
	Socket  string // the API's unix socket
	Host    string // "unix://" + Socket, for DOCKER_HOST
	Bridge  string
	Subnet  netip.Prefix // the bridge's subnet; containers get addresses from it
	Gateway netip.Addr   // the bridge's own address
	// AddressPool is where user-defined networks (docker network create) get their /27s.
	AddressPool netip.Prefix
	LogPath     string // dockerd's stdout and stderr

	inst     *instance
	docker   string
	cliEnv   []string
	cmd      *exec.Cmd
	exited   chan struct{}
	allowed  bool
	logShown bool // the start error already carried dockerd's log
	// containerd is the private containerd the harness starts for Docker 29 (dockerd 20.10
	// starts and stops its own).
	containerd *process

	imageMu sync.Mutex
	echoTag string
	nameSeq atomic.Int64
}

// StartDaemon starts a private dockerd and waits until it answers. Teardown is registered with
// t.Cleanup first thing, so it runs however far the start got: it removes all containers, stops
// dockerd, and then removes whatever is left (processes, mounts, cgroups, bridges, the directory).
func StartDaemon(t testing.TB, opts DaemonOptions) *Daemon {
	t.Helper()
	if opts.Generation == "" {
		opts.Generation = Docker20
	}
	bins := generationBinaries(t, opts.Generation)
	proxy := opts.UserlandProxyPath
	if proxy == "" {
		proxy = bins.proxy
	} else if err := checkExecutable(proxy); err != nil {
		t.Fatalf("StartDaemon: userland proxy: %v", err)
	}
	docker, err := lookTool("docker")
	if err != nil {
		t.Fatalf("StartDaemon: %v", err)
	}

	var hostNets []netip.Prefix
	var hostErr error
	inst, err := newInstance(t, kindDaemon, func(slot int, st *instanceState) error {
		if hostNets == nil && hostErr == nil {
			hostNets, hostErr = hostRoutes()
		}
		if hostErr != nil {
			return hostErr
		}
		return chooseDaemonSlot(slot, st, hostNets, linkExists)
	})
	if err != nil {
		t.Fatalf("StartDaemon: %v", err)
	}
	subnet := netip.MustParsePrefix(inst.state.Subnet)
	d := &Daemon{
		Generation:  opts.Generation,
		Root:        inst.dir,
		Socket:      filepath.Join(inst.dir, "docker.sock"),
		Bridge:      inst.state.Bridge,
		Subnet:      subnet,
		Gateway:     subnet.Addr().Next(),
		AddressPool: netip.MustParsePrefix(inst.state.Pool),
		LogPath:     filepath.Join(inst.dir, "dockerd.log"),
		inst:        inst,
		docker:      docker,
		exited:      make(chan struct{}),
	}
	d.Host = "unix://" + d.Socket
	d.cliEnv = dockerCLIEnv(filepath.Join(inst.dir, "cli"))
	t.Cleanup(func() { d.teardown(t) })
	t.Logf("testbed: %s dockerd instance %s on bridge %s (%s)", d.Generation, d.Root, d.Bridge, d.Subnet)
	if err := d.start(bins, proxy, opts); err != nil {
		t.Fatalf("StartDaemon: %v", err)
	}
	t.Logf("testbed: %s dockerd %s is up", d.Generation, d.Version)
	return d
}

// daemonBinaries are the programs of one daemon generation.
type daemonBinaries struct {
	dockerd string
	proxy   string // the stock docker-proxy
	// containerd is empty when dockerd starts its own (20.10), else the harness starts it.
	containerd string
	// pathFirst goes first on dockerd's and containerd's PATH, where they find runc and the
	// containerd shim.
	pathFirst string
}

func generationBinaries(t testing.TB, gen Generation) daemonBinaries {
	t.Helper()
	switch gen {
	case Docker20:
		RequireDocker(t)
		proxy, err := lookDockerProxy()
		if err != nil {
			missing(t, err.Error(), ProvisionHint+" (Debian package docker.io)")
		}
		dockerd, err := lookTool("dockerd")
		if err != nil {
			t.Fatalf("StartDaemon: %v", err)
		}
		return daemonBinaries{dockerd: dockerd, proxy: proxy}
	case Docker29:
		dir := RequireDocker29(t)
		return daemonBinaries{
			dockerd:    filepath.Join(dir, "dockerd"),
			proxy:      filepath.Join(dir, "docker-proxy"),
			containerd: filepath.Join(dir, "containerd"),
			pathFirst:  dir,
		}
	}
	t.Fatalf("StartDaemon: unknown daemon generation %q (want one of %v)", gen, AllGenerations)
	return daemonBinaries{}
}

// chooseDaemonSlot derives a daemon's bridge and subnets from its slot, rejecting the slot if
// they would clash with the host's routes or an existing link.
func chooseDaemonSlot(slot int, st *instanceState, hostNets []netip.Prefix, linkExists func(string) bool) error {
	subnet := netip.PrefixFrom(netip.AddrFrom4([4]byte{172, 29, byte(slot), 0}), 24)
	pool := netip.PrefixFrom(netip.AddrFrom4([4]byte{172, 28, byte(slot), 0}), 24)
	for _, n := range hostNets {
		if n.Bits() == 0 {
			continue // a default route does not make a subnet taken
		}
		if n.Overlaps(subnet) || n.Overlaps(pool) {
			return fmt.Errorf("slot %d: host route %s overlaps %s or %s", slot, n, subnet, pool)
		}
	}
	bridge := fmt.Sprintf("%s%d", bridgePrefix, slot)
	if linkExists(bridge) {
		return fmt.Errorf("slot %d: link %s exists", slot, bridge)
	}
	st.Bridge, st.Subnet, st.Pool = bridge, subnet.String(), pool.String()
	return nil
}

func linkExists(name string) bool {
	_, err := os.Stat(filepath.Join("/sys/class/net", name))
	return err == nil
}

// hostRoutes returns the destinations of all IPv4 routes in all tables.
func hostRoutes() ([]netip.Prefix, error) {
	out, err := exec.Command("ip", "-j", "-4", "route", "show", "table", "all").Output()
	if err != nil {
		return nil, fmt.Errorf("ip route show: %w", err)
	}
	return parseRoutes(out)
}

func parseRoutes(jsonText []byte) ([]netip.Prefix, error) {
	var routes []struct {
		Dst string `json:"dst"`
	}
	if err := json.Unmarshal(jsonText, &routes); err != nil {
		return nil, fmt.Errorf("decoding ip -j route output: %w", err)
	}
	out := []netip.Prefix{}
	for _, r := range routes {
		if p, err := netip.ParsePrefix(r.Dst); err == nil {
			out = append(out, p.Masked())
		} else if a, err := netip.ParseAddr(r.Dst); err == nil {
			out = append(out, netip.PrefixFrom(a, a.BitLen()))
		}
	}
	return out, nil
}

// dockerCLIEnv isolates the docker CLI from the user's configuration: contexts, DOCKER_HOST and
// TLS settings would send commands to another daemon.
func dockerCLIEnv(configDir string) []string {
	var env []string
	for _, kv := range toolEnv() {
		k, _, _ := strings.Cut(kv, "=")
		switch k {
		case "DOCKER_HOST", "DOCKER_CONTEXT", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH", "DOCKER_CONFIG", "DOCKER_BUILDKIT":
			continue
		}
		env = append(env, kv)
	}
	// The daemon has no buildx, so BuildKit fails; the classic builder works (with a warning).
	return append(env, "DOCKER_CONFIG="+configDir, "DOCKER_BUILDKIT=0", "DOCKER_CLI_HINTS=false")
}

func (d *Daemon) start(bins daemonBinaries, proxy string, opts DaemonOptions) error {
	in := d.inst
	in.state.CgroupParent = cgroupPrefix + filepath.Base(in.dir)
	in.state.Namespace = "eds-" + filepath.Base(in.dir)
	if err := in.save(); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Join(in.dir, "cli"), 0o700); err != nil {
		return err
	}
	// An empty config file keeps the host's /etc/docker/daemon.json out of the test.
	config := filepath.Join(in.dir, "daemon.json")
	configJSON := cmp.Or(opts.ConfigJSON, "{}\n")
	var inFile map[string]json.RawMessage
	if err := json.Unmarshal([]byte(configJSON), &inFile); err != nil {
		return fmt.Errorf("DaemonOptions.ConfigJSON: %w", err)
	}
	if err := os.WriteFile(config, []byte(configJSON), 0o644); err != nil {
		return err
	}
	ipCommands := [][]string{
		// A MAC address of its own, as dockerd gives the bridges it creates: otherwise the kernel
		// gives the bridge its lowest port's, which changes as containers come and go, and the
		// containers' cached gateway address then leads nowhere until they resolve it again.
		{"link", "add", "name", d.Bridge, "address", bridgeMAC(), "type", "bridge"},
		{"addr", "add", netip.PrefixFrom(d.Gateway, d.Subnet.Bits()).String(), "dev", d.Bridge},
		{"link", "set", d.Bridge, "up"},
	}
	if opts.NetNS != nil {
		ipCommands = append([][]string{{"link", "set", "lo", "up"}}, ipCommands...)
	}
	for _, args := range ipCommands {
		var out []byte
		err := inNetns(opts.NetNS, func() (err error) {
			out, err = exec.Command("ip", args...).CombinedOutput()
			return err
		})
		if err != nil {
			return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
		}
	}

	args := []string{
		"--config-file", config,
		"--data-root", filepath.Join(in.dir, "data"),
		"--exec-root", filepath.Join(in.dir, daemonExecDir),
		"--pidfile", filepath.Join(in.dir, "docker.pid"),
		"-H", d.Host,
		"--bridge", d.Bridge,
		"--containerd-namespace", in.state.Namespace,
		"--containerd-plugins-namespace", in.state.Namespace + "-plugins",
		"--cgroup-parent", in.state.CgroupParent,
		"--default-address-pool", "base=" + d.AddressPool.String() + ",size=27",
	}
	env := toolEnv(append([]string{markerEnv + "=" + in.dir}, opts.Env...)...)
	if bins.pathFirst != "" {
		env = prependPath(env, bins.pathFirst)
	}
	if bins.containerd != "" {
		// Docker 29 gets a containerd of its own, started here with a private configuration:
		// without --containerd, dockerd would use any containerd listening on the host's default
		// socket (Debian's 1.6 is too old for it).
		sock, err := d.startContainerd(bins.containerd, env)
		if err != nil {
			return err
		}
		args = append(args, "--containerd", sock)
	}
	for _, f := range []struct {
		key, value string
		publishing bool // a setting of how ports are published, which ConfigJSON decides alone
	}{
		{"iptables", "false", true},
		// Docker 27 and later keep ip6tables on when iptables is off: they would put IPv6 rules in
		// the host's ruleset (with a FORWARD policy of drop) and leave them there when they stop.
		// 20.10 takes the flag too.
		{"ip6tables", "false", true},
		{"userland-proxy", "true", true},
		{"userland-proxy-path", proxy, true},
		{"ip-forward", "false", false},
		{"ip-masq", "false", false},
	} {
		if _, set := inFile[f.key]; !set && !(f.publishing && opts.ConfigJSON != "") {
			args = append(args, "--"+f.key+"="+f.value)
		}
	}
	args = append(args, opts.ExtraArgs...)
	logf, err := os.OpenFile(d.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(bins.dockerd, args...)
	cmd.Dir = in.dir
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own process group: a ^C meant for go test must not stop dockerd before teardown does.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := inNetns(opts.NetNS, cmd.Start); err != nil {
		return fmt.Errorf("starting dockerd: %w", err)
	}
	d.cmd = cmd
	go func() {
		_ = cmd.Wait()
		close(d.exited)
	}()
	if err := in.recordPid(cmd.Process.Pid); err != nil {
		return err
	}
	allowNet(d.Subnet)
	allowNet(d.AddressPool)
	d.allowed = true

	deadline := time.Now().Add(daemonStartTimeout)
	for {
		err := d.ping()
		if err == nil {
			return d.readVersion()
		}
		select {
		case <-d.exited:
			d.logShown = true
			return fmt.Errorf("dockerd exited during start (%s); its log:\n%s", cmd.ProcessState, tailFile(d.LogPath, 40))
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			d.logShown = true
			return fmt.Errorf("dockerd did not answer within %s: %v; its log:\n%s", daemonStartTimeout, err, tailFile(d.LogPath, 40))
		}
	}
}

// inNetns runs fn in the network namespace ns (InNetns), or as it is when ns is nil.
func inNetns(ns *os.File, fn func() error) error {
	if ns == nil {
		return fn()
	}
	return InNetns(ns, fn)
}

// Pid is dockerd's process ID.
func (d *Daemon) Pid() int {
	if d.cmd == nil {
		return 0
	}
	return d.cmd.Process.Pid
}

// ping asks the API's /_ping, which answers as soon as the daemon serves requests.
func (d *Daemon) ping() error {
	client := &http.Client{
		Timeout: time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", d.Socket)
		}},
	}
	defer client.CloseIdleConnections()
	resp, err := client.Get("http://docker/_ping")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("/_ping: %s", resp.Status)
	}
	return nil
}

// readVersion asks the daemon what it is, for the test's log.
func (d *Daemon) readVersion() error {
	ctx, cancel := context.WithTimeout(context.Background(), dockerCommandTimeout)
	defer cancel()
	v, err := d.Docker(ctx, "version", "--format", "{{.Server.Version}} (API {{.Server.APIVersion}})")
	if err != nil {
		return err
	}
	d.Version = v
	return nil
}

// Docker runs the docker CLI against this daemon and returns its trimmed stdout; the error
// carries stderr, where docker puts the daemon's reasons.
func (d *Daemon) Docker(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, d.docker, append([]string{"-H", d.Host}, args...)...)
	cmd.Env = d.cliEnv
	cmd.WaitDelay = 5 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	out := strings.TrimSpace(stdout.String())
	if err != nil {
		return out, fmt.Errorf("docker %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

// MustDocker is Docker that fails the test on error. It does not use t.Context, so it also works
// inside t.Cleanup.
func (d *Daemon) MustDocker(t testing.TB, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), dockerCommandTimeout)
	defer cancel()
	out, err := d.Docker(ctx, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Command prepares a process that belongs to this daemon's instance, such as a server its
// proxies talk to: it carries the instance's marker, so if the test process dies without stopping
// it, the stale cleaning kills it with the rest of the instance (as teardown does with whatever is
// still running). The caller starts and stops it.
func (d *Daemon) Command(name string, args ...string) *exec.Cmd {
	cmd := exec.Command(name, args...)
	cmd.Env = toolEnv(markerEnv + "=" + d.Root)
	return cmd
}

// Processes lists the live processes of this daemon's instance whose program file is named
// program (e.g. "docker-proxy"): found the way teardown finds what to kill, so they include the
// userland proxies dockerd runs.
func (d *Daemon) Processes(program string) []int {
	var pids []int
	for _, p := range instanceProcs(d.Root, d.inst.state.CgroupParent) {
		argv0, _, _ := strings.Cut(string(readFile(fmt.Sprintf("/proc/%d/cmdline", p.pid))), "\x00")
		if filepath.Base(argv0) == program {
			pids = append(pids, p.pid)
		}
	}
	return pids
}

func (d *Daemon) running() bool {
	if d.cmd == nil {
		return false
	}
	select {
	case <-d.exited:
		return false
	default:
		return true
	}
}

func (d *Daemon) teardown(t testing.TB) {
	if d.allowed {
		disallowNet(d.Subnet)
		disallowNet(d.AddressPool)
	}
	if d.running() {
		if err := d.stopDaemon(); err != nil {
			t.Errorf("testbed: stopping dockerd %s: %v", d.Root, err)
		}
	}
	if d.containerd != nil {
		if err := d.containerd.stop(daemonStopTimeout); err != nil {
			t.Errorf("testbed: stopping containerd of %s: %v", d.Root, err)
		}
	}
	if t.Failed() && !d.logShown {
		t.Logf("testbed: dockerd log %s, last lines:\n%s", d.LogPath, tailFile(d.LogPath, 60))
		if d.containerd != nil {
			t.Logf("testbed: containerd log %s, last lines:\n%s", d.containerd.logPath, tailFile(d.containerd.logPath, 30))
		}
	}
	if err := d.inst.release(t.Logf); err != nil {
		t.Errorf("testbed: removing daemon instance %s: %v", d.Root, err)
	}
	// A server the test ran must not keep rules for the bridge past the test: the slot's next
	// daemon, under another test, would inherit them (a test's own eds_* table goes quietly if
	// the test failed before removing it).
	tables, err := listTables()
	if err != nil {
		t.Errorf("testbed: %v", err)
	}
	for _, tb := range mentioning(tables, []string{`"` + d.Bridge + `"`}) {
		if !t.Failed() || !tb.ours() {
			t.Errorf("testbed: nftables table %s still has rules for %s after the test: a server the test ran kept them (run it with testbed.ServerHostEnv)", tb, d.Bridge)
		}
		if tb.ours() {
			if err := tb.delete(); err != nil {
				t.Errorf("testbed: %v", err)
			}
		}
	}
}

// stopDaemon removes every container first (SIGKILL, no grace) so dockerd's own shutdown has
// nothing to wait for, then stops dockerd with SIGTERM, which also stops its containerd.
func (d *Daemon) stopDaemon() error {
	var errs []error
	ctx, cancel := context.WithTimeout(context.Background(), dockerCommandTimeout)
	defer cancel()
	ids, err := d.Docker(ctx, "ps", "-aq")
	if err != nil {
		errs = append(errs, err)
	} else if ids != "" {
		if _, err := d.Docker(ctx, append([]string{"rm", "-f", "-v"}, strings.Fields(ids)...)...); err != nil {
			errs = append(errs, err)
		}
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(daemonStopTimeout):
		errs = append(errs, fmt.Errorf("dockerd ignored SIGTERM for %s; killed", daemonStopTimeout))
		_ = d.cmd.Process.Kill()
		<-d.exited
	}
	return errors.Join(errs...)
}

// tailFile returns the last n lines of a log, for test failure output.
func tailFile(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(cannot read %s: %v)", path, err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = append([]string{fmt.Sprintf("... (%d earlier lines)", len(lines)-n)}, lines[len(lines)-n:]...)
	}
	return strings.Join(lines, "\n")
}

// bridgeMAC is a random locally administered unicast MAC address.
func bridgeMAC() string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	b[0] = b[0]&0xfe | 0x02
	return net.HardwareAddr(b).String()
}
