package testbed

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

const (
	// EchoImageTag is the tag EchoImage gives the echo server image in each daemon.
	EchoImageTag   = "eds-echo:test"
	echoServerPkg  = "github.com/envoy-docker-shim/envoy-docker-shim/testbed/echoserver"
	echoDockerfile = `FROM scratch
COPY echoserver /echoserver
EXPOSE 80 7 7/udp
STOPSIGNAL SIGTERM
ENTRYPOINT ["/echoserver"]
`
)

// echoBinary is the compiled echo server, built once per test process and kept in memory, so
// that no build directory outlives the instance it was built in.
var echoBinary struct {
	sync.Mutex
	data []byte
}

// EchoImage builds the echo server image in this daemon (once per daemon) and returns its tag.
func (d *Daemon) EchoImage(t testing.TB) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), dockerCommandTimeout)
	defer cancel()
	tag, err := d.echoImage(ctx)
	if err != nil {
		t.Fatalf("EchoImage: %v", err)
	}
	return tag
}

func (d *Daemon) echoImage(ctx context.Context) (string, error) {
	d.imageMu.Lock()
	defer d.imageMu.Unlock()
	if d.echoTag != "" {
		return d.echoTag, nil
	}
	ctxDir := filepath.Join(d.Root, "build", "echo")
	if err := os.MkdirAll(ctxDir, 0o755); err != nil {
		return "", err
	}
	bin, err := compileEchoServer(ctxDir)
	if err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(ctxDir, "echoserver"), bin, 0o755); err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(ctxDir, "Dockerfile"), []byte(echoDockerfile), 0o644); err != nil {
		return "", err
	}
	if _, err := d.Docker(ctx, "build", "-q", "-t", EchoImageTag, ctxDir); err != nil {
		return "", err
	}
	d.echoTag = EchoImageTag
	return d.echoTag, nil
}

// compileEchoServer returns the static echo server binary, compiling it into workDir the first
// time. It runs in the test's working directory, which for any test in this module is inside it.
func compileEchoServer(workDir string) ([]byte, error) {
	echoBinary.Lock()
	defer echoBinary.Unlock()
	if echoBinary.data != nil {
		return echoBinary.data, nil
	}
	goTool, err := exec.LookPath("go")
	if err != nil {
		return nil, fmt.Errorf("the go command is needed to build the echo server: %w", err)
	}
	out := filepath.Join(workDir, "echoserver.build")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, goTool, "build", "-trimpath", "-ldflags=-s -w", "-o", out, echoServerPkg)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+runtime.GOARCH)
	if msg, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("go build %s: %w: %s", echoServerPkg, err, strings.TrimSpace(string(msg)))
	}
	data, err := os.ReadFile(out)
	if err != nil {
		return nil, err
	}
	_ = os.Remove(out)
	echoBinary.data = data
	return data, nil
}
