// Package idle shrinks a TCP shim whose port Envoy serves to almost nothing. While Envoy serves
// the port, such a shim only holds its registration and the port's listening socket (which no
// connection reaches while Envoy listens: package handover) until dockerd stops it; doing that in
// Go costs about 700 KiB of private memory per port (the runtime's heap, stacks and threads), as
// much as a whole docker-proxy. Enter replaces the process (same PID, same command line, so
// dockerd and `ps` see no change) with a program of a few hundred bytes of machine code that
// holds both with no runtime at all:
//
//   - SIGINT or SIGTERM: it ends the registration as the shim would (its side of the
//     connection; the server withdraws the port and closes once Envoy let go, waited for up to
//     400 ms) and exits 0;
//   - if it dies, the kernel closes the registration and the server withdraws the port, as for
//     any shim;
//   - anything else on the registration (the server went away, or sent something), or a
//     connection waiting on the listening socket (Envoy went away: restarted, upgraded, killed),
//     makes it exec the shim again, which then resumes (see Resumed): it re-registers, or serves
//     the port until Envoy is back, in Go.
//
// The program is the function image in image_$GOARCH.s, copied out of the shim's own text into a
// memfd with an ELF header; it uses no data but its stack, so the copy runs at any address. Where
// there is no such function (other architectures) or the kernel refuses to run it (memfd exec
// turned off), Enter fails and the shim simply stays as it is.
//
// This package never enters on its own: the caller decides that the shim has nothing left to
// do but hold the registration (no socket to serve, no connection to proxy).
//
// The fast start (start_amd64.s, the shim's entry point when linked with LinkFlag) is the other
// way into the program: for dockerd's usual TCP invocation it registers before any Go runs,
// reports ready and jumps to the program in its own process, so that no Go runtime starts for a
// port at all (dockerd waits for each port of a range in turn). See shim/README.md.
package idle

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"strings"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ResumeEnv marks the environment of a shim that the idle program ran again: "CONN,EXE,LISTEN",
// its descriptors (LISTEN -1 when it held no listening socket).
const ResumeEnv = "EDS_SHIM_RESUMED"

// RetryWindowEnv carries the server's connect retry window (shimlink.Ready) to the shim the idle
// program runs again, as a duration ("1500ms").
const RetryWindowEnv = "EDS_SHIM_RESUMED_RETRY_WINDOW"

// StartedEnv carries the time the shim started, in nanoseconds since the epoch, to the Go shim
// when something ran before it (an exec, the fast start): its deadline counts from then.
const StartedEnv = "EDS_SHIM_STARTED_UNIX_NANO"

// StoppedBeforeReady is what dockerd reads on fd 3 from a shim stopped before its port was ready.
const StoppedBeforeReady = "envoy-docker-shim was stopped before the port was ready"

// The placeholders of the idle program's descriptors, patched into its code, each so many times.
var (
	connPlaceholder   = []byte{0x3c, 0x3c, 0x3c, 0x3c} // the registration
	exePlaceholder    = []byte{0x4d, 0x4d, 0x4d, 0x4d} // the shim's executable, to run it again
	listenPlaceholder = []byte{0x5b, 0x5b, 0x5b, 0x5b} // the port's listening socket
)

const connUses, exeUses, listenUses = 1, 1, 1

// The placeholders of the process name (comm), in two halves of 8 bytes.
var (
	namePlaceholder1 = bytes.Repeat([]byte{0x6e}, 8)
	namePlaceholder2 = bytes.Repeat([]byte{0x6f}, 8)
)

// endMarker ends the program in image_$GOARCH.s.
var endMarker = []byte("EDS-IDLE-END---!")

// maxProgram bounds the search for endMarker (imageText's length).
const maxProgram = 4096

// ErrStopping says Enter saw the shim's context end (a stop signal) and left the process as it was.
var ErrStopping = errors.New("the shim is stopping")

// ErrUnsupported says there is no idle program for this architecture.
var ErrUnsupported = errors.New("no idle program for this architecture")

