package idle

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/internal/shimlink"

	"golang.org/x/sys/unix"
)

// helperEnv makes the test binary a stand-in shim (TestMain): it takes fd 3 as its registration
// and enters the idle program; run again by it, it writes what it resumed with to the file named
// by helperOut.
const (
	helperEnv = "EDS_IDLE_TEST_HELPER"
	helperOut = "EDS_IDLE_TEST_OUT"
	// helperListen says fd 4 is a listening socket for the idle program to hold.
	helperListen = "EDS_IDLE_TEST_LISTEN"
)

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) != "" {
		os.Exit(helper())
	}
	code := m.Run()
	if helperBin.path != "" && filepath.Base(filepath.Dir(helperBin.path)) != "" && strings.Contains(helperBin.path, "idle-helper-") {
		os.RemoveAll(filepath.Dir(helperBin.path))
	}
	os.Exit(code)
}

func helper() int {
	if held, resumed, err := Resumed(); resumed {
		msg := "resumed"
		conn := held.Registration
		if err != nil {
			msg = "error: " + err.Error()
		} else if held.Listener != nil {
			// Woken by a connection on the port's socket: serve it.
			msg = "resumed with the listener"
			fl, err := net.FileListener(held.Listener)
			if err == nil {
				var c net.Conn
				if c, err = fl.Accept(); err == nil {
					_, err = c.Write([]byte("served by the resumed shim"))
					c.Close()
				}
			}
			if err != nil {
				msg = "listener: " + err.Error()
			}
		} else {
			// The registration is the one the test's peer holds: read what woke the idle
			// program, and answer.
			buf := make([]byte, 64)
			_ = conn.SetReadDeadline(time.Now().Add(time.Second))
			n, err := conn.Read(buf)
			msg += " " + string(buf[:n])
			if err == nil {
				_, err = conn.Write([]byte("hello from the resumed shim"))
			}
			if err != nil {
				msg = "registration: " + err.Error()
			}
		}
		_ = os.WriteFile(os.Getenv(helperOut), []byte(msg+" "+strings.Join(os.Args[1:], " ")), 0o644)
		return 0
	}
	// As the shim does: stop signals end ctx from the start.
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, os.Interrupt, syscall.SIGTERM)
	stops := WatchStops()
	ctx, cancel := context.WithCancel(context.Background())
	go func() { <-signals; cancel() }()
	f := os.NewFile(3, "registration")
	fc, err := net.FileConn(f)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 3
	}
	f.Close()
	// With a listening socket on fd 4, the idle program holds it too.
	var listener syscall.Conn
	if os.Getenv(helperListen) != "" {
		lf := os.NewFile(4, "listen-sock")
		l, err := net.FileListener(lf)
		lf.Close()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 3
		}
		listener = l.(*net.TCPListener)
	}
	os.Stdout.WriteString("entering\n")
	err = Enter(ctx, fc.(*net.UnixConn), listener, os.Environ(), stops)
	if errors.Is(err, ErrStopping) {
		// The shim's own stop: end the registration, exit 0.
		_ = fc.(*net.UnixConn).CloseWrite()
		return 0
	}
	fmt.Fprintln(os.Stderr, err)
	return 4
}

func requireProgram(t *testing.T) {
	t.Helper()
	if runtime.GOARCH != "amd64" {
		t.Skipf("no idle program on %s: the shim stays in Go there", runtime.GOARCH)
	}
}

var helperBin struct {
	sync.Once
	path string
	err  error
}

// helperBinary is this test binary, built without cgo when it was built with it: Enter needs
// syscall.AllThreadsSyscall, which cgo rules out (the shim is always built without cgo).
func helperBinary(t *testing.T) string {
	t.Helper()
	helperBin.Do(func() {
		if _, _, errno := syscall.AllThreadsSyscall(syscall.SYS_GETPID, 0, 0, 0); errno == 0 {
			helperBin.path, helperBin.err = os.Executable()
			return
		}
		dir, err := os.MkdirTemp("", "idle-helper-")
		if err != nil {
			helperBin.err = err
			return
		}
		helperBin.path = filepath.Join(dir, "idle.test")
		cmd := exec.Command("go", "test", "-c", "-o", helperBin.path, ".")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			helperBin.err = fmt.Errorf("building the test binary without cgo: %v\n%s", err, out)
		}
	})
	if helperBin.err != nil {
		t.Fatal(helperBin.err)
	}
	return helperBin.path
}

