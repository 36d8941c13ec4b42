package testbed

import (
	"fmt"
	mathrand "math/rand/v2"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

func TestMentionsDir(t *testing.T) {
	const dir = "/tmp/eds-testbed/d1-0a1b2c3d"
	tests := []struct {
		s    string
		want bool
	}{
		{"dockerd --data-root /tmp/eds-testbed/d1-0a1b2c3d/data", true},
		{"containerd --config /tmp/eds-testbed/d1-0a1b2c3d/exec/containerd/containerd.toml", true},
		{"-H unix:///tmp/eds-testbed/d1-0a1b2c3d/docker.sock", true},
		{"/tmp/eds-testbed/d1-0a1b2c3d", true},
		{"--root=/tmp/eds-testbed/d1-0a1b2c3d ", true},
		{"/tmp/eds-testbed/d1-0a1b2c3dd/data", false}, // a sibling with a longer name
		{"/tmp/eds-testbed/d1-0a1b2c3d.old", false},
		{"/tmp/eds-testbed/d1-0a1b2c3dX /tmp/eds-testbed/d1-0a1b2c3d/x", true},
		{"/tmp/eds-testbed/d12-0a1b2c3d", false},
		{"docker-proxy -proto tcp -host-ip 127.0.0.1", false},
		{"", false},
	}
	for _, tt := range tests {
		if got := mentionsDir(tt.s, dir); got != tt.want {
			t.Errorf("mentionsDir(%q) = %v, want %v", tt.s, got, tt.want)
		}
	}
}

func TestHasEnvEntry(t *testing.T) {
	env := []byte("PATH=/bin\x00EDS_TESTBED_INSTANCE=/tmp/x/d1-00000000\x00HOME=/root")
	tests := []struct {
		entry string
		want  bool
	}{
		{"EDS_TESTBED_INSTANCE=/tmp/x/d1-00000000", true},
		{"EDS_TESTBED_INSTANCE=/tmp/x/d1-0000000", false},
		{"EDS_TESTBED_INSTANCE=/tmp/x/d1-000000000", false},
		{"HOME=/root", true},
	}
	for _, tt := range tests {
		if got := hasEnvEntry(env, []byte(tt.entry)); got != tt.want {
			t.Errorf("hasEnvEntry(%q) = %v, want %v", tt.entry, got, tt.want)
		}
	}
}

func TestParseMountinfo(t *testing.T) {
	const info = `22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:26 / /sys/fs/cgroup/pids rw,nosuid shared:9 - cgroup cgroup rw,pids
31 22 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw
90 22 254:0 /tmp/eds-testbed/d3-0a1b2c3d/data /tmp/eds-testbed/d3-0a1b2c3d/data rw,relatime - ext4 /dev/vda rw
91 90 0:50 / /tmp/eds-testbed/d3-0a1b2c3d/data/overlay2/abc/merged rw,relatime - overlay overlay rw,lowerdir=x
92 22 0:4 net:[4026532300] /tmp/eds-testbed/d3-0a1b2c3d/exec/netns/c5cf5a123554 rw shared:2 - nsfs nsfs rw
93 22 0:51 / /tmp/eds-testbed/d3-0a1b2c3dd/data rw - ext4 /dev/vda rw
94 22 0:52 / /tmp/with\040space rw - tmpfs tmpfs rw
`
	all, err := parseMountinfo(strings.NewReader(info))
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 8 {
		t.Fatalf("parsed %d mounts, want 8", len(all))
	}
	if all[1] != (mount{point: "/sys/fs/cgroup/pids", fstype: "cgroup"}) || all[2].fstype != "cgroup2" {
		t.Errorf("cgroup mounts parsed as %+v, %+v", all[1], all[2])
	}
	if all[7].point != "/tmp/with space" {
		t.Errorf("octal escape: got %q", all[7].point)
	}
	got := mountsUnder(all, "/tmp/eds-testbed/d3-0a1b2c3d")
	want := []string{
		"/tmp/eds-testbed/d3-0a1b2c3d/data/overlay2/abc/merged",
		"/tmp/eds-testbed/d3-0a1b2c3d/exec/netns/c5cf5a123554",
		"/tmp/eds-testbed/d3-0a1b2c3d/data",
	}
	if !slices.Equal(got, want) {
		t.Errorf("mountsUnder = %q, want deepest first %q", got, want)
	}
	if _, err := parseMountinfo(strings.NewReader("bogus line\n")); err == nil {
		t.Error("parseMountinfo accepted a line without the separator")
	}
}

func TestUnescapeOctal(t *testing.T) {
	tests := map[string]string{
		`/a\040b`:   "/a b",
		`/a\011b`:   "/a\tb",
		`/a\134b`:   `/a\b`,
		`/end\040`:  "/end ",
		`/short\04`: `/short\04`,
		`/not\09x`:  `/not\09x`,
		`/plain`:    "/plain",
		`\040\040`:  "  ",
	}
	for in, want := range tests {
		if got := unescapeOctal(in); got != want {
			t.Errorf("unescapeOctal(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestShimSocketPath(t *testing.T) {
	// Observed on this machine: containerd 1.6's shim for task 5ac08002... in namespace edsx
	// created /run/containerd/s/263a4de5...
	got := shimSocketPath("/tmp/edsx/exec/containerd/containerd.sock", "edsx",
		"5ac0800274a2b4d0fe952755d5258484e99b065981c26ad065dab5a29fd83165")
	want := "/run/containerd/s/263a4de51267613b2c2ff769f20aa0a52244307431e4f68a5aef2bd8911544a4"
	if got != want {
		t.Errorf("shimSocketPath = %s, want %s", got, want)
	}
}

func TestParseInstanceName(t *testing.T) {
	tests := []struct {
		name string
		kind instanceKind
		slot int
		ok   bool
	}{
		{"d3-0a1b2c3d", kindDaemon, 3, true},
		{"e120-ffffffff", kindEnvoy, 120, true},
		{"d3-0A1B2C3D", "", 0, false},
		{"d3-0a1b2c3", "", 0, false},
		{"x3-0a1b2c3d", "", 0, false},
		{"ports", "", 0, false},
		{".lock", "", 0, false},
	}
	for _, tt := range tests {
		kind, slot, ok := parseInstanceName(tt.name)
		if kind != tt.kind || slot != tt.slot || ok != tt.ok {
			t.Errorf("parseInstanceName(%q) = %q, %d, %v; want %q, %d, %v", tt.name, kind, slot, ok, tt.kind, tt.slot, tt.ok)
		}
	}
}

func TestParseBridges(t *testing.T) {
	out := `[{"ifindex":5,"ifname":"edsb3","flags":["UP"],"addr_info":[{"family":"inet","local":"172.29.3.1","prefixlen":24}]},
	{"ifindex":9,"ifname":"br-0123456789ab","addr_info":[{"family":"inet","local":"172.28.3.33","prefixlen":27}]},
	{"ifindex":11,"ifname":"edsb4","addr_info":[]}]`
	got, err := parseBridges([]byte(out))
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 3 || got[0].Name != "edsb3" || got[0].Index != 5 || got[0].Addrs[0] != netip.MustParsePrefix("172.29.3.1/24") {
		t.Fatalf("parseBridges = %+v", got)
	}
	pool := netip.MustParsePrefix("172.28.3.0/24")
	if !addrsWithin(got[1].Addrs, pool) || addrsWithin(got[0].Addrs, pool) || addrsWithin(got[2].Addrs, pool) {
		t.Errorf("addrsWithin misjudged which bridges are in %s", pool)
	}
}

func TestParseTables(t *testing.T) {
	listing := "table inet eds_edse2e68babfcd\ntable inet envoy_docker_shim\ntable ip nat\ntable inet eds_e2e_edsb40\n\n"
	var got []string
	var ours []bool
	for _, tb := range parseTables(listing) {
		got, ours = append(got, tb.String()), append(ours, tb.ours())
	}
	if want := []string{"inet eds_edse2e68babfcd", "inet envoy_docker_shim", "ip nat", "inet eds_e2e_edsb40"}; !slices.Equal(got, want) {
		t.Errorf("parseTables = %q, want %q", got, want)
	}
	if want := []bool{true, false, false, true}; !slices.Equal(ours, want) {
		t.Errorf("ours = %v, want %v", ours, want)
	}
}

func TestOrphanTable(t *testing.T) {
	listing := `table inet eds_edse2e2e17817c {
	chain forward {
		iifname "edsb40" oifname != "edsb40" jump isolation comment "edsb40 (bridge): to another network: isolation"
		iifname "br-0123456789ab" oifname "edsb7" accept comment "br-0123456789ab (eds-a): isolation"
		iifname "edsb400x" accept
	}
}`
	bridges := tableBridges(listing)
	if want := []string{"edsb40", "edsb7"}; !slices.Equal(bridges, want) {
		t.Fatalf("tableBridges = %q, want %q", bridges, want)
	}
	none := func(string) bool { return false }
	tests := []struct {
		name    string
		bridges []string
		owned   map[string]bool
		exists  func(string) bool
		want    bool
	}{
		{"no instance, no link", bridges, nil, none, true},
		{"one bridge owned by a live instance", bridges, map[string]bool{"edsb7": true}, none, false},
		{"one bridge exists (another testbed root)", bridges, nil, func(b string) bool { return b == "edsb40" }, false},
		{"names no testbed bridge", nil, nil, none, false},
	}
	for _, tt := range tests {
		if got := orphanTable(tt.bridges, tt.owned, tt.exists); got != tt.want {
			t.Errorf("%s: orphanTable = %v, want %v", tt.name, got, tt.want)
		}
	}
}

// TestSweepRemovesOrphanTables: the tables a killed test's server kept are gone by the time the
// next instance is handed out; a table whose bridge exists, or that names none, stays.
func TestSweepRemovesOrphanTables(t *testing.T) {
	RequireRoot(t)
	nft, err := exec.LookPath("nft")
	if err != nil {
		missing(t, "the nft command", ProvisionHint+" (Debian package nftables)")
	}
	n := 5000 + mathrand.IntN(4000) // beyond any slot: no instance's bridge
	live, gone := fmt.Sprintf("%s%d", bridgePrefix, n), fmt.Sprintf("%s%d", bridgePrefix, n+1)
	suffix := randomHex(4)
	tables := map[string]string{ // name: the bridge its rule names
		testTablePrefix + "sweep_orphan_" + suffix: gone,
		testTablePrefix + "sweep_live_" + suffix:   live,
		testTablePrefix + "sweep_none_" + suffix:   "",
	}
	err = withGlobalLock(func(root string) error {
		// A veth, not a bridge: the sweep deletes edsb* bridges no instance owns.
		if out, err := exec.Command("ip", "link", "add", live, "type", "veth", "peer", "name", live+"p").CombinedOutput(); err != nil {
			return fmt.Errorf("ip link add %s: %v: %s", live, err, out)
		}
		defer exec.Command("ip", "link", "del", live).Run()
		for name, bridge := range tables {
			script := fmt.Sprintf("table inet %s {\n chain c {\n", name)
			if bridge != "" {
				script += fmt.Sprintf("  iifname %q accept\n", bridge)
			}
			script += " }\n}\n"
			cmd := exec.Command(nft, "-f", "-")
			cmd.Stdin = strings.NewReader(script)
			if out, err := cmd.CombinedOutput(); err != nil {
				return fmt.Errorf("nft -f: %v: %s", err, out)
			}
			t.Cleanup(func() { _ = exec.Command(nft, "delete", "table", "inet", name).Run() })
		}
		sweepStale(root, t.Logf)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for name, bridge := range tables {
		exists := exec.Command(nft, "list", "table", "inet", name).Run() == nil
		if want := bridge != gone; exists != want {
			t.Errorf("table %s (naming %q): exists %v after the sweep, want %v", name, bridge, exists, want)
		}
	}
}

// The tables a table listing mentions: a leftover masquerading a test's bridge shows by the
// bridge's quoted name or by its subnet; a longer bridge name is another bridge.
func TestMentioning(t *testing.T) {
	tables := []nftTable{
		{family: "inet", name: "envoy_docker_shim", listing: `table inet envoy_docker_shim {
	chain postrouting {
		ip saddr 172.29.40.0/24 oifname != "edsb40" masquerade
	}
}`},
		{family: "inet", name: "eds_e2e_edsb41", listing: `table inet eds_e2e_edsb41 {
	chain forward {
		iifname "edsb41" accept
		oifname "edsb41" accept
	}
}`},
		{family: "ip", name: "nat", listing: "table ip nat {\n}"},
	}
	tests := []struct {
		needles []string
		want    []string
	}{
		{[]string{`"edsb40"`, "172.29.40.0/24"}, []string{"inet envoy_docker_shim"}},
		{[]string{`"edsb41"`, "172.29.41.0/24"}, []string{"inet eds_e2e_edsb41"}},
		{[]string{`"edsb4"`, "172.29.4.0/24"}, nil},
	}
	for _, tt := range tests {
		var got []string
		for _, tb := range mentioning(tables, tt.needles) {
			got = append(got, tb.String())
		}
		if !slices.Equal(got, tt.want) {
			t.Errorf("mentioning(%q) = %q, want %q", tt.needles, got, tt.want)
		}
	}
}