// Supported reports whether there is an idle program for this architecture.
func Supported() bool { return elfMachine != 0 }

// program returns the machine code of the idle program.
func program() ([]byte, error) {
	if elfMachine == 0 {
		return nil, ErrUnsupported
	}
	// Read no further than the marker: what follows may be the end of the text segment.
	text := imageText()[:maxProgram]
	for end := range len(text) - len(endMarker) {
		if bytes.Equal(text[end:end+len(endMarker)], endMarker) {
			return bytes.Clone(text[:end]), nil
		}
	}
	return nil, errors.New("idle program: no end marker in the shim's text")
}

// elfBase is where the program is loaded.
const elfBase = 0x400000

// Executable is the idle program for the registration on descriptor conn, the shim's executable
// on exe and the port's listening socket on listen (-1: none), named name (the process's comm, up
// to 15 bytes), as a static ELF executable: a header, two program headers (the code, read and
// execute; a non-executable stack) and the code.
func Executable(conn, exe, listen int, name string) ([]byte, error) {
	code, err := program()
	if err != nil {
		return nil, err
	}
	for _, p := range []struct {
		placeholder []byte
		uses, fd    int
	}{{connPlaceholder, connUses, conn}, {exePlaceholder, exeUses, exe}, {listenPlaceholder, listenUses, listen}} {
		if n := bytes.Count(code, p.placeholder); n != p.uses {
			return nil, fmt.Errorf("idle program: %d places for a descriptor, want %d", n, p.uses)
		}
		code = bytes.ReplaceAll(code, p.placeholder, binary.LittleEndian.AppendUint32(nil, uint32(p.fd)))
	}
	comm := make([]byte, 16)
	copy(comm[:15], name)
	for _, p := range []struct{ placeholder, value []byte }{{namePlaceholder1, comm[:8]}, {namePlaceholder2, comm[8:]}} {
		if n := bytes.Count(code, p.placeholder); n != 1 {
			return nil, fmt.Errorf("idle program: %d places for its name, want 1", n)
		}
		code = bytes.Replace(code, p.placeholder, p.value, 1)
	}
	const ehSize, phSize, phNum = 64, 56, 2
	entry := uint64(ehSize + phSize*phNum)
	var b bytes.Buffer
	le := binary.LittleEndian
	b.Write([]byte{0x7f, 'E', 'L', 'F', 2 /* 64-bit */, 1 /* little-endian */, 1 /* version */, 0 /* System V */})
	b.Write(make([]byte, 8))
	_ = binary.Write(&b, le, struct {
		Type, Machine              uint16
		Version                    uint32
		Entry, Phoff, Shoff        uint64
		Flags                      uint32
		Ehsize, Phentsize, Phnum   uint16
		Shentsize, Shnum, Shstrndx uint16
	}{2 /* ET_EXEC */, elfMachine, 1, elfBase + entry, ehSize, 0, 0, ehSize, phSize, phNum, 0, 0, 0})
	type phdr struct {
		Type, Flags                         uint32
		Offset, Vaddr, Paddr, Filesz, Memsz uint64
		Align                               uint64
	}
	size := entry + uint64(len(code))
	_ = binary.Write(&b, le, phdr{1 /* PT_LOAD */, 5 /* R+X */, 0, elfBase, elfBase, size, size, 0x1000})
	_ = binary.Write(&b, le, phdr{0x6474e551 /* PT_GNU_STACK */, 6 /* R+W */, 0, 0, 0, 0, 0, 16})
	b.Write(code)
	return b.Bytes(), nil
}

