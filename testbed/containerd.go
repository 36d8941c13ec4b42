package testbed

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// containerdDir is the instance subdirectory of a containerd the harness starts (Docker 29);
// dockerd 20.10 keeps the containerd it starts under its exec root instead.
const containerdDir = "containerd"

// containerdLayout is where one containerd keeps its socket and its tasks' state, which the
// cleaner needs to find the runc shims' sockets.
type containerdLayout struct {
	address string // the gRPC socket
	state   string // containerd's state directory
}

// containerdLayouts lists the containerds an instance directory may hold: the one dockerd 20.10
// starts under its exec root, and the one the harness starts for Docker 29.
func containerdLayouts(dir string) []containerdLayout {
	managed := filepath.Join(dir, daemonExecDir, "containerd")
	own := filepath.Join(dir, containerdDir)
	return []containerdLayout{
		{address: filepath.Join(managed, "containerd.sock"), state: filepath.Join(managed, "daemon")},
		{address: filepath.Join(own, "containerd.sock"), state: filepath.Join(own, "state")},
	}
}

// containerdConfig is a private containerd's configuration: its own root, state and sockets; no
// imports of the host's /etc/containerd; no CRI (Kubernetes') and no NRI, whose default socket is
// the host's /var/run/nri.
func containerdConfig(dir string) string {
	q := strconv.Quote
	return strings.Join([]string{
		"version = 3",
		"root = " + q(filepath.Join(dir, "root")),
		"state = " + q(filepath.Join(dir, "state")),
		"imports = []",
		`disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime", "io.containerd.nri.v1.nri"]`,
		"[grpc]",
		"  address = " + q(filepath.Join(dir, "containerd.sock")),
		"[ttrpc]",
		"  address = " + q(filepath.Join(dir, "containerd.sock.ttrpc")),
		`[plugins."io.containerd.internal.v1.opt"]`,
		"  path = " + q(filepath.Join(dir, "opt")),
		"",
	}, "\n")
}

// startContainerd starts the private containerd of a Docker 29 daemon and returns its socket once
// it accepts connections.
func (d *Daemon) startContainerd(bin string, env []string) (string, error) {
	dir := filepath.Join(d.inst.dir, containerdDir)
	if err := os.MkdirAll(dir, 0o711); err != nil {
		return "", err
	}
	config := filepath.Join(dir, "containerd.toml")
	if err := os.WriteFile(config, []byte(containerdConfig(dir)), 0o644); err != nil {
		return "", err
	}
	p, err := startProcess("containerd", filepath.Join(d.inst.dir, "containerd.log"), d.inst.dir, env, bin, "--config", config)
	if err != nil {
		return "", err
	}
	d.containerd = p
	if err := d.inst.recordPid(p.cmd.Process.Pid); err != nil {
		return "", err
	}
	sock := filepath.Join(dir, "containerd.sock")
	deadline := time.Now().Add(daemonStartTimeout)
	for {
		c, err := net.Dial("unix", sock)
		if err == nil {
			c.Close()
			return sock, nil
		}
		select {
		case <-p.exited:
			d.logShown = true
			return "", fmt.Errorf("containerd exited during start (%s); its log:\n%s", p.cmd.ProcessState, tailFile(p.logPath, 40))
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			d.logShown = true
			return "", fmt.Errorf("containerd did not listen on %s within %s: %v; its log:\n%s", sock, daemonStartTimeout, err, tailFile(p.logPath, 40))
		}
	}
}

// process is a long-running program the harness started, with its output in a log file.
type process struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	exited  chan struct{}
}

// startProcess runs bin in its own process group (a ^C meant for go test must not stop it before
// teardown does), its output appended to logPath.
func startProcess(name, logPath, dir string, env []string, bin string, args ...string) (*process, error) {
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	p := &process{name: name, cmd: cmd, logPath: logPath, exited: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		close(p.exited)
	}()
	return p, nil
}

// stop sends SIGTERM and waits; past timeout it kills.
func (p *process) stop(timeout time.Duration) error {
	select {
	case <-p.exited:
		return nil
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
		return nil
	case <-time.After(timeout):
		_ = p.cmd.Process.Kill()
		<-p.exited
		return fmt.Errorf("%s ignored SIGTERM for %s; killed", p.name, timeout)
	}
}

// prependPath puts dir first on the PATH of env (the last PATH entry, which is the one exec
// uses).
func prependPath(env []string, dir string) []string {
	out := append([]string(nil), env...)
	for i := len(out) - 1; i >= 0; i-- {
		if v, ok := strings.CutPrefix(out[i], "PATH="); ok {
			out[i] = "PATH=" + dir + string(filepath.ListSeparator) + v
			return out
		}
	}
	return append(out, "PATH="+dir)
}
