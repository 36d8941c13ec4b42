package bench

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
)

func TestKernelShare(t *testing.T) {
	report := `# Overhead  Shared Object
# ........  .................
#
    61.20%  [kernel.kallsyms]
    30.10%  envoy
     5.00%  libc.so.6
     2.50%  [kernel.vmlinux]
`
	tests := []struct {
		name, report string
		want         float64
	}{
		{"kernel lines summed", report, 63.7},
		{"no samples", "# no samples\n", 0},
		{"comments only", "# 12.00%  [kernel.kallsyms]\n", 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := kernelShare(tt.report); got < tt.want-0.001 || got > tt.want+0.001 {
				t.Errorf("kernelShare = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestSlug(t *testing.T) {
	tests := []struct{ name, want string }{
		{"ours, ProxyMode=tcp", "ours-proxymode-tcp"},
		{"nginx (1 worker)", "nginx-1-worker"},
		{"docker-proxy", "docker-proxy"},
		{"  --  ", ""},
	}
	for _, tt := range tests {
		if got := slug(tt.name); got != tt.want {
			t.Errorf("slug(%q) = %q, want %q", tt.name, got, tt.want)
		}
	}
}

func TestStoppedBy(t *testing.T) {
	interrupted := exec.Command("sh", "-c", "kill -INT $$")
	errInt := interrupted.Run()
	failed := exec.Command("sh", "-c", "exit 3")
	errExit := failed.Run()
	tests := []struct {
		name string
		err  error
		want bool
	}{
		{"ended by SIGINT", errInt, true},
		{"exit status 3", errExit, false},
		{"not an exit", errors.New("no such file"), false},
	}
	for _, tt := range tests {
		if got := stoppedBy(tt.err, syscall.SIGINT); got != tt.want {
			t.Errorf("%s: stoppedBy(%v) = %v, want %v", tt.name, tt.err, got, tt.want)
		}
	}
}

// TestPidsRunning: this test's own process is found by its argv[0] and a marker of its command
// line, whatever /proc/PID/exe says.
func TestPidsRunning(t *testing.T) {
	self := filepath.Base(os.Args[0])
	if got := PidsRunning(self, "-test."); !slices.Contains(got, os.Getpid()) {
		t.Errorf("PidsRunning(%q, -test.) = %v, lacks this process %d", self, got, os.Getpid())
	}
	if got := PidsRunning(self, "\x00no-such-argument\x00"); slices.Contains(got, os.Getpid()) {
		t.Errorf("PidsRunning matched a marker this command line lacks")
	}
}
