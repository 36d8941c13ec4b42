package testbed

import (
	"bytes"
	"errors"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Start starts cmd for the test's life: killed (and waited for) when the test ends. Its exit
// arrives on the channel returned; a reader that takes it puts it back for the cleanup.
func Start(t testing.TB, cmd *exec.Cmd) chan error {
	t.Helper()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
	})
	return exited
}

// StopsCleanly checks a long-running program the way docker stop and dockerd meet it: for each of
// SIGTERM and SIGINT it starts a fresh process from newCmd, waits until started reports true of
// what the process wrote on stderr, sends the real signal, and expects exit code 0 within limit
// and a log line containing "stopping".
func StopsCleanly(t *testing.T, newCmd func(t *testing.T) *exec.Cmd, started func(stderr string) bool, limit time.Duration) {
	t.Helper()
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		t.Run(sig.String(), func(t *testing.T) {
			cmd := newCmd(t)
			var stderr lockedBuffer
			cmd.Stderr = &stderr
			exited := Start(t, cmd)
			deadline := time.Now().Add(30 * time.Second)
			for !started(stderr.String()) {
				select {
				case err := <-exited:
					exited <- err
					t.Fatalf("exited before it started: %v; stderr:\n%s", err, stderr.String())
				case <-time.After(20 * time.Millisecond):
				}
				if time.Now().After(deadline) {
					t.Fatalf("not started within 30 s; stderr:\n%s", stderr.String())
				}
			}
			sent := time.Now()
			if err := cmd.Process.Signal(sig); err != nil {
				t.Fatal(err)
			}
			var err error
			select {
			case err = <-exited:
				exited <- err
			case <-time.After(limit):
				t.Fatalf("still running %v after %v; stderr:\n%s", limit, sig, stderr.String())
			}
			var exit *exec.ExitError
			if errors.As(err, &exit) || err != nil {
				t.Fatalf("after %v: %v (want exit 0); stderr:\n%s", sig, err, stderr.String())
			}
			if !strings.Contains(stderr.String(), "stopping") {
				t.Errorf("no \"stopping\" log line after %v; stderr:\n%s", sig, stderr.String())
			}
			t.Logf("exit 0 %v after %v", time.Since(sent).Round(time.Millisecond), sig)
		})
	}
}

// lockedBuffer is a bytes.Buffer a process writes to while the test reads it.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
