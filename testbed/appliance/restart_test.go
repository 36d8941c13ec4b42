package appliance

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
)

// TestE2EApplianceRestarts: on the compose appliance (one per daemon generation, started once per
// process and reused by every run under -count=N), under a steady load on an HTTP, a TCP and a
// UDP published port (a new connection per request) and with a long-lived TCP connection:
//   - kill -9 of the server container's process: no request fails and the long-lived
//     connection lives on; the restart policy brings the server back and within 5 s it lists
//     the live mappings again; a container stopped while it was down is gone from Envoy
//     afterwards;
//   - `compose restart envoy`, and an upgrade to a new envoy image (`compose up -d` of a rebuilt
//     one): no request fails, no connection is refused (the shims serve the ports while Envoy is
//     away), the long-lived connection is closed no earlier than ENVOY_DRAIN_TIME after the stop
//     began, and the new Envoy carries the ports again;
//   - kill -9 of Envoy's process: no connection is refused, at most the requests in flight fail
//     (one per client of the load), UDP (the shim's own) never; the figures are logged;
//   - and afterwards nothing leaks: the same registrations, Envoy listeners and shim processes
//     as before, no shim holding more sockets than it did.
func TestE2EApplianceRestarts(t *testing.T) {
	for _, gen := range testbed.Generations(t) {
		t.Run(string(gen), func(t *testing.T) {
			start := time.Now()
			f := sharedFixture(t, gen)
			f.checkSettled(t)
			f.restarts(t)
			f.checkSettled(t)
			t.Logf("restarts and checks in %s", time.Since(start).Round(100*time.Millisecond))
		})
	}
}

// restartFixture is an appliance serving three long-lived published ports.
type restartFixture struct {
	a                         *Appliance
	web, echo, dgram          *testbed.Container
	httpURL, tcpAddr, udpAddr string
	mappings                  []Registration
	listeners                 []string
	shims                     map[int]int // pid of each shim: its open sockets at the start (-1: UDP, not counted)
}

func newRestartFixture(tb testing.TB, gen testbed.Generation) *restartFixture {
	tb.Helper()
	f := &restartFixture{a: startShared(tb, Options{Generation: gen})}
	// The server sets net.ipv4.tcp_migrate_req=1 in the host's /proc/sys/net, here a stand-in (the
	// test must not depend on the server writing to the machine's kernel)...
	testbed.WaitFor(tb, 10*time.Second, "the server's tcp_migrate_req", func() error {
		if b, err := os.ReadFile(filepath.Join(f.a.SysctlDir, "ipv4", "tcp_migrate_req")); err != nil || string(b) != "1\n" {
			return fmt.Errorf("tcp_migrate_req %q, %v", b, err)
		}
		return nil
	})
	// ...so the test does in the machine's kernel what the server does on a real host. It turns it
	// on only: it changes nothing but what becomes of connections queued on a closing socket of a
	// SO_REUSEPORT group (migrated instead of reset), and other tests may rely on it by now.
	const migrate = "/proc/sys/net/ipv4/tcp_migrate_req"
	if b, err := os.ReadFile(migrate); err != nil {
		tb.Fatalf("%s: %v (kernels before 5.14 lack it)", migrate, err)
	} else if strings.TrimSpace(string(b)) != "1" {
		if err := os.WriteFile(migrate, []byte("1\n"), 0o644); err != nil {
			tb.Fatal(err)
		}
		tb.Logf("set net.ipv4.tcp_migrate_req=1 in this machine's kernel, as the server does on a real host")
	}
	d := f.a.Daemon
	httpPort, tcpPort, udpPort := testbed.FreePort(tb), testbed.FreePort(tb), testbed.FreePort(tb)
	f.web = d.Run(tb, testbed.RunOptions{
		Publish: []string{fmt.Sprintf("127.0.0.1:%d:80", httpPort)},
		Labels:  map[string]string{"ServiceName": "web", "EnvironmentName": "restart"},
	})
	f.echo = d.Run(tb, testbed.RunOptions{
		Publish: []string{fmt.Sprintf("127.0.0.1:%d:7", tcpPort)},
		Labels:  map[string]string{"ServiceName": "echo", "EnvironmentName": "restart", "ProxyMode": "tcp"},
	})
	f.dgram = d.Run(tb, testbed.RunOptions{
		Publish: []string{fmt.Sprintf("127.0.0.1:%d:7/udp", udpPort)},
		Labels:  map[string]string{"ServiceName": "dgram", "EnvironmentName": "restart"},
	})
	// Upgrades build on each image as built, under a tag of its own: the classic builder of
	// Docker 29 resolves FROM only by name.
	for _, svc := range appliancesServices {
		d.MustDocker(tb, "tag", imageRef(svc), imageRef(svc)+"-base")
	}
	f.httpURL = fmt.Sprintf("http://127.0.0.1:%d/", httpPort)
	f.tcpAddr = fmt.Sprintf("127.0.0.1:%d", tcpPort)
	f.udpAddr = fmt.Sprintf("127.0.0.1:%d", udpPort)
	for _, p := range f.probes() {
		testbed.WaitFor(tb, 15*time.Second, p.name+" served", func() error { return p.do(context.Background()) })
	}
	f.mappings = f.a.Registrations(tb)
	if len(f.mappings) != 3 {
		tb.Fatalf("registrations %+v, want web, echo and dgram", f.mappings)
	}
	f.listeners = f.a.Listeners(tb)
	want := []string{"ui"}
	for _, r := range f.mappings {
		if r.Listener != "" {
			want = append(want, r.Listener)
		}
	}
	if slices.Sort(want); !slices.Equal(f.listeners, want) {
		tb.Fatalf("Envoy's listeners %q, want web's, echo's and the UI's %q", f.listeners, want)
	}
	f.shims = map[int]int{}
	for _, pid := range d.Processes("envoy-docker-shim") {
		f.shims[pid] = openFDs(pid)
		if cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); strings.Contains(string(cmdline), "udp") {
			// A UDP shim keeps a socket per client address for 90 s after its last datagram, as
			// docker-proxy does (its conntrack timeout): the load's flows, not a leak.
			f.shims[pid] = -1
		}
	}
	if len(f.shims) != 3 {
		tb.Fatalf("shims %v, want one per published port", f.shims)
	}
	return f
}

