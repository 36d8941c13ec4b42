package netfilter

import (
	"bytes"
	"flag"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/docker/docker/api/types/network"

	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata")

// requireNft skips (fails under CI=true, through testbed) unless the test can change nftables
// in a namespace of its own and read it back with nft.
func requireNft(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("skipping: needs root and a network namespace of its own")
	}
	testbed.RequireRoot(t)
	nft, err := exec.LookPath("nft")
	if err != nil {
		nft = "/usr/sbin/nft"
		if _, err := os.Stat(nft); err != nil {
			if os.Getenv("CI") == "true" {
				t.Fatal("prerequisite missing under CI=true: the nft command (Debian package nftables; testbed/provision.sh installs it)")
			}
			t.Skip("skipping: no nft command (Debian package nftables); run testbed/provision.sh")
		}
	}
	return nft
}

// newNetns is a network namespace for the test's tables: the host's ruleset is never touched.
func newNetns(t *testing.T) *os.File {
	t.Helper()
	ns, err := testbed.NewNetns()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	return ns
}

// nftList runs nft with args in the namespace ns.
func nftList(t *testing.T, nft string, ns *os.File, args ...string) string {
	t.Helper()
	var out []byte
	err := testbed.InNetns(ns, func() error {
		var err error
		out, err = exec.Command(nft, args...).CombinedOutput()
		return err
	})
	if err != nil {
		t.Fatalf("nft %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// The rules as the kernel holds them, as `nft list table` shows them to an operator: the golden
// file testdata/ruleset.nft is what a reviewer reads to see exactly what the appliance puts on a
// host. Applied in a network namespace of the test's own, so the host's ruleset is never touched.
func TestRulesInTheKernel(t *testing.T) {
	nft := requireNft(t)
	ns := newNetns(t)
	tbl := Table{Name: "eds_golden", NetNS: int(ns.Fd())}
	rules := Rules(Networks([]network.Summary{defaultBridge, userNet, internalNet, routedNet, noMasqNet}))
	if err := tbl.Replace(rules); err != nil {
		t.Fatal(err)
	}
	got := nftList(t, nft, ns, "list", "table", "inet", "eds_golden")
	golden := filepath.Join("testdata", "ruleset.nft")
	if *update {
		if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatal(err)
	}
	if got != string(want) {
		t.Errorf("nft list table differs from %s (run with -update after checking):\n%s", golden, got)
	}

	// Current reads back what Replace wrote, in Summary's terms: how a reconcile sees that
	// nothing changed.
	have, exists, err := tbl.Current()
	if err != nil || !exists || !slices.Equal(have, Summary(rules)) {
		t.Errorf("Current = %v, %v\n%s\nwant\n%s", exists, err, strings.Join(have, "\n"), strings.Join(Summary(rules), "\n"))
	}

	// A second Replace with fewer networks leaves exactly those: nothing of the old table stays.
	fewer := Rules(Networks([]network.Summary{defaultBridge}))
	if err := tbl.Replace(fewer); err != nil {
		t.Fatal(err)
	}
	if have, _, _ := tbl.Current(); !slices.Equal(have, Summary(fewer)) {
		t.Errorf("after replacing with one network: %q", have)
	}
	if out := nftList(t, nft, ns, "list", "table", "inet", "eds_golden"); strings.Contains(out, "br-") {
		t.Errorf("rules of removed networks remain:\n%s", out)
	}
}

// Remove deletes our table and nothing else; a second Remove finds nothing to do. Two tables of
// two instances live side by side, each replaced and removed without touching the other.
func TestRemoveTouchesOnlyItsTable(t *testing.T) {
	nft := requireNft(t)
	ns := newNetns(t)
	// Someone else's table, as an operator's firewall or dockerd's own would be.
	other := "table inet theirs {\n\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n\t\tiifname \"docker0\" counter drop\n\t}\n}\n"
	err := testbed.InNetns(ns, func() error {
		cmd := exec.Command(nft, "-f", "-")
		cmd.Stdin = strings.NewReader(other)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("nft -f: %v: %s", err, out)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	before := nftList(t, nft, ns, "list", "ruleset")

	a := Table{Name: "eds_a", NetNS: int(ns.Fd())}
	b := Table{Name: "eds_b", NetNS: int(ns.Fd())}
	if err := a.Replace(Rules(Networks([]network.Summary{defaultBridge}))); err != nil {
		t.Fatal(err)
	}
	if err := b.Replace(Rules(Networks([]network.Summary{userNet}))); err != nil {
		t.Fatal(err)
	}
	if err := a.Replace(Rules(Networks([]network.Summary{defaultBridge, noMasqNet}))); err != nil {
		t.Fatal(err)
	}
	if have, _, _ := b.Current(); !slices.Equal(have, Summary(Rules(Networks([]network.Summary{userNet})))) {
		t.Errorf("replacing table a changed table b: %q", have)
	}
	for _, tbl := range []Table{a, b} {
		if removed, err := tbl.Remove(); !removed || err != nil {
			t.Errorf("%s: Remove = %v, %v", tbl, removed, err)
		}
		if removed, err := tbl.Remove(); removed || err != nil {
			t.Errorf("%s: second Remove = %v, %v", tbl, removed, err)
		}
	}
	if after := nftList(t, nft, ns, "list", "ruleset"); after != before {
		t.Errorf("ruleset after removing our tables differs from before:\n--- before\n%s--- after\n%s", before, after)
	}
	if bytes.Contains([]byte(before), []byte("eds_")) {
		t.Errorf("the ruleset before held our tables:\n%s", before)
	}
}
