package testbed

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// Generation is a generation of dockerd the harness runs. The two differ in the userland-proxy
// contract (see docker-proxy-contract.md): 20.10 lets the proxy bind the published port, 28 and
// later bind it themselves and pass it on fd 4 (-use-listen-fd). They also differ in what the API
// shows of a container while it starts.
type Generation string

const (
	// Docker20 is Debian's dockerd 20.10, which runs its own containerd 1.6, runc and
	// docker-proxy from the system's packages.
	Docker20 Generation = "docker20"
	// Docker29 is dockerd 29 (moby v2), built by provision.sh into Docker29Dir with its own
	// containerd 2, runc and docker-proxy; the harness starts a private containerd for it.
	Docker29 Generation = "docker29"
)

// generationsEnv restricts the generations Generations returns, e.g. "docker29" while working on
// one of them. Unset: all.
const generationsEnv = "EDS_TESTBED_DOCKER"

// AllGenerations are the daemon generations the end-to-end suite covers, oldest first.
var AllGenerations = []Generation{Docker20, Docker29}

// Generations returns the daemon generations a test should run against: all of them, or those
// named (comma-separated) in $EDS_TESTBED_DOCKER. A generation whose binaries are missing is not
// left out here: StartDaemon skips the test (fails it under CI=true) with what to install.
//
//	for _, gen := range testbed.Generations(t) {
//		t.Run(string(gen), func(t *testing.T) {
//			d := testbed.StartDaemon(t, testbed.DaemonOptions{Generation: gen})
//			...
func Generations(t testing.TB) []Generation {
	t.Helper()
	gens, err := parseGenerations(os.Getenv(generationsEnv))
	if err != nil {
		t.Fatalf("%s: %v", generationsEnv, err)
	}
	return gens
}

func parseGenerations(value string) ([]Generation, error) {
	if strings.TrimSpace(value) == "" {
		return slices.Clone(AllGenerations), nil
	}
	var out []Generation
	for _, f := range strings.Split(value, ",") {
		g := Generation(strings.TrimSpace(f))
		if !slices.Contains(AllGenerations, g) {
			return nil, fmt.Errorf("unknown daemon generation %q; use a comma-separated list of %v", g, AllGenerations)
		}
		if !slices.Contains(out, g) {
			out = append(out, g)
		}
	}
	return out, nil
}

// Docker 29's pins, as testbed/provision.sh builds them: keep the two in step.
const (
	docker29Moby       = "v2.0.0-beta.24"
	docker29Containerd = "v2.4.2"
	docker29Runc       = "v1.5.3"
)

// docker29Binaries are what provision.sh puts in Docker29Dir.
var docker29Binaries = []string{"dockerd", "docker-proxy", "containerd", "containerd-shim-runc-v2", "runc"}

// Docker29Dir is where provision.sh builds Docker 29: $DOCKER29_DIR, or else its directory in the
// cache, named after every pinned version.
func Docker29Dir() string {
	if d := os.Getenv("DOCKER29_DIR"); d != "" {
		return d
	}
	return filepath.Join("/var/cache/envoy-docker-shim",
		"docker29-moby-"+docker29Moby+"-containerd-"+docker29Containerd+"-runc-"+docker29Runc)
}

// RequireDocker29 skips the test (fails it under CI=true) unless Docker 29's binaries are in
// Docker29Dir, and returns that directory. It implies RequireDocker: the docker CLI and iproute2
// come from the system.
func RequireDocker29(t testing.TB) string {
	t.Helper()
	RequireDocker(t)
	dir := Docker29Dir()
	var absent []string
	for _, name := range docker29Binaries {
		if checkExecutable(filepath.Join(dir, name)) != nil {
			absent = append(absent, name)
		}
	}
	if len(absent) > 0 {
		missing(t, fmt.Sprintf("Docker 29 is not built: %s missing in %s", strings.Join(absent, ", "), dir),
			ProvisionHint+" (it builds Docker 29 from the Go module proxy), or point DOCKER29_DIR at such a build")
	}
	return dir
}