// probes are the requests of the steady load, one per published port.
func (f *restartFixture) probes() []probe {
	return []probe{
		{"http", func(ctx context.Context) error {
			ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
			defer cancel()
			status, body, err := testbed.HTTPGet(ctx, f.httpURL)
			if err == nil && (status != 200 || !strings.Contains(body, `"`+f.web.Name+`"`)) {
				err = fmt.Errorf("status %d body %.80q, want the echo server %s", status, body, f.web.Name)
			}
			return err
		}},
		{"tcp", func(ctx context.Context) error {
			ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
			defer cancel()
			got, err := testbed.TCPEcho(ctx, f.tcpAddr, []byte("WHOAMI\n"))
			if err == nil && string(got) != f.echo.Name+"\n" {
				err = fmt.Errorf("tcp %s answered %q, want %s", f.tcpAddr, got, f.echo.Name)
			}
			return err
		}},
		{"udp", func(ctx context.Context) error {
			ctx, cancel := context.WithTimeout(ctx, time.Second)
			defer cancel()
			got, err := testbed.UDPEcho(ctx, f.udpAddr, []byte("WHOAMI"))
			if err == nil && strings.TrimSpace(string(got)) != f.dgram.Name {
				err = fmt.Errorf("udp %s answered %q, want %s", f.udpAddr, got, f.dgram.Name)
			}
			return err
		}},
	}
}

// checkSettled: the appliance is healthy and holds exactly the fixture's ports: the same
// registrations, Envoy listeners and shim processes, and no shim holds more sockets than at the
// start (a connection to the server or a proxied connection left behind by a restart would show).
func (f *restartFixture) checkSettled(t *testing.T) {
	t.Helper()
	f.a.WaitHealthy(t, 30*time.Second, "server", "envoy")
	testbed.WaitFor(t, 10*time.Second, "the server lists the fixture's mappings", func() error {
		got, err := f.a.registrationsErr()
		if err == nil && !sameMappings(got, f.mappings) {
			err = fmt.Errorf("lists %+v, want %+v", got, f.mappings)
		}
		return err
	})
	testbed.WaitFor(t, 10*time.Second, "Envoy holds the fixture's listeners", func() error {
		if got := f.a.Listeners(t); !slices.Equal(got, f.listeners) {
			return fmt.Errorf("listeners %q, want %q", got, f.listeners)
		}
		return nil
	})
	testbed.WaitFor(t, 10*time.Second, "the fixture's shims, and no socket more", func() error {
		pids := f.a.Daemon.Processes("envoy-docker-shim")
		if len(pids) != len(f.shims) {
			return fmt.Errorf("shim processes %v, want %d", pids, len(f.shims))
		}
		for _, pid := range pids {
			base, ok := f.shims[pid]
			if !ok {
				return fmt.Errorf("shim %d is not one of the fixture's %v", pid, f.shims)
			}
			if n := openFDs(pid); base >= 0 && n > base {
				return fmt.Errorf("shim %d holds %d sockets, %d at the start; its descriptors and sockets:\n%s", pid, n, base, sockets(pid))
			}
		}
		return nil
	})
	if ids := strings.Fields(f.a.Daemon.MustDocker(t, "ps", "-a", "-q", "--filter", "label=eds-test=gone")); len(ids) != 0 {
		t.Fatalf("containers of earlier runs left: %q", ids)
	}
}

