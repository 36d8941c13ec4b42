package bench

import (
	"bufio"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// stopGrace is how long a peer gets to exit after SIGINT/SIGQUIT before SIGKILL.
const stopGrace = 5 * time.Second

// Peer is a proxy process the benchmark started, stopped when the test ends.
type Peer struct {
	Name string
	cmd  *exec.Cmd
	done chan struct{}
}

// Pid is the peer's main process.
func (p *Peer) Pid() int { return p.cmd.Process.Pid }

// Pids are the peer's main process and its children (nginx's workers).
func (p *Peer) Pids() []int { return append([]int{p.Pid()}, Children(p.Pid())...) }

// RSS sums the resident memory of Pids.
func (p *Peer) RSS() (int64, error) {
	var total int64
	for _, pid := range p.Pids() {
		v, err := RSS(pid)
		if err != nil {
			return 0, err
		}
		total += v
	}
	return total, nil
}

func startPeer(t testing.TB, name string, cmd *exec.Cmd, stopSignal syscall.Signal) *Peer {
	t.Helper()
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	p := &Peer{Name: name, cmd: cmd, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(stopSignal)
		select {
		case <-p.done:
		case <-time.After(stopGrace):
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-p.done
		}
	})
	return p
}

// StartDockerProxy runs the stock docker-proxy exactly as dockerd runs it for
// `-p hostIP:hostPort:containerPort` (the argument order of dockerd 20.10, fd 3 for its
// readiness report) and waits until it reports it is listening.
func StartDockerProxy(t testing.TB, bin string, host, container netip.AddrPort) *Peer {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	cmd := exec.Command(bin, "-proto", "tcp", "-host-ip", host.Addr().String(), "-host-port", strconv.Itoa(int(host.Port())),
		"-container-ip", container.Addr().String(), "-container-port", strconv.Itoa(int(container.Port())))
	cmd.ExtraFiles = []*os.File{w} // fd 3
	p := startPeer(t, "docker-proxy", cmd, syscall.SIGINT)
	w.Close()
	_ = r.SetReadDeadline(time.Now().Add(10 * time.Second))
	status, err := bufio.NewReader(r).ReadString('\n')
	if err != nil || status != "0\n" {
		t.Fatalf("docker-proxy did not report ready: %q, %v", status, err)
	}
	return p
}

// NginxConfig renders the nginx reverse proxy of the benchmark: listen, one upstream with
// keep-alive connections (the L7 peer an operator would pick), workers worker processes, no
// access log (like Envoy's default), streaming large responses without spooling them to disk.
func NginxConfig(dir string, listen, upstream netip.AddrPort, workers int) string {
	return fmt.Sprintf(`daemon off;
master_process on;
user root;
worker_processes %[4]d;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log warn;
events { worker_connections 16384; }
http {
    access_log off;
    client_body_temp_path %[1]s/client_body;
    proxy_temp_path %[1]s/proxy;
    fastcgi_temp_path %[1]s/fastcgi;
    uwsgi_temp_path %[1]s/uwsgi;
    scgi_temp_path %[1]s/scgi;
    keepalive_requests 1000000;
    upstream echo {
        server %[3]s;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen %[2]s reuseport;
        location / {
            proxy_pass http://echo;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_max_temp_file_size 0;
        }
    }
}
`, dir, listen, upstream, workers)
}

// StartNginx runs Debian's nginx as a reverse proxy from listen to upstream (see NginxConfig).
func StartNginx(t testing.TB, listen, upstream netip.AddrPort, workers int) *Peer {
	t.Helper()
	bin, err := exec.LookPath("nginx")
	if err != nil {
		bin = "/usr/sbin/nginx"
	}
	if _, err := os.Stat(bin); err != nil {
		t.Skipf("skipping: no nginx (%v); run `make provision` (Debian package nginx)", err)
	}
	dir := t.TempDir()
	conf := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(conf, []byte(NginxConfig(dir, listen, upstream, workers)), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-p", dir, "-c", conf, "-e", filepath.Join(dir, "error.log"))
	out, err := os.Create(filepath.Join(dir, "output.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	cmd.Stdout, cmd.Stderr = out, out
	p := startPeer(t, "nginx", cmd, syscall.SIGQUIT)
	deadline := time.Now().Add(10 * time.Second)
	for len(Children(p.Pid())) < workers {
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(filepath.Join(dir, "error.log"))
			t.Fatalf("nginx did not start %d workers: %s", workers, b)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return p
}
