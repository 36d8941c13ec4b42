package testbed

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
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

// The leftover tests re-run this test binary as a child that builds a full instance (dockerd,
// containerd, a shim, a container, a userland proxy, Envoy) and then dies in one of two ways.
const (
	childModeEnv = "EDS_TESTBED_LEFTOVER_CHILD" // "fail", "hang" or "badstart"
	childInfoEnv = "EDS_TESTBED_LEFTOVER_INFO"  // where the child writes its instanceProbe
	childGenEnv  = "EDS_TESTBED_LEFTOVER_GEN"   // the child's daemon generation
)

// instanceProbe records what a daemon + Envoy + container instance consists of, so that its
// remains can be looked for after the process that made it is gone.
type instanceProbe struct {
	DaemonDir    string
	EnvoyDir     string
	Bridge       string
	BridgeIndex  int
	UserBridge   string // of a user-defined network
	CgroupParent string
	DockerdPid   int
	// ContainerdPid is the containerd the harness starts for Docker 29 (dockerd 20.10's own is
	// found among the instance's processes).
	ContainerdPid int
	EnvoyPid      int
	ContainerPid  int
	ProxyPids     []int
	ShimSocket    string
	EnvoyShm      string
}

// startEverything starts one of each thing the harness can leave behind and checks it all exists.
func startEverything(t *testing.T, gen Generation) instanceProbe {
	d := StartDaemon(t, DaemonOptions{Generation: gen})
	c := d.Run(t, RunOptions{Publish: []string{fmt.Sprintf("127.0.0.1:%d:7", FreePort(t))}})
	e := StartEnvoy(t, EnvoyOptions{Bootstrap: TCPProxyBootstrap("echo", netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(FreePort(t))), netip.AddrPortFrom(c.IP, 7))})
	netID := d.MustDocker(t, "network", "create", "eds-user-net")
	onNet := d.Run(t, RunOptions{Flags: []string{"--network", "eds-user-net"}})
	if !d.AddressPool.Contains(onNet.IP) {
		t.Fatalf("container on a user network got %v, outside the daemon's pool %s", onNet.IP, d.AddressPool)
	}
	pid, err := strconv.Atoi(d.MustDocker(t, "inspect", "-f", "{{.State.Pid}}", c.ID))
	if err != nil {
		t.Fatalf("container pid: %v", err)
	}
	p := instanceProbe{
		DaemonDir:    d.Root,
		EnvoyDir:     e.inst.dir,
		Bridge:       d.Bridge,
		BridgeIndex:  bridgeIndex(d.Bridge),
		UserBridge:   "br-" + netID[:12],
		CgroupParent: d.inst.state.CgroupParent,
		DockerdPid:   d.cmd.Process.Pid,
		EnvoyPid:     e.Pid(),
		ContainerPid: pid,
		EnvoyShm:     envoyShmPath(e.BaseID),
	}
	address := filepath.Join(d.Root, daemonExecDir, "containerd", "containerd.sock")
	if d.containerd != nil {
		address = filepath.Join(d.Root, containerdDir, "containerd.sock")
		p.ContainerdPid = d.containerd.cmd.Process.Pid
	}
	p.ShimSocket = shimSocketPath(address, d.inst.state.Namespace, c.ID)
	for _, pr := range instanceProcs(d.Root, "") {
		if strings.Contains(pr.comm, "docker-proxy") {
			p.ProxyPids = append(p.ProxyPids, pr.pid)
		}
	}
	if missing := p.check(true); len(missing) > 0 {
		t.Fatalf("instance incomplete, the leftover checks would prove nothing: %s", strings.Join(missing, "; "))
	}
	return p
}

func bridgeIndex(name string) int {
	n, _ := strconv.Atoi(strings.TrimSpace(string(readFile("/sys/class/net/" + name + "/ifindex"))))
	return n
}

func alive(pid int) bool {
	_, state, ok := procStat("/proc/" + strconv.Itoa(pid))
	return ok && state != 'Z' && state != 'X'
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}

