package statuspipe

import (
	"errors"
	"io"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

func pipe(t *testing.T) (*os.File, *Pipe) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	fd, err := dupFD(w)
	w.Close()
	if err != nil {
		t.Fatal(err)
	}
	p, err := Open(fd)
	if err != nil {
		t.Fatal(err)
	}
	return r, p
}

func dupFD(f *os.File) (int, error) {
	raw, err := f.SyscallConn()
	if err != nil {
		return -1, err
	}
	var fd int
	var derr error
	raw.Control(func(u uintptr) { fd, derr = unix.Dup(int(u)) })
	return fd, derr
}

// Contract: "Write 0\n in one write(2)" — the daemon reads 2 bytes once, then fd 3 is closed.
func TestReadyWritesZeroNewlineOnceAndCloses(t *testing.T) {
	r, p := pipe(t)
	if err := p.Ready(); err != nil {
		t.Fatal(err)
	}
	all, err := io.ReadAll(r) // EOF proves fd 3 was closed
	if err != nil || string(all) != "0\n" {
		t.Fatalf("pipe carried %q, %v; want \"0\\n\" then EOF", all, err)
	}
	if err := p.Fail("late"); err == nil {
		t.Fatal("a second status was accepted")
	}
}

// Contract: "On failure write 1\n<clear message>, close fd 3".
func TestFailWritesOneNewlineMessageAndCloses(t *testing.T) {
	r, p := pipe(t)
	if err := p.Fail("listen tcp4 0.0.0.0:80: bind: address already in use"); err != nil {
		t.Fatal(err)
	}
	all, _ := io.ReadAll(r)
	if string(all) != "1\nlisten tcp4 0.0.0.0:80: bind: address already in use" {
		t.Fatalf("pipe carried %q", all)
	}
}

// Contract: "Exiting without writing shows users an empty error" — an empty reason is replaced.
func TestFailNeverSendsAnEmptyReason(t *testing.T) {
	r, p := pipe(t)
	p.Fail("")
	all, _ := io.ReadAll(r)
	if len(all) <= 2 {
		t.Fatalf("pipe carried %q", all)
	}
}

func TestOpenRefusesWhatIsNotAPipe(t *testing.T) {
	f, err := os.CreateTemp(t.TempDir(), "x")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	p, err := Open(int(f.Fd()))
	if !errors.Is(err, ErrNoPipe) {
		t.Fatalf("Open(regular file) error = %v", err)
	}
	if err := p.Ready(); !errors.Is(err, ErrNoPipe) {
		t.Fatalf("Ready without a pipe = %v", err)
	}
	if _, err := f.WriteString("still open"); err != nil {
		t.Fatalf("the file was touched: %v", err)
	}
}
