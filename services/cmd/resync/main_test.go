package main_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
)

// TestSignalsStopResyncCleanly: compose down while resync still waits for the server is a clean
// stop of the real binary (exit 0, logged), not a failed one-shot.
func TestSignalsStopResyncCleanly(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	bin := testbed.BuildStatic(t, "github.com/envoy-docker-shim/envoy-docker-shim/services/cmd/resync", "resync")
	testbed.StopsCleanly(t, func(t *testing.T) *exec.Cmd {
		cmd := exec.Command(bin)
		// No server on the socket: resync waits for one.
		cmd.Env = append(os.Environ(), "EDS_SOCKET="+filepath.Join(t.TempDir(), "server.sock"))
		return cmd
	}, func(stderr string) bool {
		return strings.Contains(stderr, "waiting for it to answer")
	}, 2*time.Second)
}