// check lists the parts of the instance that are missing (present=true) or, with present=false,
// the parts that are still there. Fields left zero are not checked.
func (p instanceProbe) check(present bool) []string {
	var out []string
	note := func(is bool, what string, args ...any) {
		if is != present {
			out = append(out, fmt.Sprintf(what, args...))
		}
	}
	if !present {
		// Only the absence of everything counts; their presence is checked item by item below.
		all, _ := mounts()
		for _, dir := range []string{p.DaemonDir, p.EnvoyDir} {
			if dir == "" {
				continue
			}
			for _, pr := range instanceProcs(dir, p.CgroupParent) {
				out = append(out, "process "+pr.String())
			}
			for _, m := range mountsUnder(all, dir) {
				out = append(out, "mount "+m)
			}
		}
	}
	for _, pid := range append([]int{p.DockerdPid, p.ContainerdPid, p.EnvoyPid, p.ContainerPid}, p.ProxyPids...) {
		if pid > 0 {
			note(alive(pid), "process %d (%s)", pid, strings.TrimSpace(string(readFile(fmt.Sprintf("/proc/%d/comm", pid)))))
		}
	}
	for _, f := range []struct{ what, path string }{
		{"daemon dir", p.DaemonDir},
		{"envoy dir", p.EnvoyDir},
		{"user network bridge", p.UserBridge},
		{"shim socket", p.ShimSocket},
		{"envoy shared memory", p.EnvoyShm},
	} {
		if f.path != "" {
			if f.what == "user network bridge" {
				note(exists("/sys/class/net/"+f.path), "%s %s", f.what, f.path)
			} else {
				note(exists(f.path), "%s %s", f.what, f.path)
			}
		}
	}
	switch {
	case p.Bridge == "":
	case p.BridgeIndex != 0: // the same bridge, not a later instance's of the same name
		note(bridgeIndex(p.Bridge) == p.BridgeIndex, "bridge %s (index %d)", p.Bridge, p.BridgeIndex)
	default:
		note(exists("/sys/class/net/"+p.Bridge), "bridge %s", p.Bridge)
	}
	if p.CgroupParent != "" {
		note(len(cgroupDirs(p.CgroupParent)) > 0, "cgroups %s", p.CgroupParent)
	}
	return out
}

// TestLeftoversChild is the child side of TestNoLeftovers; it does nothing in a normal run.
func TestLeftoversChild(t *testing.T) {
	mode := os.Getenv(childModeEnv)
	if mode == "" {
		t.Skip("helper: runs only as the child process of TestNoLeftovers")
	}
	gen := Generation(os.Getenv(childGenEnv))
	if mode == "badstart" {
		StartDaemon(t, DaemonOptions{Generation: gen, ExtraArgs: []string{"--no-such-flag"}})
		t.Fatal("dockerd accepted --no-such-flag")
	}
	p := startEverything(t, gen)
	b, err := json.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	info := os.Getenv(childInfoEnv)
	if err := os.WriteFile(info+".tmp", b, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(info+".tmp", info); err != nil {
		t.Fatal(err)
	}
	switch mode {
	case "fail":
		t.Fatal("failing midway on purpose")
	case "hang":
		time.Sleep(2 * time.Minute)
		t.Fatal("the parent test was meant to SIGKILL this process")
	default:
		t.Fatalf("unknown %s=%q", childModeEnv, mode)
	}
}

// startChild runs TestLeftoversChild in a new process of this test binary.
func startChild(t *testing.T, gen Generation, mode string) (cmd *exec.Cmd, info string, output *bytes.Buffer) {
	info = filepath.Join(t.TempDir(), "probe.json")
	cmd = exec.Command(os.Args[0], "-test.run=^TestLeftoversChild$", "-test.count=1", "-test.v", "-test.timeout=3m")
	cmd.Env = append(os.Environ(), childModeEnv+"="+mode, childInfoEnv+"="+info, childGenEnv+"="+string(gen))
	output = &bytes.Buffer{}
	cmd.Stdout, cmd.Stderr = output, output
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting child test process: %v", err)
	}
	return cmd, info, output
}

