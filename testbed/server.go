package testbed

import (
	"os"
	"path/filepath"
	"testing"
)

// SysctlStandIn creates a stand-in for the host's /proc/sys/net holding the settings
// envoy-docker-server writes (EDS_SYSCTL_NET), each 0, and returns its path. A server given it
// does what it does on a real host there, and leaves the machine's kernel, which other tests share,
// as it is.
func SysctlStandIn(t testing.TB) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "proc-sys-net")
	for _, f := range []string{"ipv4/ip_forward", "ipv6/conf/all/forwarding", "ipv6/conf/default/forwarding", "ipv4/tcp_migrate_req"} {
		p := filepath.Join(dir, f)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte("0\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// ServerHostEnv is the environment that keeps an envoy-docker-server binary a test runs for
// daemon d off the machine's own network settings, its shipped behaviour otherwise on: its
// netfilter rules go to a table of its own (inet eds_srv_<bridge>), removed when it stops and by
// the sweep if its test dies, and its sysctl writes to a stand-in (SysctlStandIn). With the
// shipped defaults it would keep its rules for d's bridge in the host's table envoy_docker_shim
// after the test, masquerading whatever daemon the slot's next test runs.
func ServerHostEnv(t testing.TB, d *Daemon) []string {
	t.Helper()
	return []string{
		"EDS_NETFILTER_TABLE=eds_srv_" + d.Bridge,
		"EDS_NETFILTER_KEEP=false",
		"EDS_SYSCTL_NET=" + SysctlStandIn(t),
	}
}
