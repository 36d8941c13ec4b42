package idle

import (
	"errors"
	"fmt"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// How Enter keeps the shim's stop signals (SIGINT, SIGTERM) from the Go runtime, which would lose
// them with the process image, from the moment it decides to replace the process: one that comes
// before waits for the caller (Stops), one that comes after waits, pending, for the idle program
// (holdStops, holdAllThreads).

// flushSignal is the signal Enter sends itself, once the stop signals are blocked, to learn that
// every stop signal the Go runtime took before that has reached Stops: the runtime passes the
// signals it took on to package os/signal one at a time, lowest number first among those taken
// together, so SIGINT (2) and SIGTERM (15) before SIGWINCH (28), which no shim otherwise gets (it
// has no terminal). An earlier design waited 25 ms for them instead: on a loaded machine that
// was sometimes too short, and the shim sat in the idle program with the stop signal lost, and
// dockerd waiting for it to exit, for ever.
const flushSignal = unix.SIGWINCH

// flushWait bounds the wait for flushSignal: past it, Enter gives up (the shim stays in Go).
const flushWait = 5 * time.Second

// Stops is how Enter learns of a stop signal (SIGINT, SIGTERM) the Go runtime took just before
// Enter blocked them. WatchStops makes it. The zero Stops watches nothing (tests that send no
// stop signal).
type Stops struct {
	c chan os.Signal
	// flushing is set while a flushSignal Enter sent has not come back (Enter gave up on it).
	flushing *bool
}

// WatchStops starts watching the stop signals for Enter. Call it once, at start-up, before the
// first Enter and before anything else may take a stop signal: it enables flushSignal, which
// Enter itself must not (see Enter).
func WatchStops() Stops {
	c := make(chan os.Signal, 16)
	signal.Notify(c, unix.SIGINT, unix.SIGTERM, flushSignal)
	// The runtime's signal thread blocks every signal nobody asked for: blockSignal must reach it
	// too (holdAllThreads). Outside Enter nothing sends it.
	signal.Notify(make(chan os.Signal, 1), syscall.Signal(blockSignal))
	return Stops{c: c, flushing: new(bool)}
}

// flush returns nil once every stop signal the runtime took before the call has reached s and
// none did, ErrStopping when one did, and an error if flushSignal does not come back in time.
func (s Stops) flush() error {
	if s.c == nil {
		return nil
	}
	deadline := time.NewTimer(flushWait)
	defer deadline.Stop()
	// take reads one signal: a stop ends the flush; a flushSignal is the one awaited.
	take := func() error {
		select {
		case sig := <-s.c:
			if sig != flushSignal {
				return ErrStopping
			}
			*s.flushing = false
			return nil
		case <-deadline.C:
			return errors.New("idle program: the Go runtime did not pass its own signal on within 5 s")
		}
	}
	// What came so far, and the flushSignal of an Enter that gave up on it, which says nothing
	// about the signals taken since: wait for it before sending another.
	for len(s.c) > 0 || *s.flushing {
		if err := take(); err != nil {
			return err
		}
	}
	if err := unix.Kill(os.Getpid(), flushSignal); err != nil {
		return fmt.Errorf("idle program: signalling itself: %w", err)
	}
	for *s.flushing = true; *s.flushing; {
		if err := take(); err != nil {
			return err
		}
	}
	return nil
}

// holdStops makes the stop signals wait for the idle program (see Enter): it gives them
// stopHandler, then blocks them in this thread; the call that blocks them runs in every thread of
// the runtime, so that when it returns, every handler of Go's that took one before has run (a
// handler runs with all signals blocked), and Stops.flush can tell. release puts Go's handlers
// back and unblocks them in this thread: a stop signal that waits then reaches Go.
func holdStops() (release func(), err error) {
	sigs := [2]unix.Signal{unix.SIGINT, unix.SIGTERM}
	var old [2]sigaction
	restore := func(n int) {
		for i := range n {
			_, _, _ = syscall.RawSyscall6(unix.SYS_RT_SIGACTION, uintptr(sigs[i]), uintptr(unsafe.Pointer(&old[i])), 0, 8, 0, 0)
		}
	}
	for i, sig := range sigs {
		if _, _, errno := syscall.RawSyscall6(unix.SYS_RT_SIGACTION, uintptr(sig), 0, uintptr(unsafe.Pointer(&old[i])), 8, 0, 0); errno != 0 {
			return nil, fmt.Errorf("idle program: the stop signals' handler: %w", errno)
		}
		if old[i].flags&saRestorer == 0 {
			return nil, fmt.Errorf("idle program: signal %d has no handler of Go's (flags %#x)", sig, old[i].flags)
		}
		held := sigaction{handler: stopHandlerPC(), flags: saSiginfo | saOnstack | saRestorer | saRestart, restorer: old[i].restorer, mask: ^uint64(0)}
		if _, _, errno := syscall.RawSyscall6(unix.SYS_RT_SIGACTION, uintptr(sig), uintptr(unsafe.Pointer(&held)), 0, 8, 0, 0); errno != 0 {
			restore(i)
			return nil, fmt.Errorf("idle program: the stop signals' handler: %w", errno)
		}
	}
	var stopSignals uint64 = 1<<(unix.SIGINT-1) | 1<<(unix.SIGTERM-1)
	if _, _, errno := syscall.AllThreadsSyscall6(unix.SYS_RT_SIGPROCMASK, unix.SIG_BLOCK, uintptr(unsafe.Pointer(&stopSignals)), 0, 8, 0, 0); errno != 0 {
		restore(len(sigs))
		return nil, fmt.Errorf("idle program: blocking the stop signals: %w", errno)
	}
	return func() {
		restore(len(sigs))
		_, _, _ = syscall.RawSyscall6(unix.SYS_RT_SIGPROCMASK, unix.SIG_UNBLOCK, uintptr(unsafe.Pointer(&stopSignals)), 0, 8, 0, 0)
	}, nil
}

// The sigaction flags holdStops sets, as Go's handlers have them (SA_ONSTACK: the signal stack
// of each thread of the runtime, not a goroutine's).
const (
	saSiginfo  = 0x4
	saOnstack  = 0x08000000
	saRestorer = 0x04000000
	saRestart  = 0x10000000
)

// sigaction is the kernel's struct sigaction on x86-64.
type sigaction struct {
	handler  uintptr
	flags    uint64
	restorer uintptr
	mask     uint64
}

// blockSignal is the signal holdAllThreads sends each thread: a real-time one that neither the
// runtime nor anyone else sends the shim.
const blockSignal = 40

// threadsHeld counts the threads blockHandler ran in.
var threadsHeld uint32

// holdAllThreads blocks the stop signals for good in every thread of the process but this one,
// which has them blocked already (holdStops): blockHandler, sent to each, blocks them in the mask
// its thread gets back when it returns. A thread in stopHandler finishes it before it takes
// blockSignal (a handler runs with all signals blocked), so once every thread has answered, no
// stop signal is in a handler that the exec would cut short (the exec ends every other thread):
// each is pending for the idle program, and no thread can take another. It uses raw system calls
// only, so that the runtime starts no thread meanwhile; it gives up (the caller stays in Go) if
// the threads do not all answer within a second.
func holdAllThreads() error {
	held := sigaction{handler: blockHandlerPC(), flags: saSiginfo | saOnstack | saRestorer | saRestart, mask: ^uint64(0)}
	var old sigaction
	if _, _, errno := syscall.RawSyscall6(unix.SYS_RT_SIGACTION, blockSignal, 0, uintptr(unsafe.Pointer(&old)), 8, 0, 0); errno != 0 {
		return fmt.Errorf("idle program: signal %d: %w", blockSignal, errno)
	}
	held.restorer = old.restorer
	if _, _, errno := syscall.RawSyscall6(unix.SYS_RT_SIGACTION, blockSignal, uintptr(unsafe.Pointer(&held)), 0, 8, 0, 0); errno != 0 {
		return fmt.Errorf("idle program: signal %d: %w", blockSignal, errno)
	}
	defer syscall.RawSyscall6(unix.SYS_RT_SIGACTION, blockSignal, uintptr(unsafe.Pointer(&old)), 0, 8, 0, 0)

	pid, _, _ := syscall.RawSyscall(unix.SYS_GETPID, 0, 0, 0)
	self, _, _ := syscall.RawSyscall(unix.SYS_GETTID, 0, 0, 0)
	atomic.StoreUint32(&threadsHeld, 0)
	var signalled [1024]int32
	n, sent := 0, uint32(0)
	deadline := time.Now().Add(time.Second)
	for {
		var tids [1024]int32
		found, err := threads(tids[:])
		if err != nil {
			return err
		}
		more := false
		for _, tid := range tids[:found] {
			if uintptr(tid) == self || contains(signalled[:n], tid) {
				continue
			}
			if n == len(signalled) {
				return errors.New("idle program: too many threads")
			}
			signalled[n] = tid
			n++
			more = true
			if _, _, errno := syscall.RawSyscall(unix.SYS_TGKILL, pid, uintptr(tid), blockSignal); errno == 0 {
				sent++
			}
		}
		for atomic.LoadUint32(&threadsHeld) < sent {
			if time.Now().After(deadline) {
				return fmt.Errorf("idle program: %d of %d threads blocked the stop signals within a second", atomic.LoadUint32(&threadsHeld), sent)
			}
			syscall.RawSyscall(unix.SYS_SCHED_YIELD, 0, 0, 0)
		}
		if !more {
			return nil // every thread there is answered, and no new one came
		}
	}
}

func contains(s []int32, v int32) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// threads fills tids with the process's thread IDs (/proc/self/task), with raw system calls, and
// returns how many.
func threads(tids []int32) (int, error) {
	path := [...]byte{'/', 'p', 'r', 'o', 'c', '/', 's', 'e', 'l', 'f', '/', 't', 'a', 's', 'k', 0}
	cwd := unix.AT_FDCWD
	fd, _, errno := syscall.RawSyscall6(unix.SYS_OPENAT, uintptr(cwd), uintptr(unsafe.Pointer(&path[0])), unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0, 0, 0)
	if errno != 0 {
		return 0, fmt.Errorf("idle program: /proc/self/task: %w", errno)
	}
	defer syscall.RawSyscall(unix.SYS_CLOSE, fd, 0, 0)
	n := 0
	var buf [4096]byte
	for {
		got, _, errno := syscall.RawSyscall(unix.SYS_GETDENTS64, fd, uintptr(unsafe.Pointer(&buf[0])), uintptr(len(buf)))
		if errno != 0 {
			return 0, fmt.Errorf("idle program: /proc/self/task: %w", errno)
		}
		if got == 0 {
			return n, nil
		}
		for off := 0; off < int(got); {
			reclen := int(buf[off+16]) | int(buf[off+17])<<8 // struct linux_dirent64: ino, off, reclen, type, name
			tid := int32(0)
			for _, c := range buf[off+19 : off+reclen] {
				if c < '0' || c > '9' {
					break
				}
				tid = tid*10 + int32(c-'0')
			}
			if tid > 0 {
				if n == len(tids) {
					return 0, errors.New("idle program: too many threads")
				}
				tids[n] = tid
				n++
			}
			off += reclen
		}
	}
}
