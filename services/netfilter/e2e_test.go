package netfilter_test

import (
	"bufio"
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/services/netfilter"
	"github.com/envoy-docker-shim/envoy-docker-shim/shim/installer"
	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
	"github.com/envoy-docker-shim/envoy-docker-shim/testbed/stack"
)

const shimPkg = "github.com/envoy-docker-shim/envoy-docker-shim/shim/cmd/envoy-docker-shim"

// Bounds of one probe: an answer takes milliseconds, so a probe that must get through has
// plenty of time, and one that must not is given up on after a while (a dropped packet has no
// answer; only a timeout tells).
const (
	reachTimeout   = 5 * time.Second
	blockedTimeout = 1500 * time.Millisecond
)

// TestE2ENetfilter: what "iptables": false takes away, the server gives back. A private dockerd
// with --iptables=false (and --ip-forward=false: nothing of dockerd's own) runs the shim; an
// outside host in a network namespace of the test's own has no route to container subnets.
//
//   - Without the server's rules, a container reaches nothing outside (even with forwarding on:
//     its address cannot be answered) and a container on network A reaches one on network B.
//   - With them: containers on the default bridge and on user-defined networks reach the outside
//     host over TCP and UDP, IPv4 and IPv6 (where the kernel has it), seen at the host's address;
//     A cannot open a connection to B; containers of one network still talk; forwarding is on.
//   - A network created after the start gets the same; a removed one leaves no rule.
//   - A published port goes through the shim and Envoy, and no DNAT rule exists anywhere.
//   - The server stopping keeps the rules (EDS_NETFILTER_KEEP, the default): outbound still works.
//   - Uninstalling removes them; the server, still running, does not restore them; stopped, it
//     leaves the host's ruleset exactly as before the test.
func TestE2ENetfilter(t *testing.T) {
	testbed.RequireDocker(t)
	nft := lookNft(t)
	ipv6 := testbed.HostHasIPv6()
	forwarding := saveForwarding(t, ipv6)

	dir := t.TempDir()
	runDir := filepath.Join(dir, "run")
	if err := os.MkdirAll(runDir, 0o755); err != nil {
		t.Fatal(err)
	}
	socket, shimSocket := filepath.Join(runDir, "server.sock"), filepath.Join(runDir, "shim.sock")
	shim := testbed.BuildStatic(t, shimPkg, "envoy-docker-shim")
	ula := testbed.RandomULA(t)
	opts := testbed.DaemonOptions{UserlandProxyPath: shim, Env: []string{"EDS_SHIM_SOCKET=" + shimSocket}}
	if ipv6 {
		opts.ExtraArgs = []string{"--ipv6", "--fixed-cidr-v6", ula(0)}
	}
	d := testbed.StartDaemon(t, opts)
	table := netfilter.Table{Name: "eds_e2e_" + d.Bridge}
	before := ruleset(t, nft, table.Name)
	if strings.Contains(before, table.Name) {
		t.Fatalf("table %s exists before the test:\n%s", table, before)
	}
	others, err := testbed.NftTablesMentioning(`"`+d.Bridge+`"`, d.Subnet.String())
	if err != nil {
		t.Fatal(err)
	}
	if len(others) > 0 {
		t.Fatalf("%s already have rules for this test's bridge %s (%s), left by a run that did not clean up: "+
			"they would answer for the rules under test; delete them (nft delete table <family> <name>) and run again", strings.Join(others, ", "), d.Bridge, d.Subnet)
	}
	outside := testbed.StartOutside(t, d)

	bridgeA := createNetwork(t, d, "eds-a", ipv6, ula(0xa))
	bridgeB := createNetwork(t, d, "eds-b", ipv6, ula(0xb))
	c0 := d.Run(t, testbed.RunOptions{})
	ca := d.Run(t, testbed.RunOptions{Flags: []string{"--network", "eds-a"}})
	ca2 := d.Run(t, testbed.RunOptions{Flags: []string{"--network", "eds-a"}})
	cb := d.Run(t, testbed.RunOptions{Flags: []string{"--network", "eds-b"}})
	ns := map[*testbed.Container]*os.File{}
	for _, c := range []*testbed.Container{c0, ca, ca2, cb} {
		ns[c] = d.ContainerNetns(t, c)
	}
	outbound := func(want bool, from ...*testbed.Container) []probe {
		var ps []probe
		for _, c := range from {
			for _, proto := range []string{"tcp", "udp"} {
				ps = append(ps, outsideProbe(outside, ns[c], c.Name, proto, outside.Addr4, outside.HostAddr4, want))
				if ipv6 {
					ps = append(ps, outsideProbe(outside, ns[c], c.Name, proto, outside.Addr6, outside.HostAddr6, want))
				}
			}
		}
		return ps
	}

	// Without the rules. Forwarding on, so that what fails is the missing NAT, not forwarding.
	forwarding.set(t, "1")
	check(t, "without the server's rules",
		append(outbound(false, c0, ca),
			echoProbe(ns[ca], ca.Name, "tcp", cb, true), // no isolation either
		)...)

	// Forwarding back off where the test found it off: the server must turn it on.
	forwarding.restore(t)
	st := stack.Start(t, stack.Options{DockerHost: d.Host, Socket: socket, ShimSocket: shimSocket, NetfilterTable: table.Name, NetfilterKeep: true})
	waitRules(t, table, true, d.Bridge, bridgeA, bridgeB)
	forwarding.expectOn(t)
	isolated := func(from, to *testbed.Container) []probe {
		return []probe{echoProbe(ns[from], from.Name, "tcp", to, false), echoProbe(ns[from], from.Name, "udp", to, false)}
	}
	check(t, "with the server's rules", slicesConcat(
		outbound(true, c0, ca, cb),
		isolated(ca, cb), isolated(cb, ca), isolated(c0, ca), isolated(ca, c0),
		[]probe{echoProbe(ns[ca], ca.Name, "tcp", ca2, true), echoProbe(ns[ca], ca.Name, "udp", ca2, true)},
	)...)

	// A network created while the server runs gets the same; removed, it leaves no rule.
	bridgeC := createNetwork(t, d, "eds-c", ipv6, ula(0xc))
	cc := d.Run(t, testbed.RunOptions{Flags: []string{"--network", "eds-c"}})
	ns[cc] = d.ContainerNetns(t, cc)
	waitRules(t, table, true, bridgeC)
	check(t, "a network created later", slicesConcat(outbound(true, cc), isolated(cc, cb), isolated(cb, cc))...)
	d.Remove(t, cc)
	d.MustDocker(t, "network", "rm", "eds-c")
	waitRules(t, table, false, bridgeC)
	waitRules(t, table, true, d.Bridge, bridgeA, bridgeB)

	// A published port goes through the shim and Envoy; nothing DNATs it.
	port := testbed.FreePort(t)
	web := d.Run(t, testbed.RunOptions{Publish: []string{fmt.Sprintf("127.0.0.1:%d:80", port)}, Flags: []string{"--network", "eds-a"}})
	status, body, err := testbed.HTTPGet(context.Background(), fmt.Sprintf("http://127.0.0.1:%d/", port))
	if err != nil || status != 200 || !strings.Contains(body, web.Name) {
		t.Fatalf("published port: %d %q %v", status, body, err)
	}
	if listeners := string(st.Envoy.Admin(t, "/listeners")); !strings.Contains(listeners, fmt.Sprintf("127.0.0.1_%d", port)) {
		t.Errorf("Envoy has no listener for the published port %d:\n%s", port, listeners)
	}
	noDNAT(t, nft, table, port, web.IP)

	// Stopped (with EDS_NETFILTER_KEEP), the server leaves its rules: new outbound connections
	// keep working while it is down.
	want, _, err := table.Current()
	if err != nil {
		t.Fatal(err)
	}
	st.StopServer(t)
	if have, exists, err := table.Current(); err != nil || !exists || strings.Join(have, "\n") != strings.Join(want, "\n") {
		t.Fatalf("after the server stopped: exists=%v err=%v\n%s", exists, err, strings.Join(have, "\n"))
	}
	check(t, "while the server is stopped", outbound(true, c0)...)

	// Uninstall while the (restarted) server runs: the rules go, and a network event does not
	// bring them back; stopped, the server leaves the ruleset as the test found it.
	st.StartServer(t)
	r, err := installer.Installer{
		Config: installer.Config{
			InstallDir: filepath.Join(dir, "bin"), InstallMount: filepath.Join(dir, "bin"), ShimName: "envoy-docker-shim",
			ShimSource: shim, DaemonJSON: filepath.Join(dir, "daemon.json"), DaemonJSONHost: "/etc/docker/daemon.json",
			Uninstall: true, NftTable: table.Name, RunMount: runDir,
		},
		RemoveTable: func(name string) (bool, error) { return netfilter.Table{Name: name}.Remove() },
	}.Run(context.Background())
	if err != nil || !r.TableRemoved {
		t.Fatalf("uninstall: removed=%v err=%v", r.TableRemoved, err)
	}
	d.MustDocker(t, "network", "create", "eds-d") // an event the server reconciles on
	time.Sleep(time.Second)
	if have, exists, err := table.Current(); exists || err != nil {
		t.Fatalf("the running server restored its rules after uninstall (err %v):\n%s", err, strings.Join(have, "\n"))
	}
	st.StopServer(t)
	if after := ruleset(t, nft, table.Name); after != before {
		t.Errorf("the host's ruleset after uninstall and stop differs from before the test:\n--- before\n%s\n--- after\n%s", before, after)
	}
}

