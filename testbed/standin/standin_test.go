package standin

import (
	"os"
	"path/filepath"
	"testing"
)

// TestGoKey: the Go stand-in's cache key follows the content of go.mod, go.sum and busybox and
// the toolchain, not the repository's location, so the tarball a box build makes in its checkout
// is found again in the VM's.
func TestGoKey(t *testing.T) {
	repo := func(goMod, goSum string) string {
		dir := t.TempDir()
		for name, content := range map[string]string{"go.mod": goMod, "go.sum": goSum} {
			if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		return dir
	}
	busybox := filepath.Join(t.TempDir(), "busybox")
	if err := os.WriteFile(busybox, []byte("busybox"), 0o755); err != nil {
		t.Fatal(err)
	}
	key := func(t *testing.T, version, goroot, repo string) string {
		k, err := goKey(version, goroot, repo, busybox)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	base := key(t, "go1.26.8", "/usr/local/go", repo("module m\n", "a v1 h1:x\n"))
	for _, tc := range []struct {
		name          string
		version, root string
		repo          string
		same          bool
	}{
		{"another checkout, same modules", "go1.26.8", "/usr/local/go", repo("module m\n", "a v1 h1:x\n"), true},
		{"other go.sum", "go1.26.8", "/usr/local/go", repo("module m\n", "a v2 h1:y\n"), false},
		{"other go.mod", "go1.26.8", "/usr/local/go", repo("module m\n\ngo 1.26\n", "a v1 h1:x\n"), false},
		{"other toolchain", "go1.26.9", "/usr/local/go", repo("module m\n", "a v1 h1:x\n"), false},
		{"toolchain elsewhere", "go1.26.8", "/opt/go", repo("module m\n", "a v1 h1:x\n"), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := key(t, tc.version, tc.root, tc.repo); (got == base) != tc.same {
				t.Errorf("key %s, base %s: same = %v, want %v", got, base, got == base, tc.same)
			}
		})
	}
	if _, err := goKey("go1.26.8", "/usr/local/go", t.TempDir(), busybox); err == nil {
		t.Error("goKey of a directory without go.mod: no error")
	}
}
