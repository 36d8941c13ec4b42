package installer_test

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/shim/installer"
	"github.com/envoy-docker-shim/envoy-docker-shim/shim/shimtest"
	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
)

const shimPkg = "github.com/envoy-docker-shim/envoy-docker-shim/shim/cmd/envoy-docker-shim"

// TestE2EDaemonJSONOnRealDockerd: the daemon.json the installer writes, on an operator's IPv6
// configuration, is one that dockerd 20.10 and 29 start from. A port published then is served by
// the shim on IPv4 and IPv6 and DNATed by neither family's rules: Docker 27 and later keep
// ip6tables on when only iptables is off, and would DNAT IPv6 clients straight to the container,
// past Envoy. Each dockerd runs in a network namespace of the test's own, so whatever rules it
// makes go with it.
func TestE2EDaemonJSONOnRealDockerd(t *testing.T) {
	testbed.RequireDocker(t)
	if !testbed.HostHasIPv6() {
		testbed.Missing(t, "IPv6 in the kernel (net.ipv6.conf.all.disable_ipv6=0)", "the test publishes a port on an IPv6 network")
	}
	ip6tablesSave := testbed.RequireTool(t, "ip6tables-save", testbed.ProvisionHint+" (Debian package iptables)")
	shim := testbed.BuildStatic(t, shimPkg, "envoy-docker-shim")
	for _, gen := range testbed.Generations(t) {
		t.Run(string(gen), func(t *testing.T) {
			socket := filepath.Join(t.TempDir(), "shim.sock")
			registrar := shimtest.StartRegistrar(t, socket, nil)
			operators := fmt.Sprintf(`{"ipv6": true, "fixed-cidr-v6": %q, "log-level": "info"}`, testbed.RandomULA(t)(1))
			merged, _, changed, err := installer.Merge([]byte(operators), shim)
			if err != nil || !changed {
				t.Fatalf("Merge: changed=%v err=%v", changed, err)
			}
			ns, err := testbed.NewNetns()
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { ns.Close() })
			d := testbed.StartDaemon(t, testbed.DaemonOptions{
				Generation: gen, NetNS: ns, ConfigJSON: string(merged), Env: []string{"EDS_SHIM_SOCKET=" + socket},
			})
			port := testbed.FreePort(t)
			c := d.Run(t, testbed.RunOptions{Publish: []string{fmt.Sprintf("%d:7", port)}})

			var nat string
			if err := testbed.InNetns(ns, func() error {
				out, err := exec.Command(ip6tablesSave, "-t", "nat").CombinedOutput()
				nat = string(out)
				return err
			}); err != nil {
				t.Fatalf("ip6tables-save: %v\n%s", err, nat)
			}
			if strings.Contains(nat, "DNAT") {
				t.Errorf("dockerd DNATs IPv6 published ports past the shim (and Envoy):\n%s", nat)
			}
			var hosts []string
			for _, o := range registrar.Opens() {
				hosts = append(hosts, o.Mapping.HostIP.String())
			}
			if slices.Sort(hosts); !slices.Equal(hosts, []string{"0.0.0.0", "::"}) {
				t.Errorf("the shim registered host addresses %q, want 0.0.0.0 and :: once each", hosts)
			}
			// While the bridge's IPv6 address is still in duplicate address detection (a second or
			// two after dockerd starts), the kernel connects to a container from ::1, which never
			// gets an answer: stock docker-proxy hangs the same way. Not what this test is about.
			testbed.WaitFor(t, 10*time.Second, "the bridge's IPv6 address past duplicate address detection", func() error {
				var out []byte
				err := testbed.InNetns(ns, func() (err error) {
					out, err = exec.Command("ip", "-6", "addr", "show", "dev", d.Bridge, "scope", "global").CombinedOutput()
					return err
				})
				if err == nil && (!strings.Contains(string(out), "inet6") || strings.Contains(string(out), "tentative")) {
					err = fmt.Errorf("%s", out)
				}
				return err
			})
			for _, addr := range []string{fmt.Sprintf("127.0.0.1:%d", port), fmt.Sprintf("[::1]:%d", port)} {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				got, err := testbed.TCPEchoFrom(ctx, ns, addr, []byte("WHOAMI\n"))
				cancel()
				if err != nil || strings.TrimSpace(string(got)) != c.Name {
					t.Errorf("%s: %q, %v; want the container's name %s", addr, got, err, c.Name)
				}
			}
		})
	}
}