// probe is one connection attempt from a container, run alongside the others.
type probe struct {
	name string
	want bool // whether it must get through
	run  func(ctx context.Context) (string, error)
	// expect checks an answer that got through.
	expect string
}

// check runs the probes at once and reports every one that did not behave.
func check(t *testing.T, phase string, ps ...probe) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make([]string, len(ps))
	for i, p := range ps {
		wg.Add(1)
		go func() {
			defer wg.Done()
			timeout := reachTimeout
			if !p.want {
				timeout = blockedTimeout
			}
			ctx, cancel := context.WithTimeout(context.Background(), timeout)
			defer cancel()
			got, err := p.run(ctx)
			switch {
			case p.want && err != nil:
				errs[i] = fmt.Sprintf("%s: want through, got %v", p.name, err)
			case p.want && got != p.expect:
				errs[i] = fmt.Sprintf("%s: answer %q, want %q", p.name, got, p.expect)
			case !p.want && err == nil:
				errs[i] = fmt.Sprintf("%s: want blocked, got answer %q", p.name, got)
			case !p.want && !testbed.IsTimeout(err):
				errs[i] = fmt.Sprintf("%s: want blocked (no answer), got %v", p.name, err)
			}
		}()
	}
	wg.Wait()
	var bad []string
	for _, e := range errs {
		if e != "" {
			bad = append(bad, e)
		}
	}
	if len(bad) > 0 {
		t.Fatalf("%s: %d of %d probes wrong:\n  %s", phase, len(bad), len(ps), strings.Join(bad, "\n  "))
	}
	t.Logf("%s: %d probes as expected", phase, len(ps))
}

