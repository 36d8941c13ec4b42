// Package statuspipe owns fd 3, the pipe on which dockerd waits for its userland proxy to start.
//
// The daemon reads 2 bytes once: exactly "0\n" means started; anything else makes it read to EOF
// and show the rest as the error of `docker run`. So Ready writes "0\n" in a single write(2),
// Fail writes "1\n<message>" in a single write(2), and both close fd 3 at once (an open fd 3
// turns any error into the daemon's 16 s timeout). Only one of them ever writes.
//
// It never writes "0\n" on its own: the caller decides when traffic reaches the container. It
// never closes or writes an fd 3 that is not a pipe (the shim was then not started by dockerd,
// and fd 3 may belong to the Go runtime).
package statuspipe

import (
	"errors"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// FD is where dockerd passes the write end of its status pipe.
const FD = 3

// DefaultTimeout bounds the whole start-up, from exec to the status written on fd 3. dockerd gives
// up after 16 s (and daemons 27+ then orphan the proxy), so every wait must end well before that.
const DefaultTimeout = 10 * time.Second

// MaxTimeout is the longest start-up the shim accepts to be configured with: beyond it the daemon
// may time out before the shim reports its reason.
const MaxTimeout = 15 * time.Second

// ErrNoPipe is returned when fd 3 is not a pipe: the shim was not started by dockerd.
var ErrNoPipe = errors.New("fd 3 is not a pipe: not started by dockerd")

// Pipe is the status pipe on fd 3.
type Pipe struct {
	mu   sync.Mutex
	fd   int // -1 once written, or when there is no pipe
	sent string
}

// Inherited takes fd 3 if it is a pipe. Call it first thing in main, before anything else can
// open a file that might get number 3. Without a pipe it returns a Pipe that writes nothing.
func Inherited() (*Pipe, error) { return Open(FD) }

// Open takes fd as the status pipe if it is one.
func Open(fd int) (*Pipe, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFIFO {
		return &Pipe{fd: -1}, ErrNoPipe
	}
	return &Pipe{fd: fd}, nil
}

// Ready tells the daemon the port is served: "0\n", in one write.
func (p *Pipe) Ready() error { return p.write("0\n") }

// Fail tells the daemon why the proxy could not start: "1\n" and the message, in one write. The
// caller exits non-zero afterwards.
func (p *Pipe) Fail(message string) error {
	if message == "" {
		message = "envoy-docker-shim failed without a reason"
	}
	return p.write("1\n" + message)
}

// Sent reports what was written ("" if nothing yet).
func (p *Pipe) Sent() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.sent
}

func (p *Pipe) write(s string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.sent != "" {
		return errors.New("status pipe: status already sent")
	}
	p.sent = s
	if p.fd < 0 {
		return ErrNoPipe
	}
	fd := p.fd
	p.fd = -1
	// The pipe is empty and holds at least 4 KiB, so a message of that size goes in one write.
	// A daemon that stopped reading gives EPIPE (Go ignores SIGPIPE on fds other than 1 and 2).
	if len(s) > 4096 {
		s = s[:4093] + "..."
	}
	var err error
	for {
		var n int
		n, err = unix.Write(fd, []byte(s))
		if err == unix.EINTR {
			continue
		}
		if err == nil && n != len(s) {
			err = errors.New("status pipe: short write")
		}
		break
	}
	if cerr := unix.Close(fd); err == nil {
		err = cerr
	}
	return err
}