func readProbe(t *testing.T, info string, output *bytes.Buffer) instanceProbe {
	t.Helper()
	var p instanceProbe
	b, err := os.ReadFile(info)
	if err != nil {
		t.Fatalf("child wrote no instance probe (%v); its output:\n%s", err, output)
	}
	if err := json.Unmarshal(b, &p); err != nil {
		t.Fatalf("child's instance probe: %v", err)
	}
	return p
}

func assertNothingLeft(t *testing.T, p instanceProbe, after string) {
	t.Helper()
	if left := p.check(false); len(left) > 0 {
		t.Errorf("left behind %s:\n  %s", after, strings.Join(left, "\n  "))
	}
}

// TestNoLeftovers checks, for each daemon generation, that an instance vanishes completely: after
// a passing test, after a failing one, after a StartDaemon that failed halfway, and, through the
// next StartDaemon's stale cleaning, after its test process was SIGKILLed.
func TestNoLeftovers(t *testing.T) {
	RequireDocker(t)
	EnvoyBinary(t)
	for _, gen := range Generations(t) {
		t.Run(string(gen), func(t *testing.T) { testNoLeftovers(t, gen) })
	}
}

func testNoLeftovers(t *testing.T, gen Generation) {
	t.Run("after a passing test", func(t *testing.T) {
		t.Parallel()
		var p instanceProbe
		t.Run("instance", func(t *testing.T) { p = startEverything(t, gen) })
		if p.DaemonDir == "" {
			t.Fatal("the instance did not start")
		}
		assertNothingLeft(t, p, "by a passing test")
	})

	t.Run("after a failing test", func(t *testing.T) {
		t.Parallel()
		cmd, info, output := startChild(t, gen, "fail")
		err := cmd.Wait()
		var exit *exec.ExitError
		if !errors.As(err, &exit) || !strings.Contains(output.String(), "failing midway on purpose") {
			t.Fatalf("child should have failed on purpose, got %v; its output:\n%s", err, output)
		}
		assertNothingLeft(t, readProbe(t, info, output), "by a failing test")
	})

	t.Run("after a failed start", func(t *testing.T) {
		t.Parallel()
		cmd, _, output := startChild(t, gen, "badstart")
		err := cmd.Wait()
		m := regexp.MustCompile(`dockerd instance (\S+) on bridge (\S+) `).FindStringSubmatch(output.String())
		if err == nil || m == nil || !strings.Contains(output.String(), "dockerd exited during start") {
			t.Fatalf("child should have failed in StartDaemon, got %v; its output:\n%s", err, output)
		}
		p := instanceProbe{DaemonDir: m[1], Bridge: m[2], CgroupParent: cgroupPrefix + filepath.Base(m[1])}
		assertNothingLeft(t, p, "by a failed StartDaemon")
	})

	t.Run("after a killed test", func(t *testing.T) {
		t.Parallel()
		cmd, info, output := startChild(t, gen, "hang")
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		WaitFor(t, 2*time.Minute, "the child to start its instance", func() error {
			select {
			case err := <-exited:
				t.Fatalf("child exited early (%v); its output:\n%s", err, output)
			default:
			}
			_, err := os.Stat(info)
			return err
		})
		// Under the global lock, so that no other test process's StartDaemon cleans up the dead
		// child before its remains have been seen.
		var p instanceProbe
		err := withGlobalLock(func(string) error {
			if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
				return fmt.Errorf("killing child: %w", err)
			}
			<-exited
			p = readProbe(t, info, output)
			if left := p.check(false); len(left) == 0 {
				return errors.New("SIGKILLing the test process left nothing behind, so stale cleaning goes untested")
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}

		d := StartDaemon(t, DaemonOptions{Generation: gen})
		if d.Root == p.DaemonDir {
			t.Fatalf("new daemon reuses the dead one's directory %s", d.Root)
		}
		assertNothingLeft(t, p, "by a killed test after the next StartDaemon")
	})
}