// outsideProbe asks the outside host at addr which address it sees: through, it must be the
// host's (masquerade).
func outsideProbe(o *testbed.Outside, ns *os.File, from, proto string, addr, hostAddr netip.Addr, want bool) probe {
	return probe{
		name: fmt.Sprintf("%s -> outside %s %s", from, proto, addr), want: want, expect: hostAddr.String(),
		run: func(ctx context.Context) (string, error) {
			seen, err := o.Ask(ctx, ns, proto, addr)
			return seen.String(), err
		},
	}
}

// echoProbe asks container to's echo server for its name.
func echoProbe(ns *os.File, from, proto string, to *testbed.Container, want bool) probe {
	target := netip.AddrPortFrom(to.IP, 7).String()
	return probe{
		name: fmt.Sprintf("%s -> %s %s %s", from, to.Name, proto, target), want: want, expect: to.Name,
		run: func(ctx context.Context) (string, error) {
			var b []byte
			var err error
			if proto == "tcp" {
				b, err = testbed.TCPEchoFrom(ctx, ns, target, []byte("WHOAMI\n"))
			} else {
				b, err = testbed.UDPEchoFrom(ctx, ns, target, []byte("WHOAMI"))
			}
			return strings.TrimSpace(string(b)), err
		},
	}
}

func slicesConcat(groups ...[]probe) []probe {
	var out []probe
	for _, g := range groups {
		out = append(out, g...)
	}
	return out
}

// createNetwork creates a user-defined bridge network (with an IPv6 subnet when ipv6) and
// returns its bridge interface.
func createNetwork(t *testing.T, d *testbed.Daemon, name string, ipv6 bool, subnet6 string) string {
	t.Helper()
	args := []string{"network", "create"}
	if ipv6 {
		args = append(args, "--ipv6", "--subnet", subnet6)
	}
	id := d.MustDocker(t, append(args, name)...)
	return "br-" + id[:12]
}

// waitRules waits until the table holds rules for every bridge (present), or for none of them.
func waitRules(t *testing.T, table netfilter.Table, present bool, bridges ...string) {
	t.Helper()
	testbed.WaitFor(t, 10*time.Second, fmt.Sprintf("rules of %v in %s present=%v", bridges, table, present), func() error {
		lines, _, err := table.Current()
		if err != nil {
			return err
		}
		text := strings.Join(lines, "\n")
		for _, b := range bridges {
			if has := strings.Contains(text, "  "+b+" ("); has != present {
				return fmt.Errorf("rules of %s present=%v:\n%s", b, has, text)
			}
		}
		return nil
	})
}

