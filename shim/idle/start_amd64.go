package idle

import (
	"github.com/envoy-docker-shim/envoy-docker-shim/internal/buildinfo"
	"github.com/envoy-docker-shim/envoy-docker-shim/internal/shimlink"
)

// The words of the fast start (start_amd64.s). It reads them before the Go runtime exists, so
// each is statically initialised data: string constants, and the address of the version.
// TestFastStartWords holds them to package shimlink's spelling.
var (
	// startFlags is dockerd's argv, in its order: -proto tcp -host-ip IP -host-port N
	// -container-ip IP -container-port N [-use-listen-fd].
	startFlags = [...]string{"-proto", "tcp", "-host-ip", "-host-port", "-container-ip", "-container-port", "-use-listen-fd"}
	// startFlagAt is where each of startFlags is in argv.
	startFlagAt = [...]int64{1, 2, 3, 5, 7, 9, 11}
	// startEnvPrefix marks the settings that change how a TCP shim starts (EDS_SHIM_TIMEOUT, and
	// the shim's own: StartedEnv, ResumeEnv); of them the fast start reads only the socket's. The
	// others are the Go shim's to read.
	startEnvPrefix    = "EDS_SHIM_"
	startSocketEnv    = "EDS_SHIM_SOCKET="
	startSocket       = shimlink.DefaultSocket
	startIPv6Any      = "::"
	startIPv6Loopback = "::1"
	// The Open message, as shimlink.Encode spells it (TestFastStartOpen compares them).
	startOpen      = "type=open&proto=tcp&host="
	startContainer = "&container="
	startPID       = "&pid="
	startVersion   = "&version="
	startServing   = "&serving=1&wants_served=1"
	startDev       = "dev"
	versionRef     = &buildinfo.Version
	// What the answer must hold.
	startReady = "type=ready"
	startRetry = "connect_retry_ms="
	// fd 3.
	startStatusReady   = "0\n"
	startStatusStopped = "1\n" + StoppedBeforeReady
	// What the idle program gets: the shim's executable, and its environment's additions.
	startExe       = "/proc/self/exe\x00"
	startResumeEnv = ResumeEnv + "="
	startRetryEnv  = RetryWindowEnv + "="
	startMaxProcs  = "GOMAXPROCS=1\x00"
	// What the Go shim gets when the fast start hands over.
	startStartedEnv = StartedEnv + "="
)

// LinkFlag makes the fast start (start_amd64.s) the shim's entry point: go build
// -ldflags=-E=_rt0_envoy_docker_shim. Without it the shim works the same, starting the Go
// runtime for every port.
const LinkFlag = "-E=_rt0_envoy_docker_shim"
