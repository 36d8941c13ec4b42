package netfilter

import (
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/docker/docker/api/types/network"
)

// Networks as dockerd 20.10 lists them with --iptables=false (see TestFromDocker for the fields
// that matter): the default bridge, user-defined networks with and without IPv6, and networks
// with each option the rules honour.
var (
	defaultBridge = network.Summary{
		Name: "bridge", ID: "e9256f7ffa7920eb14e0eb1468d5a12ecc965343fd1f2444372f0860751d208a", Driver: "bridge", Scope: "local",
		EnableIPv6: true,
		IPAM:       network.IPAM{Config: []network.IPAMConfig{{Subnet: "172.17.0.0/16", Gateway: "172.17.0.1"}, {Subnet: "fd00:ed5:1::/64"}}},
		Options: map[string]string{
			"com.docker.network.bridge.default_bridge":       "true",
			"com.docker.network.bridge.enable_icc":           "true",
			"com.docker.network.bridge.enable_ip_masquerade": "false", // what dockerd reports with iptables off
			"com.docker.network.bridge.name":                 "docker0",
		},
	}
	userNet = network.Summary{
		Name: "web", ID: "54323a8f935599f1d47a6020907a0fa1ec7b08958d7c9595644ea04b885ce85b", Driver: "bridge", Scope: "local",
		IPAM:    network.IPAM{Config: []network.IPAMConfig{{Subnet: "172.18.0.0/16"}, {Subnet: "10.10.0.0/24"}, {Subnet: "fd00:dead::/64"}}},
		Options: map[string]string{},
	}
	internalNet = network.Summary{
		Name: "backend", ID: "0c22c8664d4e0ea893b673a26d886d013922304b72e6eae2c59a059f6980099b", Driver: "bridge", Scope: "local",
		Internal: true,
		IPAM:     network.IPAM{Config: []network.IPAMConfig{{Subnet: "172.19.0.0/16"}}},
		Options:  map[string]string{"com.docker.network.bridge.enable_icc": "false"},
	}
	routedNet = network.Summary{
		Name: "routed", ID: "7f00aa11bb22cc33dd44ee55ff6677889900aabbccddeeff0011223344556677", Driver: "bridge", Scope: "local",
		EnableIPv6: true,
		IPAM:       network.IPAM{Config: []network.IPAMConfig{{Subnet: "192.168.100.0/24"}, {Subnet: "2001:db8:1::/64"}}},
		Options: map[string]string{
			"com.docker.network.bridge.name":                 "routed0",
			"com.docker.network.bridge.gateway_mode_ipv4":    "nat-unprotected",
			"com.docker.network.bridge.gateway_mode_ipv6":    "routed",
			"com.docker.network.bridge.enable_ip_masquerade": "true",
		},
	}
	noMasqNet = network.Summary{
		Name: "plain", ID: "1234567890abcdef1234567890abcdef1234567890abcdef1234567890abcdef", Driver: "bridge", Scope: "local",
		IPAM:    network.IPAM{Config: []network.IPAMConfig{{Subnet: "172.20.0.0/16"}}},
		Options: map[string]string{"com.docker.network.bridge.enable_ip_masquerade": "false"},
	}
)