// Enter replaces the process with the idle program, which holds conn (the registration) and
// listener (the port's listening socket; nil: none) until a stop signal or until something
// happens on either. env is the environment of the shim when the idle program runs it again;
// ResumeEnv is added to it. Enter returns only when it could not replace the process, which is
// then unchanged and conn and listener still open: ErrBusy when something already waits on
// either (the caller is to deal with it in Go first).
//
// The caller must have nothing else to do: every goroutine, every file but conn and listener, is
// gone with the Go runtime. ctx is the shim's, ended by its stop signals: for a SIGINT or SIGTERM
// that reached Go before Enter took them over (stops sees it), Enter returns ErrStopping for the
// caller to stop as usual; one that comes later stays pending for the idle program, which
// handles it.
func Enter(ctx context.Context, conn *net.UnixConn, listener syscall.Conn, env []string, stops Stops) error {
	c, err := descriptor(conn)
	if err != nil {
		return err
	}
	l := -1
	if listener != nil {
		if l, err = descriptor(listener); err != nil {
			return err
		}
	}
	if pending(c, l) {
		return ErrBusy
	}
	// The descriptors the idle program keeps: copies without close-on-exec, above anything the
	// shim inherited (which it leaves alone).
	var kept []int
	closeKept := func() {
		for _, fd := range kept {
			unix.Close(fd)
		}
	}
	keep := func(fd int) (int, error) {
		k, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD, minFD)
		if err != nil {
			return -1, fmt.Errorf("idle program: %w", err)
		}
		kept = append(kept, k)
		return k, nil
	}
	keptConn, err := keep(c)
	if err != nil {
		return err
	}
	keptListen := -1
	if l >= 0 {
		if keptListen, err = keep(l); err != nil {
			closeKept()
			return err
		}
	}
	self, err := unix.Open("/proc/self/exe", unix.O_PATH|unix.O_CLOEXEC, 0)
	if err != nil {
		closeKept()
		return fmt.Errorf("idle program: the shim's executable: %w", err)
	}
	keptSelf, err := keep(self)
	unix.Close(self)
	if err != nil {
		closeKept()
		return err
	}
	comm, _ := os.ReadFile("/proc/self/comm")
	exe, err := Executable(keptConn, keptSelf, keptListen, strings.TrimSuffix(string(comm), "\n"))
	if err != nil {
		closeKept()
		return err
	}
	mfd, err := unix.MemfdCreate("envoy-docker-shim-idle", unix.MFD_CLOEXEC)
	if err != nil {
		closeKept()
		return fmt.Errorf("idle program: memfd: %w", err)
	}
	defer unix.Close(mfd)
	if n, err := unix.Write(mfd, exe); err != nil || n != len(exe) {
		closeKept()
		return fmt.Errorf("idle program: writing it: %d bytes, %v", n, err)
	}
	argvp, err := syscall.SlicePtrFromStrings(os.Args)
	if err != nil {
		closeKept()
		return err
	}
	resume := fmt.Sprintf("%s=%d,%d,%d", ResumeEnv, keptConn, keptSelf, keptListen)
	envp, err := syscall.SlicePtrFromStrings(append(withoutResume(env), resume))
	if err != nil {
		closeKept()
		return err
	}
	empty := [1]byte{}

	// From here on no stop signal may reach Go, which would lose it with the runtime: it must
	// stay pending for the idle program. Blocking it in this thread is not enough: a process's
	// signal goes to any thread that does not block it, and the runtime unblocks them in each of
	// its threads (AllThreadsSyscall cannot help: a signal handler runs it in the other threads,
	// and the kernel restores their mask when it returns). So the stop signals get a handler of
	// this package's own (holdStops), which blocks the signal in the thread that took it and
	// sends it to the process again, until no thread is left to take it. One P, so that the
	// runtime seldom starts a thread meanwhile.
	runtime.GOMAXPROCS(1)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	release, err := holdStops()
	if err != nil {
		closeKept()
		return err
	}
	// A stop signal Go's handler took before is on its way to os/signal: wait until it has
	// passed it on (Stops.flush). (Nothing here may enable or disable a signal through the
	// runtime: its signal thread would unblock them again.)
	if err := stops.flush(); err != nil {
		release()
		closeKept()
		return err
	}
	if ctx.Err() != nil {
		release()
		closeKept()
		return ErrStopping
	}
	if err := holdAllThreads(); err != nil {
		release()
		closeKept()
		return err
	}
	_, _, errno := syscall.RawSyscall6(unix.SYS_EXECVEAT, uintptr(mfd), uintptr(unsafe.Pointer(&empty[0])),
		uintptr(unsafe.Pointer(&argvp[0])), uintptr(unsafe.Pointer(&envp[0])), unix.AT_EMPTY_PATH, 0)
	// Still here: the process is unchanged. Undo, and let the caller go on holding in Go.
	release()
	closeKept()
	return fmt.Errorf("idle program: exec: %w", errno)
}

