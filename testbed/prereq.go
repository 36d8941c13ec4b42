package testbed

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// ProvisionHint tells a human how to get what a skipped or failed test was missing.
const ProvisionHint = "run `make provision` (testbed/provision.sh) as root"

// sbinDirs are searched besides $PATH because `go test` run through sudo or by an unprivileged
// user's shell often lacks the sbin directories where Debian puts dockerd and docker-proxy.
var sbinDirs = []string{"/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"}

// ciMode reports CI=true: there, a missing prerequisite means a broken CI machine, and skipping
// would turn the whole end-to-end suite into a silent pass.
func ciMode() bool {
	v, _ := strconv.ParseBool(os.Getenv("CI"))
	return v
}

// missing skips the test, or fails it under CI, naming what is missing and how to get it.
func missing(t testing.TB, what, how string) {
	t.Helper()
	if ciMode() {
		t.Fatalf("prerequisite missing under CI=true: %s; %s", what, how)
	}
	t.Skipf("skipping: %s; %s", what, how)
}

// RequireRoot skips the test (fails it under CI=true) unless it runs as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		missing(t, "the test must run as root (it starts dockerd and creates bridges)", "run go test as root, e.g. `sudo -E make e2e`")
	}
}

// RequireDocker skips the test (fails it under CI=true) unless it runs as root on a machine with
// dockerd, containerd, runc and the docker CLI. End-to-end tests are skipped under -short
// whatever CI says, because `make unit` means "no daemons".
func RequireDocker(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("skipping end-to-end test in -short mode")
	}
	RequireRoot(t)
	var absent []string
	for _, tool := range []string{"dockerd", "containerd", "containerd-shim-runc-v2", "runc", "docker", "ip"} {
		if _, err := lookTool(tool); err != nil {
			absent = append(absent, tool)
		}
	}
	if len(absent) > 0 {
		missing(t, "not installed: "+strings.Join(absent, ", "), ProvisionHint+" (Debian packages docker.io and iproute2)")
	}
}

// EnvoyBinary returns $ENVOY_BIN, or else the binary that provision.sh installs for
// $ENVOY_VERSION (default 1.40.0), and skips the test (fails it under CI=true) if it is absent.
func EnvoyBinary(t testing.TB) string {
	t.Helper()
	path := os.Getenv("ENVOY_BIN")
	if path == "" {
		path = defaultEnvoyPath()
	}
	if err := checkExecutable(path); err != nil {
		missing(t, fmt.Sprintf("no Envoy binary: %v", err), ProvisionHint+", or point ENVOY_BIN at an Envoy binary")
	}
	return path
}

// defaultEnvoyPath is where provision.sh installs Envoy; keep the two in step.
func defaultEnvoyPath() string {
	version := os.Getenv("ENVOY_VERSION")
	if version == "" {
		version = "1.40.0"
	}
	return filepath.Join("/var/cache/envoy-docker-shim", "envoy-"+version, "envoy")
}

func checkExecutable(path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	if fi.IsDir() || fi.Mode().Perm()&0o111 == 0 {
		return fmt.Errorf("%s is not an executable file", path)
	}
	return nil
}

// lookTool finds a program in $PATH or else in the sbin directories.
func lookTool(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, dir := range sbinDirs {
		p := filepath.Join(dir, name)
		if checkExecutable(p) == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found in $PATH or %s", name, strings.Join(sbinDirs, ", "))
}

// DockerProxyBinary returns the stock docker-proxy, and skips the test (fails it under CI=true)
// if it is absent.
func DockerProxyBinary(t testing.TB) string {
	t.Helper()
	p, err := lookDockerProxy()
	if err != nil {
		missing(t, err.Error(), ProvisionHint+" (Debian package docker.io)")
	}
	return p
}

// lookDockerProxy finds the stock userland proxy where Debian and upstream packages put it.
func lookDockerProxy() (string, error) {
	for _, p := range []string{"/usr/sbin/docker-proxy", "/usr/bin/docker-proxy", "/usr/libexec/docker/docker-proxy"} {
		if checkExecutable(p) == nil {
			return p, nil
		}
	}
	return lookTool("docker-proxy")
}

// toolEnv is the environment for programs the harness starts: the test's own, with the sbin
// directories appended to PATH so dockerd finds containerd, runc and docker-init.
func toolEnv(extra ...string) []string {
	env := os.Environ()
	path := os.Getenv("PATH")
	have := map[string]bool{}
	for _, d := range filepath.SplitList(path) {
		have[d] = true
	}
	for _, d := range sbinDirs {
		if !have[d] {
			path += string(filepath.ListSeparator) + d
		}
	}
	env = append(env, "PATH="+path)
	return append(env, extra...)
}

// Missing skips the test, or fails it under CI=true, saying what is missing and how to get it:
// for prerequisites the helpers here do not cover.
func Missing(t testing.TB, what, how string) {
	t.Helper()
	missing(t, what, how)
}

// RequireTool returns the path of the program name, found in $PATH or the sbin directories, and
// skips the test (fails it under CI=true) when it is not installed; how says how to get it.
func RequireTool(t testing.TB, name, how string) string {
	t.Helper()
	p, err := lookTool(name)
	if err != nil {
		missing(t, err.Error(), how)
	}
	return p
}