func TestExecutable(t *testing.T) {
	requireProgram(t)
	exe, err := Executable(123, 124, 125, "envoy-docker-shim")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(exe, []byte{0x7f, 'E', 'L', 'F', 2, 1, 1}) {
		t.Fatalf("not a 64-bit little-endian ELF: % x", exe[:16])
	}
	// A few hundred bytes of code: the whole point.
	if len(exe) > 1024 {
		t.Errorf("idle executable is %d bytes", len(exe))
	}
	if bytes.Contains(exe, endMarker) {
		t.Error("the end marker was copied")
	}
	// Every placeholder became the descriptor: 123 (0x7b) and 124 (0x7c).
	if bytes.Contains(exe, connPlaceholder) || bytes.Contains(exe, exePlaceholder) || bytes.Contains(exe, listenPlaceholder) {
		t.Error("a descriptor placeholder is left")
	}
	if n := bytes.Count(exe, []byte{0x7d, 0, 0, 0}); n < listenUses {
		t.Errorf("the listening socket's descriptor appears %d times", n)
	}
	if n := bytes.Count(exe, []byte{0x7b, 0, 0, 0}); n < connUses {
		t.Errorf("the registration's descriptor appears %d times", n)
	}
}

// idleShim is a stand-in shim in the idle program, with the test's end of its registration.
type idleShim struct {
	cmd  *exec.Cmd
	peer *net.UnixConn
	out  string
	done chan error
}

func startIdle(t *testing.T, args ...string) *idleShim {
	t.Helper()
	return startIdleWith(t, nil, args...)
}

