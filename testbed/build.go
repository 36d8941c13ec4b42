package testbed

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/shim/idle"
)

// BuildStatic builds the package pkg (an import path of this module) as a static binary named
// name in a directory the test removes, and returns its path. The file name matters: dockerd runs
// the shim by path, and resync recognises shims by their file name. Go's build cache makes every
// build after the first a link step.
func BuildStatic(t testing.TB, pkg, name string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), name)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	args := []string{"build", "-trimpath"}
	if strings.HasSuffix(pkg, "/shim/cmd/envoy-docker-shim") && idle.LinkFlag != "" {
		args = append(args, "-ldflags="+idle.LinkFlag) // the shim's fast start (package idle)
	}
	cmd := exec.CommandContext(ctx, "go", append(args, "-o", out, pkg)...)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if msg, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v: %s", pkg, err, strings.TrimSpace(string(msg)))
	}
	return out
}