// restarts runs the server's kill -9 and Envoy's restart under the steady load.
func (f *restartFixture) restarts(t *testing.T) {
	t.Helper()
	a := f.a
	// A fourth port, stopped while the server is down: nobody re-registers it.
	gonePort := testbed.FreePort(t)
	gone := a.Daemon.Run(t, testbed.RunOptions{
		Publish: []string{fmt.Sprintf("127.0.0.1:%d:80", gonePort)},
		Labels:  map[string]string{"ServiceName": "gone", "EnvironmentName": "restart", "eds-test": "gone"},
	})
	t.Cleanup(func() { _, _ = a.Daemon.Docker(context.Background(), "rm", "-f", "-v", gone.ID) }) // if the test stops early
	var goneListener string
	testbed.WaitFor(t, 10*time.Second, "gone registered", func() error {
		regs, err := a.registrationsErr()
		for _, r := range regs {
			if r.ContainerID == gone.ID {
				goneListener = r.Listener
			}
		}
		if err == nil && goneListener == "" {
			err = fmt.Errorf("no registration of %s in %+v", gone.ID, regs)
		}
		return err
	})

	load := startLoad(f.probes(), 10*time.Millisecond, 3*time.Minute)
	defer load.Stop()
	time.Sleep(300 * time.Millisecond) // the load runs before anything restarts

	// The server: kill -9, brought back by its restart policy.
	long := openLongLived(t, f.tcpAddr, f.echo.Name)
	serverDown := time.Now()
	server := a.Container(t, "server")
	pid := a.Daemon.MustDocker(t, "inspect", "-f", "{{.State.Pid}}", server)
	if err := exec.Command("kill", "-9", pid).Run(); err != nil {
		t.Fatalf("kill -9 %s: %v", pid, err)
	}
	a.Daemon.Stop(t, gone)
	var restarted time.Time
	testbed.WaitFor(t, 30*time.Second, "the server restarted by its restart policy", func() error {
		state := a.Daemon.MustDocker(t, "inspect", "-f", "{{.State.Running}} {{.State.Pid}}", server)
		if f := strings.Fields(state); len(f) != 2 || f[0] != "true" || f[1] == pid || f[1] == "0" {
			return fmt.Errorf("server state %q", state)
		}
		restarted = time.Now()
		return nil
	})
	testbed.WaitFor(t, 5*time.Second, "the restarted server lists the live mappings", func() error {
		got, err := a.registrationsErr()
		if err == nil && !sameMappings(got, f.mappings) {
			err = fmt.Errorf("lists %+v, want %+v", got, f.mappings)
		}
		return err
	})
	t.Logf("registry rebuilt %v after the server's restart", time.Since(restarted).Round(time.Millisecond))
	testbed.WaitFor(t, 20*time.Second, "the stopped container's listener gone from Envoy", func() error {
		if slices.Contains(a.Listeners(t), goneListener) {
			return fmt.Errorf("%s still in Envoy", goneListener)
		}
		return nil
	})
	time.Sleep(200 * time.Millisecond)
	serverPhase := load.window(serverDown, time.Now())
	t.Logf("server kill -9: %s", serverPhase)
	if serverPhase.failedAll() != 0 || serverPhase.okAll() == 0 {
		t.Errorf("through the server's kill -9 and restart, requests failed: %s", serverPhase)
	}
	if err := long.alive(); err != nil {
		t.Errorf("the long-lived connection through Envoy did not survive the server's restart: %v", err)
	}
	long.close()
	a.Daemon.Remove(t, gone)

	// Planned: compose restart envoy, an upgrade to a rebuilt envoy image, and an upgrade of all
	// four images at once.
	for i, step := range []struct {
		name string
		do   func(*testing.T)
	}{
		{"compose restart envoy", func(t *testing.T) { a.Compose(t, "restart", "envoy") }},
		{"upgrade to a new envoy image", func(t *testing.T) { f.upgradeEnvoy(t) }},
		{"upgrade of the whole appliance", func(t *testing.T) { f.upgradeAll(t) }},
	} {
		long := openLongLived(t, f.tcpAddr, f.echo.Name)
		before := f.envoyIdentity(t)
		began := time.Now()
		step.do(t)
		back := f.waitNewEnvoyServes(t, before)
		time.Sleep(300 * time.Millisecond)
		phase := load.window(began, time.Now())
		closed, err := long.waitClosed(TestDrainTime + 10*time.Second)
		t.Logf("%s: the new Envoy carried every port %v after the stop began; long-lived connection closed after %v (%v); %s",
			step.name, back.Sub(began).Round(time.Millisecond), closed.Sub(began).Round(time.Millisecond), err, phase)
		if phase.failedAll() != 0 {
			t.Errorf("%s: requests failed or were refused: %s", step.name, phase)
		}
		for name, r := range phase {
			if r.ok == 0 {
				t.Errorf("%s: nothing served on %s", step.name, name)
			}
		}
		if closed.IsZero() {
			t.Errorf("%s: the long-lived connection was never closed", step.name)
		} else if d := closed.Sub(began); d < TestDrainTime {
			t.Errorf("%s: the long-lived connection was closed %v after the stop began, before the drain time (%v)", step.name, d, TestDrainTime)
		}
		if i != 1 {
			f.checkSettled(t)
		}
	}

	// Unplanned: kill -9 of Envoy's process; the container's restart policy brings it back.
	long = openLongLived(t, f.tcpAddr, f.echo.Name)
	before := f.envoyIdentity(t)
	killed := time.Now()
	envoyPid := f.envoyPid(t)
	if err := syscall.Kill(envoyPid, syscall.SIGKILL); err != nil {
		t.Fatalf("kill -9 of Envoy (pid %d): %v", envoyPid, err)
	}
	back := f.waitNewEnvoyServes(t, before)
	time.Sleep(300 * time.Millisecond)
	killPhase := load.window(killed, time.Now())
	load.Stop()
	closed, err := long.waitClosed(5 * time.Second)
	t.Logf("envoy kill -9: the new Envoy carried every port %v after the kill; the long-lived connection ended after %v (%v); %s",
		back.Sub(killed).Round(time.Millisecond), closed.Sub(killed).Round(time.Millisecond), err, killPhase)
	for name, r := range killPhase {
		if r.refused != 0 || r.ok == 0 {
			t.Errorf("Envoy's kill -9: %s: %d refused, %d served, want none refused", name, r.refused, r.ok)
		}
		// Each probe has one client: at most its request in flight at the kill fails.
		if r.failed > 1 {
			t.Errorf("Envoy's kill -9: %s: %d requests failed, want at most the one in flight", name, r.failed)
		}
	}
	if r := killPhase["udp"]; r.failed != 0 {
		t.Errorf("UDP (proxied by the shim) failed through Envoy's kill -9: %s", killPhase)
	}
}

