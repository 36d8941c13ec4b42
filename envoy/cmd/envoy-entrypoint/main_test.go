package main_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
)

// TestSignalsStopEnvoyCleanly: docker stop (SIGTERM) and SIGINT of the Envoy container's entrypoint,
// with a real Envoy under it, exit 0 and log the stop.
func TestSignalsStopEnvoyCleanly(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary with a real Envoy")
	}
	envoy := testbed.EnvoyBinary(t)
	bin := testbed.BuildStatic(t, "github.com/envoy-docker-shim/envoy-docker-shim/envoy/cmd/envoy-entrypoint", "envoy-entrypoint")
	var admin int
	testbed.StopsCleanly(t, func(t *testing.T) *exec.Cmd {
		admin = testbed.FreePort(t)
		// --disable-hot-restart: no shared memory, so no base ID can collide with the testbed's Envoys.
		cmd := exec.Command(bin, "--disable-hot-restart")
		cmd.Env = append(os.Environ(),
			"ENVOY_BINARY="+envoy,
			"ENVOY_CONFIG_PATH="+filepath.Join(t.TempDir(), "envoy.yaml"),
			"ENVOY_PORT="+strconv.Itoa(admin),
			"ENVOY_UI_LISTEN_PORT=0",
			"ENVOY_CONCURRENCY=1",
			"EDS_XDS_ADDR=127.0.0.1:"+strconv.Itoa(testbed.FreePort(t)), // nobody: Envoy keeps retrying
		)
		return cmd
	}, func(string) bool {
		// Envoy is up once its admin interface answers.
		_, _, err := testbed.HTTPGet(t.Context(), fmt.Sprintf("http://127.0.0.1:%d/server_info", admin))
		return err == nil
	}, 5*time.Second)
}