// startIdleWith starts a stand-in shim whose idle program also holds listener (nil: none).
func startIdleWith(t *testing.T, listener *os.File, args ...string) *idleShim {
	t.Helper()
	requireProgram(t)
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	theirs := os.NewFile(uintptr(fds[1]), "registration")
	defer theirs.Close()
	ours := os.NewFile(uintptr(fds[0]), "peer")
	pc, err := net.FileConn(ours)
	ours.Close()
	if err != nil {
		t.Fatal(err)
	}
	s := &idleShim{peer: pc.(*net.UnixConn), out: filepath.Join(t.TempDir(), "out"), done: make(chan error, 1)}
	t.Cleanup(func() { s.peer.Close() })
	s.cmd = exec.Command(helperBinary(t), args...)
	s.cmd.Env = append(os.Environ(), helperEnv+"=1", helperOut+"="+s.out)
	s.cmd.ExtraFiles = []*os.File{theirs}
	if listener != nil {
		s.cmd.ExtraFiles = append(s.cmd.ExtraFiles, listener)
		s.cmd.Env = append(s.cmd.Env, helperListen+"=1")
	}
	var stderr bytes.Buffer
	s.cmd.Stderr = &stderr
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { s.done <- s.cmd.Wait() }()
	t.Cleanup(func() { _ = s.cmd.Process.Kill() })
	// Idle once its executable is the memfd, with the stop signals blocked, waiting.
	deadline := time.Now().Add(10 * time.Second)
	for {
		exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", s.cmd.Process.Pid))
		// Waiting in ppoll(2), 271 on x86-64: the idle program's loop, past its set-up.
		sc, _ := os.ReadFile(fmt.Sprintf("/proc/%d/syscall", s.cmd.Process.Pid))
		if strings.Contains(exe, "memfd:envoy-docker-shim-idle") && strings.HasPrefix(string(sc), "271 ") &&
			blocked(s.cmd.Process.Pid)&(1<<(unix.SIGINT-1)) != 0 {
			break
		}
		select {
		case err := <-s.done:
			t.Fatalf("the stand-in shim exited before going idle: %v; stderr: %s", err, stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("the stand-in shim did not go idle: exe %q", exe)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return s
}

// blocked is the process's blocked signal set (SigBlk).
func blocked(pid int) uint64 { return blockedIn(fmt.Sprintf("/proc/%d", pid)) }

func blockedIn(dir string) uint64 {
	b, _ := os.ReadFile(dir + "/status")
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "SigBlk:"); ok {
			n, _ := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			return n
		}
	}
	return 0
}

func (s *idleShim) wait(t *testing.T, within time.Duration) error {
	t.Helper()
	select {
	case err := <-s.done:
		return err
	case <-time.After(within):
		t.Fatalf("the idle shim did not exit within %v; its signals and threads:\n%s", within, signalState(s.cmd.Process.Pid))
		return nil
	}
}

// readStopped waits for the idle shim to say why it stops (the log line the shim in Go would
// send, naming signal) and then to end its side of the registration.
func (s *idleShim) readStopped(t *testing.T, signal string) {
	t.Helper()
	_ = s.peer.SetReadDeadline(time.Now().Add(2 * time.Second))
	buf := make([]byte, shimlink.MaxMessage)
	n, err := s.peer.Read(buf)
	if err != nil {
		t.Fatalf("registration: %v; want the shim's log line saying it stops", err)
	}
	msg, err := shimlink.Decode(buf[:n])
	if l, ok := msg.(*shimlink.Log); err != nil || !ok || l.Level != "INFO" || l.Message != "msg=stopping signal="+signal {
		t.Fatalf("registration: read %q (%v); want the log line \"msg=stopping signal=%s\"", buf[:n], err, signal)
	}
	n, err = s.peer.Read(buf)
	if n != 0 || (err != nil && !errors.Is(err, os.ErrDeadlineExceeded) && err.Error() != "EOF") {
		t.Fatalf("registration: read %q, %v; want the shim's end of stream", buf[:n], err)
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatal("the idle shim did not end its side of the registration")
	}
}

func TestIdleStopsOnSignal(t *testing.T) {
	for _, tt := range []struct {
		name string
		sig  syscall.Signal
	}{{"SIGINT from dockerd's stop", syscall.SIGINT}, {"SIGTERM from Pdeathsig", syscall.SIGTERM}} {
		t.Run(tt.name, func(t *testing.T) {
			s := startIdle(t, "-host-port", "1234")
			cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", s.cmd.Process.Pid))
			comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", s.cmd.Process.Pid))
			if want := filepath.Base(helperBin.path); string(comm) != want[:min(len(want), 15)]+"\n" {
				t.Errorf("the idle shim is named %q, want the shim's name %q", comm, want)
			}
			if !strings.Contains(string(cmdline), "\x00-host-port\x001234") {
				t.Errorf("the idle shim's command line is %q, want the shim's", cmdline)
			}
			sent := time.Now()
			if err := s.cmd.Process.Signal(tt.sig); err != nil {
				t.Fatal(err)
			}
			s.readStopped(t, tt.sig.String())
			// The server closes once Envoy let go of the port; the shim then exits 0 at once.
			time.Sleep(50 * time.Millisecond)
			s.peer.Close()
			if err := s.wait(t, time.Second); err != nil {
				t.Errorf("exit: %v, want 0", err)
			}
			if took := time.Since(sent); took > 900*time.Millisecond {
				t.Errorf("stopped %v after the signal", took)
			}
		})
	}
}

func TestIdleStopsWithoutServer(t *testing.T) {
	// A server that never confirms: the shim gives up waiting after 400 ms and still exits 0.
	s := startIdle(t)
	sent := time.Now()
	_ = s.cmd.Process.Signal(syscall.SIGINT)
	s.readStopped(t, "interrupt")
	if err := s.wait(t, time.Second); err != nil {
		t.Errorf("exit: %v, want 0", err)
	}
	if took := time.Since(sent); took < 350*time.Millisecond || took > 900*time.Millisecond {
		t.Errorf("exited %v after the signal, want about 400 ms", took)
	}
}

// A stop signal sent while the shim enters the idle program is not lost: the Go runtime passes on
// one it took before (Stops.flush), and one that comes later waits for the idle program
// (holdStops). Also on a CPU so busy that the shim runs only now and then (at nice 19, beside a
// busy loop per CPU at nice 0), where the earlier design, which gave a signal 25 ms to reach the
// shim, lost it in each run of 30 stops, and left the shim in the idle program with dockerd
// waiting for it to exit.
func TestIdleSignalBeforeIdle(t *testing.T) {
	requireProgram(t)
	t.Run("idle CPU", func(t *testing.T) {
		for range 30 {
			s := startIdleRacing(t, false)
			if err := s.wait(t, 2*time.Second); err != nil {
				t.Fatalf("exit: %v, want 0", err)
			}
		}
	})
	t.Run("starved CPU", func(t *testing.T) {
		nice, err := exec.LookPath("nice") // coreutils: essential on Debian, so never skipped
		if err != nil {
			t.Fatal(err)
		}
		stop := make(chan struct{})
		var busy sync.WaitGroup
		for range runtime.NumCPU() {
			busy.Add(1)
			go func() {
				defer busy.Done()
				for n := 0; ; n++ {
					if n%1_000_000 == 0 {
						select {
						case <-stop:
							return
						default:
						}
					}
				}
			}()
		}
		defer func() { close(stop); busy.Wait() }()
		for range 30 {
			s := startIdleRacing(t, true, nice)
			// A lost signal never ends the shim; a starved shim that kept it ends within this.
			if err := s.wait(t, 10*time.Second); err != nil {
				t.Fatalf("exit: %v, want 0", err)
			}
		}
	})
}

// startIdleRacing starts a stand-in shim (at nice 19 through nice[0] when starved) and signals it
// the moment it starts entering the idle program.
func startIdleRacing(t *testing.T, starved bool, nice ...string) *idleShim {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	theirs := os.NewFile(uintptr(fds[1]), "registration")
	defer theirs.Close()
	// A server that closes as soon as the shim ended its side, as the real one does once Envoy let
	// go of the port: the shim stops without waiting long. (No server at all would leave the
	// registration hung up, which Enter refuses: ErrBusy.)
	go func() {
		buf := make([]byte, 64)
		for {
			if n, err := unix.Read(fds[0], buf); n <= 0 || err != nil {
				unix.Close(fds[0])
				return
			}
		}
	}()
	s := &idleShim{done: make(chan error, 1)}
	s.cmd = exec.Command(helperBinary(t))
	if starved {
		s.cmd = exec.Command(nice[0], "-n", "19", helperBinary(t))
	}
	s.cmd.Env = append(os.Environ(), helperEnv+"=1", helperOut+"="+filepath.Join(t.TempDir(), "out"))
	s.cmd.ExtraFiles = []*os.File{theirs}
	stdout, err := s.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil || line != "entering\n" {
		t.Fatalf("stand-in shim: %q, %v", line, err)
	}
	_ = s.cmd.Process.Signal(syscall.SIGINT)
	go func() { s.done <- s.cmd.Wait() }()
	return s
}

func TestIdleResumesWhenTheServerGoes(t *testing.T) {
	s := startIdle(t, "-host-port", "4321")
	// The server restarts: its end of the registration closes... here it sends something first,
	// which must wake the idle shim too. The shim, run again, finds its registration.
	if _, err := s.peer.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if err := s.wait(t, 5*time.Second); err != nil {
		t.Fatalf("resumed shim: %v", err)
	}
	got, _ := os.ReadFile(s.out)
	if want := "resumed x -host-port 4321"; string(got) != want {
		t.Errorf("resumed shim wrote %q, want %q", got, want)
	}
	_ = s.peer.SetReadDeadline(time.Now().Add(time.Second))
	buf := make([]byte, 64)
	n, err := s.peer.Read(buf)
	if err != nil || string(buf[:n]) != "hello from the resumed shim" {
		t.Errorf("registration after resuming: %q, %v", buf[:n], err)
	}
}

// Issue 14: the idle program holds the port's socket too, which no connection reaches while
// Envoy listens; one that does (Envoy went away) wakes it, and the shim, run again with the
// socket, serves it. While nothing comes, the idle program stays idle.
func TestIdleResumesForAConnection(t *testing.T) {
	requireProgram(t)
	l, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	lf, err := l.File()
	l.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer lf.Close()
	addr := l.Addr().String()
	s := startIdleWith(t, lf, "-host-port", "5678")
	lf.Close() // the idle shim holds the only copy
	select {
	case err := <-s.done:
		t.Fatalf("the idle shim exited with nothing to wake it: %v", err)
	case <-time.After(100 * time.Millisecond):
	}
	c, err := net.DialTimeout("tcp4", addr, time.Second)
	if err != nil {
		t.Fatalf("connecting to the socket the idle shim holds: %v", err)
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "served by the resumed shim" {
		t.Fatalf("the connection got %q, %v; want the resumed shim's answer", got, err)
	}
	if err := s.wait(t, 5*time.Second); err != nil {
		t.Fatalf("resumed shim: %v", err)
	}
	out, _ := os.ReadFile(s.out)
	if want := "resumed with the listener -host-port 5678"; string(out) != want {
		t.Errorf("resumed shim wrote %q, want %q", out, want)
	}
}

// Enter refuses to idle while something already waits: the idle program would wake at once.
func TestEnterRefusesWhenBusy(t *testing.T) {
	requireProgram(t)
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fds[1])
	f := os.NewFile(uintptr(fds[0]), "registration")
	fc, err := net.FileConn(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer fc.Close()
	l, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	c, err := net.Dial("tcp4", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := Enter(context.Background(), fc.(*net.UnixConn), l, nil, Stops{}); !errors.Is(err, ErrBusy) {
		t.Fatalf("Enter with a connection waiting: %v, want ErrBusy", err)
	}
	if _, err := unix.Write(fds[1], []byte("x")); err != nil {
		t.Fatal(err)
	}
	if err := Enter(context.Background(), fc.(*net.UnixConn), nil, nil, Stops{}); !errors.Is(err, ErrBusy) {
		t.Fatalf("Enter with a message waiting on the registration: %v, want ErrBusy", err)
	}
}

func TestIdleMemory(t *testing.T) {
	s := startIdle(t)
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", s.cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	kib := func(field string) int {
		for line := range strings.SplitSeq(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, field+":"); ok {
				n, _ := strconv.Atoi(strings.Fields(v)[0])
				return n
			}
		}
		t.Fatalf("no %s in smaps_rollup", field)
		return 0
	}
	// A Go process that only waits holds about 700 KiB of its own; the idle program, its stack
	// and a page of code.
	if pss := kib("Pss"); pss > 64 {
		t.Errorf("idle shim PSS %d KiB, want at most 64:\n%s", pss, b)
	}
	t.Logf("idle shim: Rss %d KiB, Pss %d KiB, private %d KiB", kib("Rss"), kib("Pss"), kib("Private_Clean")+kib("Private_Dirty"))
}

// signalState is what /proc says of pid's pending and blocked signals and of what each of its
// threads waits in: where a stop signal went when a shim did not stop.
func signalState(pid int) string {
	var lines []string
	tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	for _, task := range tasks {
		status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/status", pid, task.Name()))
		for _, l := range strings.Split(string(status), "\n") {
			if strings.HasPrefix(l, "Name:") || strings.HasPrefix(l, "SigPnd:") || strings.HasPrefix(l, "ShdPnd:") || strings.HasPrefix(l, "SigBlk:") {
				lines = append(lines, task.Name()+" "+l)
			}
		}
		sc, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/syscall", pid, task.Name()))
		lines = append(lines, task.Name()+" syscall: "+strings.TrimSpace(string(sc)))
	}
	return strings.Join(lines, "\n")
}