func TestFromDocker(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   network.Summary
		want Network
		ok   bool
	}{
		{
			name: "default bridge: masqueraded although dockerd says enable_ip_masquerade=false",
			in:   defaultBridge, ok: true,
			want: Network{ID: defaultBridge.ID, Name: "bridge", Bridge: "docker0", ICC: true,
				IPv4: Family{Subnets: []netip.Prefix{netip.MustParsePrefix("172.17.0.0/16")}, Masquerade: true, Protected: true},
				IPv6: Family{Subnets: []netip.Prefix{netip.MustParsePrefix("fd00:ed5:1::/64")}, Masquerade: true, Protected: true}},
		},
		{
			name: "user network: bridge br-<12 hex>, options absent mean on, IPv6 subnet ignored without EnableIPv6, subnets sorted",
			in:   userNet, ok: true,
			want: Network{ID: userNet.ID, Name: "web", Bridge: "br-54323a8f9355", ICC: true,
				IPv4: Family{Subnets: []netip.Prefix{netip.MustParsePrefix("10.10.0.0/24"), netip.MustParsePrefix("172.18.0.0/16")}, Masquerade: true, Protected: true},
				IPv6: Family{Masquerade: true, Protected: true}},
		},
		{
			name: "internal network with icc off: no masquerade",
			in:   internalNet, ok: true,
			want: Network{ID: internalNet.ID, Name: "backend", Bridge: "br-0c22c8664d4e", Internal: true,
				IPv4: Family{Subnets: []netip.Prefix{netip.MustParsePrefix("172.19.0.0/16")}, Protected: true},
				IPv6: Family{Protected: true}},
		},
		{
			name: "gateway modes: nat-unprotected keeps NAT, routed drops it; neither is protected",
			in:   routedNet, ok: true,
			want: Network{ID: routedNet.ID, Name: "routed", Bridge: "routed0", ICC: true,
				IPv4: Family{Subnets: []netip.Prefix{netip.MustParsePrefix("192.168.100.0/24")}, Masquerade: true},
				IPv6: Family{Subnets: []netip.Prefix{netip.MustParsePrefix("2001:db8:1::/64")}}},
		},
		{
			name: "enable_ip_masquerade=false on a user network is the user's choice",
			in:   noMasqNet, ok: true,
			want: Network{ID: noMasqNet.ID, Name: "plain", Bridge: "br-1234567890ab", ICC: true,
				IPv4: Family{Subnets: []netip.Prefix{netip.MustParsePrefix("172.20.0.0/16")}, Protected: true},
				IPv6: Family{Protected: true}},
		},
		{name: "host network", in: network.Summary{Name: "host", ID: "9d8c", Driver: "host", Scope: "local"}},
		{name: "none", in: network.Summary{Name: "none", ID: "8530", Driver: "null", Scope: "local"}},
		{name: "macvlan", in: network.Summary{Name: "lan", ID: "aaaa", Driver: "macvlan", Scope: "local"}},
		{name: "config-only bridge", in: network.Summary{Name: "cfg", ID: "bbbb", Driver: "bridge", ConfigOnly: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := FromDocker(tc.in)
			if ok != tc.ok || !reflect.DeepEqual(got, tc.want) {
				t.Errorf("FromDocker = %+v, %v\nwant %+v, %v", got, ok, tc.want, tc.ok)
			}
		})
	}
}

func TestNetworksSortedByBridge(t *testing.T) {
	got := Networks([]network.Summary{userNet, {Name: "host", Driver: "host"}, defaultBridge, internalNet})
	var bridges []string
	for _, n := range got {
		bridges = append(bridges, n.Bridge)
	}
	if want := []string{"br-0c22c8664d4e", "br-54323a8f9355", "docker0"}; !slices.Equal(bridges, want) {
		t.Errorf("bridges %q, want %q", bridges, want)
	}
}

func TestCheckTable(t *testing.T) {
	for name, ok := range map[string]bool{
		DefaultTable: true, "eds_t3_ab12": true, "A": true,
		"": false, "1abc": false, "with-dash": false, "with space": false, "x;flush ruleset": false,
		strings.Repeat("a", 64): true, strings.Repeat("a", 65): false,
	} {
		if err := CheckTable(name); (err == nil) != ok {
			t.Errorf("CheckTable(%q) = %v, want ok=%v", name, err, ok)
		}
	}
}

