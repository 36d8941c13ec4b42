package main_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
)

// TestSignalsStopTheServerCleanly: docker stop (SIGTERM) and Ctrl-C (SIGINT) of the real binary,
// as the compose service runs it, exit 0 and say so. The first release panicked here.
func TestSignalsStopTheServerCleanly(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	bin := testbed.BuildStatic(t, "github.com/envoy-docker-shim/envoy-docker-shim/services/cmd/envoy-docker-server", "envoy-docker-server")
	testbed.StopsCleanly(t, func(t *testing.T) *exec.Cmd {
		cmd := exec.Command(bin)
		cmd.Env = append(os.Environ(),
			"EDS_SOCKET="+filepath.Join(t.TempDir(), "server.sock"),
			"EDS_XDS_ADDR=127.0.0.1:"+strconv.Itoa(testbed.FreePort(t)),
			"EDS_HTTP_ADDR=127.0.0.1:"+strconv.Itoa(testbed.FreePort(t)),
			"DOCKER_HOST=",
			"EDS_RESTART_GRACE=100ms",
			// No dockerd of the test's here: the machine's own network settings stay out of it.
			"EDS_NETFILTER=false",
			"EDS_NETFILTER_TABLE=eds_srv_signals",
			"EDS_SYSCTL_NET="+testbed.SysctlStandIn(t),
		)
		return cmd
	}, func(stderr string) bool {
		// Up, and past the grace period, so that every actor of the run group is running.
		return strings.Contains(stderr, "HTTP endpoint listening") && strings.Contains(stderr, "grace period over")
	}, 3*time.Second)
}