// ErrBusy says something waits on the registration or the listening socket: the idle program
// would wake at once.
var ErrBusy = errors.New("something waits on the registration or the port's socket")

func descriptor(c syscall.Conn) (int, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	if err := raw.Control(func(f uintptr) { fd = int(f) }); err != nil {
		return -1, err
	}
	return fd, nil
}

// pending reports whether the idle program, polling conn and listen, would wake at once.
func pending(conn, listen int) bool {
	fds := []unix.PollFd{{Fd: int32(conn), Events: unix.POLLIN | unix.POLLRDHUP}, {Fd: int32(listen), Events: unix.POLLIN}}
	n, err := unix.Poll(fds, 0)
	return err != nil || n > 0
}

// minFD is where the idle program's descriptors start: clear of what dockerd passes (fd 3, 4)
// and of what the shim inherits.
const minFD = 100

func withoutResume(env []string) []string {
	out := make([]string, 0, len(env)+1)
	for _, kv := range env {
		if !strings.HasPrefix(kv, ResumeEnv+"=") {
			out = append(out, kv)
		}
	}
	return out
}

// Held is what the idle program held, as the resumed shim takes it back.
type Held struct {
	// Registration is the registration's connection.
	Registration *net.UnixConn
	// Listener is the port's listening socket, nil if the idle program held none.
	Listener *os.File
}

// Resumed returns what the idle program held, when it ran the shim again (ResumeEnv is set); the
// caller goes on holding the registration, or re-registers when it is gone, and serves the
// listening socket. It also closes the descriptor of the shim's executable.
func Resumed() (Held, bool, error) {
	v, ok := os.LookupEnv(ResumeEnv)
	if !ok {
		return Held{}, false, nil
	}
	os.Unsetenv(ResumeEnv)
	var connFD, exeFD, listenFD int
	if _, err := fmt.Sscanf(v, "%d,%d,%d", &connFD, &exeFD, &listenFD); err != nil || connFD < minFD || exeFD < minFD || (listenFD != -1 && listenFD < minFD) {
		return Held{}, true, fmt.Errorf("%s=%q: not the descriptors the idle shim held", ResumeEnv, v)
	}
	unix.Close(exeFD)
	// Close-on-exec again, as every descriptor of the shim's own.
	unix.CloseOnExec(connFD)
	var held Held
	if listenFD >= 0 {
		unix.CloseOnExec(listenFD)
		held.Listener = os.NewFile(uintptr(listenFD), "listen-sock")
	}
	f := os.NewFile(uintptr(connFD), "registration")
	defer f.Close()
	fc, err := net.FileConn(f)
	if err != nil {
		return held, true, fmt.Errorf("the registration the idle shim held: %w", err)
	}
	uc, ok := fc.(*net.UnixConn)
	if !ok {
		fc.Close()
		return held, true, fmt.Errorf("the registration the idle shim held is a %T", fc)
	}
	held.Registration = uc
	return held, true, nil
}

// Running reports whether process pid is the idle program waiting for something to happen: one
// thread (a Go process has several), in ppoll on its three descriptors (the fast start, which
// also has one thread, polls two while it registers). For tests and benchmarks that watch shims.
func Running(pid int) bool {
	sc, err := os.ReadFile(fmt.Sprintf("/proc/%d/syscall", pid))
	if err != nil {
		return false
	}
	f := strings.Fields(string(sc))
	if len(f) < 3 || f[0] != "271" || f[2] != "0x3" {
		return false
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	return err == nil && strings.Contains(string(status), "\nThreads:\t1\n")
}
