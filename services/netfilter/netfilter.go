// Package netfilter gives Docker's bridge networks back what dockerd's `"iptables": false` takes
// away: outbound NAT from each network's subnets, forwarding for that traffic and its replies, and
// the isolation Docker enforces between networks and from outside. The installer sets
// `"iptables": false` so that published ports go through the shim and Envoy instead of DNAT; that
// flag also switches off everything else dockerd does in iptables, which this package restores.
//
// It owns one nftables table (family inet, named by the caller, envoy_docker_shim by default) and
// nothing else: every reconcile replaces that table in one atomic transaction, and removal deletes
// it. It must never touch another table, chain or rule, never DNAT (published ports stay with the
// shim and Envoy), and never follow a network it did not list from its own dockerd, so that several
// instances with different tables (tests, several daemons) never meet.
package netfilter

import (
	"cmp"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strconv"

	"github.com/docker/docker/api/types/network"
)

// DefaultTable is the table the appliance manages: `nft list table inet envoy_docker_shim`.
const DefaultTable = "envoy_docker_shim"

// tableName keeps to what nft's command line takes unquoted, so the README's commands work as typed.
var tableName = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9_]{0,63}$`)

// CheckTable rejects a table name that nft could not name back to the operator.
func CheckTable(name string) error {
	if !tableName.MatchString(name) {
		return fmt.Errorf("netfilter table %q: want a letter, then up to 63 letters, digits or underscores", name)
	}
	return nil
}

// Network is what the rules need to know of one Docker bridge network.
type Network struct {
	ID, Name string
	// Bridge is the network's bridge interface on the host (docker0, br-<id prefix>, or the name
	// given with -o com.docker.network.bridge.name).
	Bridge string
	// Internal networks (docker network create --internal) reach nothing outside themselves.
	Internal bool
	// ICC allows traffic between the network's own containers (Docker's enable_icc, default on).
	ICC        bool
	IPv4, IPv6 Family
}

// Family is a network's configuration for one IP version.
type Family struct {
	Subnets []netip.Prefix
	// Masquerade: connections to anywhere but the network itself leave with the host's address.
	Masquerade bool
	// Protected: connections from outside the network to its containers are dropped, as Docker
	// does unless a network asks for direct routing (gateway_mode routed or nat-unprotected).
	Protected bool
}

// Docker's bridge network options (moby libnetwork/drivers/bridge/labels.go).
const (
	optBridgeName    = "com.docker.network.bridge.name"
	optDefaultBridge = "com.docker.network.bridge.default_bridge"
	optMasquerade    = "com.docker.network.bridge.enable_ip_masquerade"
	optICC           = "com.docker.network.bridge.enable_icc"
	optGatewayMode   = "com.docker.network.bridge.gateway_mode_ipv" // + "4" or "6" (Docker 28+)
)

// FromDocker translates a network from dockerd's network list. ok is false for anything that is
// not a local bridge network (host, none, macvlan, overlay, config-only networks).
func FromDocker(n network.Summary) (Network, bool) {
	if n.Driver != "bridge" || n.ConfigOnly || n.Scope == "swarm" {
		return Network{}, false
	}
	out := Network{
		ID:       n.ID,
		Name:     n.Name,
		Bridge:   n.Options[optBridgeName],
		Internal: n.Internal,
		ICC:      optionTrue(n.Options, optICC),
	}
	if out.Bridge == "" {
		out.Bridge = "br-" + n.ID[:min(12, len(n.ID))]
	}
	// dockerd marks the default bridge enable_ip_masquerade=false whenever iptables is off, whatever
	// --ip-masq says, so on the default bridge that option tells nothing: masquerade it, as dockerd
	// with iptables on does by default. A user-defined network's option is the user's own.
	masquerade := optionTrue(n.Options, optMasquerade) || n.Options[optDefaultBridge] == "true"
	for _, c := range n.IPAM.Config {
		p, err := netip.ParsePrefix(c.Subnet)
		if err != nil {
			continue // not a subnet dockerd could have assigned; nothing to match on
		}
		p = p.Masked()
		if p.Addr().Is4() {
			out.IPv4.Subnets = append(out.IPv4.Subnets, p)
		} else if n.EnableIPv6 {
			out.IPv6.Subnets = append(out.IPv6.Subnets, p)
		}
	}
	for v, f := range map[string]*Family{"4": &out.IPv4, "6": &out.IPv6} {
		slices.SortFunc(f.Subnets, comparePrefix)
		f.Subnets = slices.Compact(f.Subnets)
		mode := n.Options[optGatewayMode+v]
		f.Masquerade = masquerade && !n.Internal && mode != "routed" && mode != "isolated"
		f.Protected = mode != "routed" && mode != "nat-unprotected"
	}
	return out, true
}

// optionTrue reads a boolean network option the way dockerd does: absent means true.
func optionTrue(opts map[string]string, key string) bool {
	v, ok := opts[key]
	if !ok {
		return true
	}
	b, err := strconv.ParseBool(v)
	return err != nil || b
}

func comparePrefix(a, b netip.Prefix) int {
	return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
}

// Networks translates dockerd's network list, ordered by bridge name so that the same networks
// always give the same rules in the same order.
func Networks(list []network.Summary) []Network {
	var out []Network
	for _, n := range list {
		if nw, ok := FromDocker(n); ok {
			out = append(out, nw)
		}
	}
	slices.SortFunc(out, func(a, b Network) int { return cmp.Compare(a.Bridge, b.Bridge) })
	return slices.CompactFunc(out, func(a, b Network) bool { return a.Bridge == b.Bridge })
}