// Rules: what each kind of network gets, read from the comments (the kernel's view of the same
// rules is TestRulesInTheKernel's golden file).
func TestRules(t *testing.T) {
	summary := func(s ...network.Summary) string { return strings.Join(Summary(Rules(Networks(s))), "\n") }
	for _, tc := range []struct {
		name      string
		nets      []network.Summary
		want, not []string
	}{
		{
			name: "a network is isolated, answers replies, lets its containers talk and go out, NATed per subnet and IP version",
			nets: []network.Summary{defaultBridge},
			want: []string{
				"docker0 (bridge): to another network: isolation", "docker0 (bridge): isolated from the other networks",
				"docker0 (bridge): replies", "docker0 (bridge): between its containers", "docker0 (bridge): from outside ipv4",
				"docker0 (bridge): from outside ipv6", "docker0 (bridge): outbound",
				"docker0 (bridge): masquerade 172.17.0.0/16", "docker0 (bridge): masquerade fd00:ed5:1::/64",
			},
		},
		{
			name: "an internal network drops everything in and out, and is not in the isolation chain",
			nets: []network.Summary{internalNet},
			want: []string{"internal: nothing leaves", "internal: nothing enters", "between its containers: icc off"},
			not:  []string{"masquerade", "outbound", "to another network", "isolated from", "from outside"},
		},
		{
			name: "routed and nat-unprotected networks take connections from outside; routed is not NATed",
			nets: []network.Summary{routedNet},
			want: []string{"masquerade 192.168.100.0/24", "outbound"},
			not:  []string{"from outside", "masquerade 2001:db8:1::/64"},
		},
		{
			name: "no masquerade where the user turned it off",
			nets: []network.Summary{noMasqNet},
			want: []string{"outbound", "from outside ipv4"},
			not:  []string{"masquerade"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := summary(tc.nets...)
			for _, w := range tc.want {
				if !strings.Contains(got, w) {
					t.Errorf("rules lack %q:\n%s", w, got)
				}
			}
			for _, n := range tc.not {
				if strings.Contains(got, n) {
					t.Errorf("rules have %q:\n%s", n, got)
				}
			}
		})
	}
}

// The forward chain's accepts end it: every drop that must hold for a network comes before any
// accept that could match the same packet.
func TestRulesDropsBeforeAccepts(t *testing.T) {
	rules := Rules(Networks([]network.Summary{defaultBridge, userNet, internalNet, routedNet, noMasqNet}))
	lastIsolationDrop, firstAccept := -1, len(rules)
	for i, r := range rules {
		if r.Chain != chainForward {
			continue
		}
		switch {
		case strings.Contains(r.Comment, "isolation") || strings.Contains(r.Comment, "internal:"):
			lastIsolationDrop = i
		case strings.HasSuffix(r.Comment, ": replies") && firstAccept == len(rules):
			firstAccept = i
		}
	}
	if lastIsolationDrop > firstAccept {
		t.Errorf("an isolation rule (#%d) comes after the first accept (#%d):\n%s", lastIsolationDrop, firstAccept, strings.Join(Summary(rules), "\n"))
	}
	var outbound, fromOutside []int
	for i, r := range rules {
		switch {
		case strings.HasSuffix(r.Comment, ": outbound"):
			outbound = append(outbound, i)
		case strings.Contains(r.Comment, ": from outside"):
			fromOutside = append(fromOutside, i)
		}
	}
	if len(outbound) == 0 || len(fromOutside) == 0 || slices.Max(fromOutside) > slices.Min(outbound) {
		t.Errorf("every drop from outside (%v) must come before every outbound accept (%v)", fromOutside, outbound)
	}
}

