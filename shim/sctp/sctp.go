// Package sctp decides what becomes of an SCTP port, which Envoy cannot carry.
//
// By default the shim refuses it with a message that names SCTP and says what to do. When
// EDS_SCTP_PROXY names Docker's stock docker-proxy, the shim replaces itself with it (execve)
// with the very same argv, environment and file descriptors (fd 3, and fd 4 under
// -use-listen-fd): dockerd then talks to docker-proxy exactly as if it had started it, whatever
// the daemon version. Nothing of the shim remains in the process, so SCTP ports are neither
// registered with envoy-docker-server nor seen by Envoy.
package sctp

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// Refusal is the message for dockerd when no delegate is configured.
const Refusal = "envoy-docker-shim cannot publish SCTP ports: Envoy does not carry SCTP. " +
	"Publish the port as tcp or udp, or set EDS_SCTP_PROXY to the path of Docker's own docker-proxy " +
	"in dockerd's environment (for example Environment=EDS_SCTP_PROXY=/usr/libexec/docker/docker-proxy " +
	"in a systemd drop-in for docker.service) to have SCTP ports proxied by it"

// Delegate replaces the process with the docker-proxy at path, passing args (the shim's own
// arguments, without the program name). fds are the inherited descriptors it must receive
// (3, and 4 with -use-listen-fd). It returns only on failure, with a message for dockerd.
func Delegate(path string, args []string, fds ...int) error {
	st, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("cannot hand the SCTP port to EDS_SCTP_PROXY=%s: %w", path, unwrapPath(err))
	}
	if st.IsDir() || st.Mode().Perm()&0o111 == 0 {
		return fmt.Errorf("cannot hand the SCTP port to EDS_SCTP_PROXY=%s: not an executable file", path)
	}
	if self, err := os.Stat("/proc/self/exe"); err == nil && os.SameFile(self, st) {
		return fmt.Errorf("EDS_SCTP_PROXY=%s is envoy-docker-shim itself: point it at Docker's docker-proxy", path)
	}
	for _, fd := range fds {
		if flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err == nil && flags&unix.FD_CLOEXEC != 0 {
			unix.FcntlInt(uintptr(fd), unix.F_SETFD, flags&^unix.FD_CLOEXEC)
		}
	}
	err = syscall.Exec(path, append([]string{path}, args...), os.Environ())
	return fmt.Errorf("cannot hand the SCTP port to EDS_SCTP_PROXY=%s: %w", path, err)
}

func unwrapPath(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}
