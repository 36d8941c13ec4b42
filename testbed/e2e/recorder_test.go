package e2e

import (
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// childEnv makes the test binary the recorder's child: it stands for a shim that takes the stop
// signals, says it is ready by creating the file named by its last argument, and on a signal
// exits 0 at once ("exit0") or dies of SIGTERM ("killed").
const childEnv = "EDS_TEST_RECORDER_CHILD"

func TestMain(m *testing.M) {
	if mode := os.Getenv(childEnv); mode != "" {
		recorderChild(mode)
	}
	os.Exit(m.Run())
}

func recorderChild(mode string) {
	stops := make(chan os.Signal, 1)
	signal.Notify(stops, syscall.SIGINT, syscall.SIGTERM)
	if err := os.WriteFile(os.Args[len(os.Args)-1], nil, 0o644); err != nil {
		os.Exit(3)
	}
	<-stops
	if mode == "killed" {
		signal.Reset(syscall.SIGTERM)
		_ = syscall.Kill(os.Getpid(), syscall.SIGTERM)
		time.Sleep(time.Minute)
	}
	os.Exit(0)
}

// TestRecorderRecordsTheShimsOwnStatus stops the recorder as dockerd stops a proxy, hundreds of
// times, with a child that exits 0 the moment it is signalled: the recorder must record 0 each
// time, and a child's death by a signal as 128 plus its number. Its first version recorded the
// status of the shell's interrupted wait (130) for about 1 stop in 60 (TestE2EShimUnderDockerd
// failed so in CI).
func TestRecorderRecordsTheShimsOwnStatus(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	wrapper := filepath.Join(dir, "recorder")
	if err := os.WriteFile(wrapper, []byte(recorder), 0o755); err != nil {
		t.Fatal(err)
	}
	status := filepath.Join(dir, "exits")
	stop := func(t *testing.T, mode string, sig syscall.Signal, round int) {
		ready := filepath.Join(dir, "ready")
		_ = os.Remove(ready)
		// dockerd runs a proxy with the stop signals at their defaults; so must this (a shell
		// cannot trap a signal ignored on its entry).
		cmd := exec.Command("env", "--default-signal=INT,TERM", wrapper, "-host-port", mode, ready)
		cmd.Env = append(os.Environ(), childEnv+"="+mode, "EDS_TEST_SHIM="+self, "EDS_TEST_SHIM_STATUS="+status)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(10 * time.Second)
		for {
			if _, err := os.Stat(ready); err == nil {
				break
			}
			if time.Now().After(deadline) {
				_ = cmd.Process.Kill()
				_ = cmd.Wait()
				t.Fatalf("round %d: the child did not start", round)
			}
			time.Sleep(time.Millisecond)
		}
		if err := cmd.Process.Signal(sig); err != nil {
			t.Fatal(err)
		}
		_ = cmd.Wait()
	}
	const rounds = 300
	for i := range rounds {
		stop(t, "exit0", []syscall.Signal{syscall.SIGINT, syscall.SIGTERM}[i%2], i)
	}
	for i := range 10 {
		stop(t, "killed", syscall.SIGINT, i)
	}
	out, err := os.ReadFile(status)
	if err != nil {
		t.Fatal(err)
	}
	counts := map[string]int{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		code, args, _ := strings.Cut(line, " ")
		mode := strings.Fields(args)[1]
		counts[mode+" "+code]++
	}
	if counts["exit0 0"] != rounds || counts["killed 143"] != 10 || len(counts) != 2 {
		t.Fatalf("recorded %v; want exit0 0: %d and killed 143: 10", counts, rounds)
	}
}