// envoyIdentity names the running Envoy: its container and when that container (re)started.
func (f *restartFixture) envoyIdentity(t *testing.T) string {
	t.Helper()
	id := f.a.Container(t, "envoy")
	return id + " " + f.a.Daemon.MustDocker(t, "inspect", "-f", "{{.State.StartedAt}}", id)
}

// envoyPid is the Envoy process in the envoy container: the entrypoint's only child.
func (f *restartFixture) envoyPid(t *testing.T) int {
	t.Helper()
	entry, err := strconv.Atoi(f.a.Daemon.MustDocker(t, "inspect", "-f", "{{.State.Pid}}", f.a.Container(t, "envoy")))
	if err != nil {
		t.Fatal(err)
	}
	var kids []int
	dirs, _ := os.ReadDir("/proc")
	for _, d := range dirs {
		pid, err := strconv.Atoi(d.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", d.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...: comm may hold spaces, so read after its closing parenthesis.
		if i := strings.LastIndexByte(string(stat), ')'); i > 0 {
			if f := strings.Fields(string(stat[i+1:])); len(f) > 1 && f[1] == strconv.Itoa(entry) {
				kids = append(kids, pid)
			}
		}
	}
	if len(kids) != 1 {
		t.Fatalf("the entrypoint (pid %d) has children %v, want Envoy alone", entry, kids)
	}
	return kids[0]
}

// waitNewEnvoyServes waits until an Envoy other than before runs, is healthy, and has carried
// requests of both TCP ports (its counters start at zero): the shims steer to it again. It
// returns when.
func (f *restartFixture) waitNewEnvoyServes(t *testing.T, before string) time.Time {
	t.Helper()
	testbed.WaitFor(t, 60*time.Second, "a new Envoy container running", func() error {
		ids := f.a.Containers(t, "envoy")
		if len(ids) != 1 {
			return fmt.Errorf("%d envoy containers", len(ids))
		}
		if f.a.Daemon.MustDocker(t, "inspect", "-f", "{{.State.Running}}", ids[0]) != "true" {
			return errors.New("not running")
		}
		if now := f.envoyIdentity(t); now == before {
			return errors.New("still the old one")
		}
		return nil
	})
	f.a.WaitHealthy(t, 30*time.Second, "envoy")
	testbed.WaitFor(t, 30*time.Second, "the new Envoy carries both TCP ports", func() error {
		for _, stat := range []string{"http.web-restart.downstream_rq_completed", "tcp.echo-restart.downstream_cx_total"} {
			if v, ok, err := f.a.envoyStatErr(stat); err != nil || !ok || v == 0 {
				return fmt.Errorf("%s = %d (present %v, %v)", stat, v, ok, err)
			}
		}
		return nil
	})
	return time.Now()
}

// appliancesServices are the compose services whose images an upgrade replaces.
var appliancesServices = []string{"server", "envoy", "installer", "resync"}

func imageRef(svc string) string { return "envoy-docker-shim/" + svc + ":" + imageVersion }

// upgradeEnvoy builds a new envoy image and runs `compose up -d` of envoy, which replaces the
// container with one of the new image, as an upgrade does.
func (f *restartFixture) upgradeEnvoy(t *testing.T) {
	t.Helper()
	_, previous := f.rebuildImage(t, "envoy")
	container := f.a.Container(t, "envoy")
	f.composeUp(t, "envoy")
	if now := f.a.Container(t, "envoy"); now == container {
		t.Fatalf("compose up -d kept the envoy container %s of the old image", container)
	}
	f.removeImages(t, previous)
}

// upgradeAll builds a new image of each of the appliance's four services and runs `compose up
// -d`, which replaces every container with one of its new image, as an upgrade of the whole
// appliance does: the server and Envoy restart, the installer and resync run again.
func (f *restartFixture) upgradeAll(t *testing.T) {
	t.Helper()
	d := f.a.Daemon
	built := map[string]string{}
	var previous []string
	for _, svc := range appliancesServices {
		var was string
		built[svc], was = f.rebuildImage(t, svc)
		previous = append(previous, was)
	}
	f.composeUp(t)
	f.a.WaitHealthy(t, 60*time.Second, "server", "envoy")
	for _, svc := range appliancesServices {
		testbed.WaitFor(t, 60*time.Second, svc+" runs its new image", func() error {
			ids := f.a.Containers(t, svc)
			if len(ids) != 1 {
				return fmt.Errorf("%d %s containers", len(ids), svc)
			}
			if img := d.MustDocker(t, "inspect", "-f", "{{.Image}}", ids[0]); img != built[svc] {
				return fmt.Errorf("%s runs image %s, want %s", svc, img, built[svc])
			}
			return nil
		})
	}
	for _, svc := range []string{"installer", "resync"} {
		testbed.WaitFor(t, 60*time.Second, svc+" done", func() error {
			if st := d.MustDocker(t, "inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", f.a.Container(t, svc)); st != "exited 0" {
				return fmt.Errorf("%s: %s", svc, st)
			}
			return nil
		})
	}
	f.removeImages(t, previous...)
}

// rebuildImage builds a new image of svc, the one the appliance built plus a label: a new image
// ID under the same tag. It returns that ID, and the ID the tag had unless it was the one built
// for the appliance (an earlier upgrade's, unused once the new one runs).
func (f *restartFixture) rebuildImage(t *testing.T, svc string) (built, previous string) {
	t.Helper()
	d := f.a.Daemon
	ref, base := imageRef(svc), imageRef(svc)+"-base"
	was := d.MustDocker(t, "image", "inspect", "-f", "{{.Id}}", ref)
	dir := t.TempDir()
	dockerfile := fmt.Sprintf("FROM %s\nLABEL org.envoy-docker-shim.test-upgrade=%q\n", base, time.Now().Format(time.RFC3339Nano))
	if err := os.WriteFile(filepath.Join(dir, "Dockerfile"), []byte(dockerfile), 0o644); err != nil {
		t.Fatal(err)
	}
	d.MustDocker(t, "build", "-q", "-t", ref, dir)
	built = d.MustDocker(t, "image", "inspect", "-f", "{{.Id}}", ref)
	if built == was {
		t.Fatalf("the rebuilt %s image has the old ID %s", svc, was)
	}
	if was != d.MustDocker(t, "image", "inspect", "-f", "{{.Id}}", base) {
		previous = was
	}
	return built, previous
}

// composeUp runs `compose up -d` of services (all without any). docker-compose 1.29 cannot
// recreate a container on Docker 25 and later (it reads the image's ContainerConfig, which they
// no longer report); its users replace containers in two steps, rm -s -f and up -d.
func (f *restartFixture) composeUp(t *testing.T, services ...string) {
	t.Helper()
	up := []string{"up", "-d"}
	if len(services) > 0 {
		up = append(up, "--no-deps")
	}
	up = append(up, services...)
	ctx, cancel := context.WithTimeout(context.Background(), composeTimeout)
	defer cancel()
	out, err := f.a.ComposeErr(ctx, up...)
	if err == nil {
		return
	}
	if !strings.Contains(out, "KeyError: 'ContainerConfig'") {
		t.Fatal(err)
	}
	rm := services
	if len(rm) == 0 {
		rm = appliancesServices
	}
	t.Logf("docker-compose 1.29 cannot recreate on this daemon: rm -s -f %s, then up -d", strings.Join(rm, " "))
	f.a.Compose(t, append([]string{"rm", "-s", "-f"}, rm...)...)
	f.a.Compose(t, up...)
}

// removeImages removes earlier upgrades' images ("" is none): nothing piles up across runs.
func (f *restartFixture) removeImages(t *testing.T, ids ...string) {
	t.Helper()
	for _, id := range ids {
		if id == "" {
			continue
		}
		if _, err := f.a.Daemon.Docker(context.Background(), "image", "rm", id); err != nil {
			t.Errorf("removing an earlier upgrade's image: %v", err)
		}
	}
}

// longLived is a TCP connection through Envoy to the echo server that sends a line every 100 ms
// and checks its echo, until it breaks or is closed.
type longLived struct {
	c        net.Conn
	done     chan struct{}
	closedAt time.Time
	err      error
	stop     chan struct{}
}

func openLongLived(t *testing.T, addr, name string) *longLived {
	t.Helper()
	c, err := testbed.Dial(context.Background(), "tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(c)
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, "WHOAMI\n"); err != nil {
		t.Fatal(err)
	}
	if line, err := r.ReadString('\n'); err != nil || line != name+"\n" {
		t.Fatalf("long-lived connection to %s: %q, %v", addr, line, err)
	}
	l := &longLived{c: c, done: make(chan struct{}), stop: make(chan struct{})}
	go func() {
		defer close(l.done)
		for i := 0; i < 3000; i++ { // at most 5 minutes
			select {
			case <-l.stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			msg := fmt.Sprintf("ping %d\n", i)
			_, err := io.WriteString(c, msg)
			var line string
			if err == nil {
				line, err = r.ReadString('\n')
			}
			if err == nil && line != msg {
				err = fmt.Errorf("echo %q, want %q", line, msg)
			}
			if err != nil {
				l.closedAt, l.err = time.Now(), err
				return
			}
		}
	}()
	t.Cleanup(l.close)
	return l
}

// alive reports an error if the connection has broken.
func (l *longLived) alive() error {
	select {
	case <-l.done:
		if l.err != nil {
			return l.err
		}
		return errors.New("stopped")
	default:
		return nil
	}
}

// waitClosed waits up to limit for the connection to break and returns when it did.
func (l *longLived) waitClosed(limit time.Duration) (time.Time, error) {
	select {
	case <-l.done:
		return l.closedAt, l.err
	case <-time.After(limit):
		return time.Time{}, errors.New("still open")
	}
}

func (l *longLived) close() {
	select {
	case <-l.stop:
	default:
		close(l.stop)
	}
	<-l.done
	l.c.Close()
}

// probe is one request of the steady load.
type probe struct {
	name string
	do   func(context.Context) error
}

// attempt is one request of the steady load and its outcome.
type attempt struct {
	start, end time.Time
	err        error
}

// load sends each probe back to back (one client per probe, a pause between requests) until
// stopped, for at most limit.
type load struct {
	mu       sync.Mutex
	attempts map[string][]attempt
	cancel   context.CancelFunc
	wg       sync.WaitGroup
}

func startLoad(probes []probe, pause, limit time.Duration) *load {
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	l := &load{attempts: map[string][]attempt{}, cancel: cancel}
	for _, p := range probes {
		l.wg.Go(func() {
			for ctx.Err() == nil {
				a := attempt{start: time.Now()}
				a.err = p.do(ctx)
				a.end = time.Now()
				if ctx.Err() != nil {
					return // cut by Stop: neither a success nor a failure
				}
				l.mu.Lock()
				l.attempts[p.name] = append(l.attempts[p.name], a)
				l.mu.Unlock()
				select {
				case <-ctx.Done():
				case <-time.After(pause):
				}
			}
		})
	}
	return l
}

// Stop ends the load and waits for it (idempotent).
func (l *load) Stop() {
	l.cancel()
	l.wg.Wait()
}

// loadResult is what one probe's requests in a time window came to.
type loadResult struct {
	ok, failed, refused int
	// outage spans the failed requests: from the start of the first to the end of the last.
	outage   time.Duration
	examples []string
}

type phaseResult map[string]loadResult

// window sums up the requests that started in [from, to).
func (l *load) window(from, to time.Time) phaseResult {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := phaseResult{}
	for name, as := range l.attempts {
		var r loadResult
		var first, last time.Time
		for _, a := range as {
			if a.start.Before(from) || !a.start.Before(to) {
				continue
			}
			if a.err == nil {
				r.ok++
				continue
			}
			r.failed++
			if errors.Is(a.err, syscall.ECONNREFUSED) {
				r.refused++
			}
			if first.IsZero() {
				first = a.start
			}
			last = a.end
			if len(r.examples) < 3 {
				r.examples = append(r.examples, a.err.Error())
			}
		}
		if !first.IsZero() {
			r.outage = last.Sub(first)
		}
		out[name] = r
	}
	return out
}

func (p phaseResult) okAll() (n int) {
	for _, r := range p {
		n += r.ok
	}
	return n
}

func (p phaseResult) failedAll() (n int) {
	for _, r := range p {
		n += r.failed
	}
	return n
}

func (p phaseResult) String() string {
	var parts []string
	for _, name := range slices.Sorted(maps.Keys(p)) {
		r := p[name]
		s := fmt.Sprintf("%s %d ok, %d failed (%d refused)", name, r.ok, r.failed, r.refused)
		if r.failed > 0 {
			s += fmt.Sprintf(" over %v, e.g. %q", r.outage.Round(time.Millisecond), r.examples)
		}
		parts = append(parts, s)
	}
	return strings.Join(parts, "; ")
}

// sockets lists a process's sockets as ss(8) shows them, for a failure message.
func sockets(pid int) string {
	out, err := exec.Command("ss", "-tuanpe").CombinedOutput()
	if err != nil {
		return fmt.Sprintf("(ss: %v)", err)
	}
	var lines []string
	fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	for _, fd := range fds {
		target, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()))
		lines = append(lines, fd.Name()+" -> "+target)
	}
	for _, l := range strings.Split(string(out), "\n") {
		if strings.Contains(l, fmt.Sprintf("pid=%d,", pid)) {
			lines = append(lines, l)
		}
	}
	return strings.Join(lines, "\n")
}

// openFDs counts a process's open sockets (0 if it is gone). Other descriptors come and go on
// their own: Go keeps a pool of pipes for splice(2), which the shim's proxy uses, until a GC.
func openFDs(pid int) int {
	dir := filepath.Join("/proc", strconv.Itoa(pid), "fd")
	entries, _ := os.ReadDir(dir)
	n := 0
	for _, e := range entries {
		if target, err := os.Readlink(filepath.Join(dir, e.Name())); err == nil && strings.HasPrefix(target, "socket:") {
			n++
		}
	}
	return n
}
