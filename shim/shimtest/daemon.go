package shimtest

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// DaemonTimeout is how long dockerd waits for its proxy's status before giving up.
const DaemonTimeout = 16 * time.Second

// Proxy is a userland proxy process started the way dockerd starts one.
type Proxy struct {
	Cmd     *exec.Cmd
	Started time.Time
	status  *os.File // read end of the status pipe
	waited  chan struct{}
	waitErr error
}

// StartProxy execs bin with dockerd's argv for args (without the program name), fd 3 = the write
// end of a status pipe, fd 4 = listenSock when not nil (dockerd 28+ with -use-listen-fd; the
// caller adds the flag), extra files after that, stdin/stdout/stderr = /dev/null and exactly env
// as the environment (nil means empty, as dockerd's could be).
func StartProxy(bin string, args []string, env []string, listenSock *os.File, extra ...*os.File) (*Proxy, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer w.Close()
	files := []*os.File{w}
	if listenSock != nil {
		files = append(files, listenSock)
	}
	files = append(files, extra...)
	if env == nil {
		env = []string{}
	}
	cmd := &exec.Cmd{
		Path:        bin,
		Args:        append([]string{bin}, args...),
		Env:         env,
		ExtraFiles:  files,
		SysProcAttr: &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM},
	}
	p := &Proxy{Cmd: cmd, status: r, waited: make(chan struct{})}
	p.Started = time.Now()
	if err := cmd.Start(); err != nil {
		r.Close()
		return nil, err
	}
	go func() {
		p.waitErr = cmd.Wait()
		close(p.waited)
	}()
	return p, nil
}

// Status is what dockerd made of the status pipe.
type Status struct {
	OK      bool
	Message string        // the error text dockerd would show (after "1\n")
	Raw     []byte        // every byte read
	After   time.Duration // from exec to the verdict
}

// ReadStatus reads the status exactly as dockerd does: one read of up to 2 bytes; unless that is
// "0\n", everything up to EOF is the error. A missing status within DaemonTimeout is an error.
func (p *Proxy) ReadStatus() (Status, error) {
	type result struct {
		st  Status
		err error
	}
	ch := make(chan result, 1)
	go func() {
		buf := make([]byte, 2)
		n, _ := p.status.Read(buf)
		st := Status{Raw: append([]byte(nil), buf[:n]...)}
		if n == 2 && string(buf) == "0\n" {
			st.OK = true
			st.After = time.Since(p.Started)
			ch <- result{st: st}
			return
		}
		rest, err := io.ReadAll(p.status)
		st.Raw = append(st.Raw, rest...)
		st.Message = string(rest)
		st.After = time.Since(p.Started)
		ch <- result{st: st, err: err}
	}()
	select {
	case r := <-ch:
		return r.st, r.err
	case <-time.After(DaemonTimeout):
		return Status{}, errors.New("timed out starting the userland proxy (dockerd gives up after 16s)")
	}
}

// StatusPipeClosed reports whether the proxy has closed its end of the status pipe (read after a
// successful status: EOF means closed). It waits at most timeout.
func (p *Proxy) StatusPipeClosed(timeout time.Duration) bool {
	p.status.SetReadDeadline(time.Now().Add(timeout))
	var b [1]byte
	_, err := p.status.Read(b[:])
	return errors.Is(err, io.EOF)
}

// Signal sends sig to the proxy.
func (p *Proxy) Signal(sig os.Signal) error { return p.Cmd.Process.Signal(sig) }

// Wait waits at most timeout for the proxy to exit and returns its exit code (-1 if killed by a
// signal) and how long it took.
func (p *Proxy) Wait(timeout time.Duration) (code int, took time.Duration, err error) {
	start := time.Now()
	select {
	case <-p.waited:
	case <-time.After(timeout):
		return 0, time.Since(start), fmt.Errorf("proxy %d still running after %s", p.Cmd.Process.Pid, timeout)
	}
	return p.Cmd.ProcessState.ExitCode(), time.Since(start), nil
}

// Exited reports whether the process has ended.
func (p *Proxy) Exited() bool {
	select {
	case <-p.waited:
		return true
	default:
		return false
	}
}

// Kill ends the proxy at the end of a test, whatever state it is in.
func (p *Proxy) Kill() {
	if !p.Exited() {
		p.Cmd.Process.Kill()
		<-p.waited
	}
	p.status.Close()
}

// ListenTCP creates the socket dockerd 28+ passes as fd 4 for a TCP port: SO_REUSEADDR, V6ONLY for
// IPv6, bound and listening (backlog capped at somaxconn), close-on-exec.
func ListenTCP(addr netip.AddrPort) (*os.File, error) {
	return daemonSocket(addr, unix.SOCK_STREAM)
}

// BindUDP creates the socket dockerd 28+ passes as fd 4 for a UDP port: SO_REUSEADDR, V6ONLY for
// IPv6, IP_PKTINFO or IPV6_RECVPKTINFO set, bound.
func BindUDP(addr netip.AddrPort) (*os.File, error) {
	return daemonSocket(addr, unix.SOCK_DGRAM)
}

func daemonSocket(addr netip.AddrPort, typ int) (*os.File, error) {
	ip := addr.Addr()
	domain := unix.AF_INET6
	var sa unix.Sockaddr = &unix.SockaddrInet6{Port: int(addr.Port()), Addr: ip.As16()}
	if ip.Unmap().Is4() {
		domain = unix.AF_INET
		sa = &unix.SockaddrInet4{Port: int(addr.Port()), Addr: ip.Unmap().As4()}
	}
	proto := unix.IPPROTO_TCP
	if typ == unix.SOCK_DGRAM {
		proto = unix.IPPROTO_UDP
	}
	fd, err := unix.Socket(domain, typ|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		return nil, err
	}
	fail := func(err error) (*os.File, error) { unix.Close(fd); return nil, err }
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		return fail(err)
	}
	if domain == unix.AF_INET6 {
		unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 1)
	}
	if typ == unix.SOCK_DGRAM {
		lvl, opt := unix.IPPROTO_IP, unix.IP_PKTINFO
		if domain == unix.AF_INET6 {
			lvl, opt = unix.IPPROTO_IPV6, unix.IPV6_RECVPKTINFO
		}
		if err := unix.SetsockoptInt(fd, lvl, opt, 1); err != nil {
			return fail(err)
		}
	}
	if err := unix.Bind(fd, sa); err != nil {
		return fail(fmt.Errorf("failed to bind host port %s: %w", addr, err))
	}
	if typ == unix.SOCK_STREAM {
		if err := unix.Listen(fd, -1); err != nil { // -1: silently capped to somaxconn
			return fail(err)
		}
	}
	return os.NewFile(uintptr(fd), "listener"), nil
}

// Args is dockerd's argv for a mapping (without the program name).
func Args(proto string, host, container netip.AddrPort, useListenFD bool) []string {
	a := []string{
		"-proto", proto,
		"-host-ip", host.Addr().String(),
		"-host-port", strconv.Itoa(int(host.Port())),
		"-container-ip", container.Addr().String(),
		"-container-port", strconv.Itoa(int(container.Port())),
	}
	if useListenFD {
		a = append(a, "-use-listen-fd")
	}
	return a
}