func TestEnableForwarding(t *testing.T) {
	write := func(t *testing.T, dir string, files map[string]string) {
		for f, v := range files {
			p := filepath.Join(dir, f)
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, []byte(v), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, tc := range []struct {
		name       string
		files      map[string]string
		ipv4, ipv6 bool
		changed    []string
		after      map[string]string
	}{
		{
			name:  "off: turned on for the versions asked",
			files: map[string]string{"ipv4/ip_forward": "0\n", "ipv6/conf/all/forwarding": "0\n", "ipv6/conf/default/forwarding": "0\n"},
			ipv4:  true, ipv6: true,
			changed: []string{"net.ipv4.ip_forward", "net.ipv6.conf.default.forwarding", "net.ipv6.conf.all.forwarding"},
			after:   map[string]string{"ipv4/ip_forward": "1\n", "ipv6/conf/all/forwarding": "1\n", "ipv6/conf/default/forwarding": "1\n"},
		},
		{
			name:  "IPv6 left alone when no network has it",
			files: map[string]string{"ipv4/ip_forward": "0\n", "ipv6/conf/all/forwarding": "0\n", "ipv6/conf/default/forwarding": "0\n"},
			ipv4:  true, changed: []string{"net.ipv4.ip_forward"},
			after: map[string]string{"ipv4/ip_forward": "1\n", "ipv6/conf/all/forwarding": "0\n"},
		},
		{
			name:  "already on: nothing written",
			files: map[string]string{"ipv4/ip_forward": "1\n"},
			ipv4:  true,
			after: map[string]string{"ipv4/ip_forward": "1\n"},
		},
		{
			name:  "a kernel without IPv6 is not an error",
			files: map[string]string{"ipv4/ip_forward": "1\n"},
			ipv4:  true, ipv6: true,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			write(t, dir, tc.files)
			changed, err := Sysctls{Dir: dir}.EnableForwarding(tc.ipv4, tc.ipv6)
			if err != nil || !slices.Equal(changed, tc.changed) {
				t.Errorf("EnableForwarding = %q, %v; want %q", changed, err, tc.changed)
			}
			for f, want := range tc.after {
				if b, _ := os.ReadFile(filepath.Join(dir, f)); string(b) != want {
					t.Errorf("%s = %q, want %q", f, b, want)
				}
			}
		})
	}
	t.Run("unwritable: the error says what to run", func(t *testing.T) {
		_, err := Sysctls{Dir: filepath.Join(t.TempDir(), "missing")}.EnableForwarding(true, false)
		if err == nil || !strings.Contains(err.Error(), "net.ipv4.ip_forward") {
			t.Errorf("EnableForwarding on a missing directory = %v", err)
		}
	})
}

func TestEnableTCPMigrateReq(t *testing.T) {
	for _, tc := range []struct {
		name, before string
		changed      bool
	}{
		{"off: turned on", "0\n", true},
		{"on: left alone", "1\n", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "ipv4", "tcp_migrate_req")
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, []byte(tc.before), 0o644); err != nil {
				t.Fatal(err)
			}
			changed, err := Sysctls{Dir: dir}.EnableTCPMigrateReq()
			if err != nil || changed != tc.changed {
				t.Errorf("EnableTCPMigrateReq = %v, %v; want %v", changed, err, tc.changed)
			}
			if b, _ := os.ReadFile(p); string(b) != "1\n" {
				t.Errorf("tcp_migrate_req = %q, want 1", b)
			}
		})
	}
	t.Run("missing: the error names the setting", func(t *testing.T) {
		_, err := Sysctls{Dir: t.TempDir()}.EnableTCPMigrateReq()
		if err == nil || !strings.Contains(err.Error(), "net.ipv4.tcp_migrate_req") {
			t.Errorf("EnableTCPMigrateReq without the file = %v", err)
		}
	})
}

func TestUninstallMark(t *testing.T) {
	dir := t.TempDir()
	if Uninstalled(dir) {
		t.Fatal("marked before MarkUninstalled")
	}
	if err := MarkUninstalled(dir); err != nil || !Uninstalled(dir) {
		t.Fatalf("MarkUninstalled: %v, marked=%v", err, Uninstalled(dir))
	}
	if had, err := ClearUninstalled(dir); !had || err != nil || Uninstalled(dir) {
		t.Fatalf("ClearUninstalled = %v, %v; marked=%v", had, err, Uninstalled(dir))
	}
	if had, err := ClearUninstalled(dir); had || err != nil {
		t.Fatalf("ClearUninstalled again = %v, %v", had, err)
	}
}