// noDNAT fails the test if any rule on the host DNATs or redirects the published port or the
// container behind it, or if our table holds any DNAT or redirect at all.
func noDNAT(t *testing.T, nft string, table netfilter.Table, port int, ip netip.Addr) {
	t.Helper()
	dnat := regexp.MustCompile(`\b(dnat|redirect)( ip6?)? to\b|-j (DNAT|REDIRECT)\b`)
	own := run(t, nft, "list", "table", "inet", table.Name)
	if m := dnat.FindString(own); m != "" {
		t.Errorf("table %s holds a %q:\n%s", table, m, own)
	}
	all := run(t, nft, "list", "ruleset") + iptablesSave(t)
	sc := bufio.NewScanner(strings.NewReader(all))
	for sc.Scan() {
		line := sc.Text()
		if dnat.MatchString(line) && (strings.Contains(line, fmt.Sprint(port)) || strings.Contains(line, ip.String())) {
			t.Errorf("a DNAT rule on the host sends the published port past Envoy: %s", line)
		}
	}
}

// ruleset is the host's whole ruleset (nft, and iptables-save where iptables is legacy), with
// packet counters blanked (other traffic moves them) and without the tables of other test
// instances running meanwhile (eds_*, each a table of its own that only its test touches).
func ruleset(t *testing.T, nft, own string) string {
	t.Helper()
	var keep []string
	var table []string
	drop := false
	for _, line := range strings.Split(run(t, nft, "list", "ruleset"), "\n") {
		if strings.HasPrefix(line, "table ") {
			f := strings.Fields(line)
			drop = len(f) >= 3 && strings.HasPrefix(f[2], "eds_") && f[2] != own
			table = nil
		}
		table = append(table, line)
		if line == "}" {
			if !drop {
				keep = append(keep, table...)
			}
			table = nil
		}
	}
	keep = append(keep, table...)
	out := strings.Join(keep, "\n") + "\n" + iptablesSave(t)
	out = regexp.MustCompile(`counter packets \d+ bytes \d+`).ReplaceAllString(out, "counter")
	return regexp.MustCompile(`\[\d+:\d+\]`).ReplaceAllString(out, "[-]")
}

// iptablesSave is what iptables-save and ip6tables-save print, without their timestamp comments.
func iptablesSave(t *testing.T) string {
	t.Helper()
	var b strings.Builder
	for _, tool := range []string{"iptables-save", "ip6tables-save"} {
		path, err := exec.LookPath(tool)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(run(t, path), "\n") {
			if !strings.HasPrefix(line, "#") {
				b.WriteString(line + "\n")
			}
		}
	}
	return b.String()
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func lookNft(t *testing.T) string {
	t.Helper()
	for _, p := range []string{"nft", "/usr/sbin/nft"} {
		if path, err := exec.LookPath(p); err == nil {
			return path
		}
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("prerequisite missing under CI=true: the nft command (Debian package nftables); run testbed/provision.sh")
	}
	t.Skip("skipping: no nft command (Debian package nftables); run testbed/provision.sh")
	return ""
}

// forwardingState is the host's forwarding settings as the test found them, put back at the end.
type forwardingState struct {
	files map[string]string
}

func saveForwarding(t *testing.T, ipv6 bool) *forwardingState {
	files := []string{"/proc/sys/net/ipv4/ip_forward"}
	if ipv6 {
		files = append(files, "/proc/sys/net/ipv6/conf/default/forwarding", "/proc/sys/net/ipv6/conf/all/forwarding")
	}
	f := &forwardingState{files: map[string]string{}}
	for _, p := range files {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		f.files[p] = strings.TrimSpace(string(b))
	}
	t.Cleanup(func() { f.restore(t) })
	return f
}

func (f *forwardingState) set(t *testing.T, v string) {
	t.Helper()
	for p := range f.files {
		if err := os.WriteFile(p, []byte(v+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// restore puts the settings back: all before default, since writing all also sets default.
func (f *forwardingState) restore(t *testing.T) {
	t.Helper()
	for _, p := range []string{"/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding", "/proc/sys/net/ipv6/conf/default/forwarding"} {
		if v, ok := f.files[p]; ok {
			if err := os.WriteFile(p, []byte(v+"\n"), 0o644); err != nil {
				t.Error(err)
			}
		}
	}
}

// expectOn checks that forwarding is on, and says whether the server had to turn it on.
func (f *forwardingState) expectOn(t *testing.T) {
	t.Helper()
	testbed.WaitFor(t, 5*time.Second, "forwarding on", func() error {
		for p := range f.files {
			if b, _ := os.ReadFile(p); strings.TrimSpace(string(b)) != "1" {
				return fmt.Errorf("%s = %s", p, b)
			}
		}
		return nil
	})
	for p, v := range f.files {
		if v == "0" {
			t.Logf("the server turned %s on", p)
		}
	}
}
