package netfilter

import (
	"fmt"
	"net/netip"

	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// The table's chains. forward and postrouting hook into the kernel; isolation is jumped to.
const (
	chainForward     = "forward"
	chainIsolation   = "isolation"
	chainPostrouting = "postrouting"
)

// Rule is one rule of the table: its chain, a comment that says what it does (and which network it
// serves), and its expressions. The comment is what an operator reads in `nft list table`, and
// what a reconcile compares to tell whether the table is still as it left it.
type Rule struct {
	Chain   string
	Comment string
	Exprs   []expr.Any
}

// Rules is the whole content of the table for the given networks: a pure function, so the same
// networks always give the same rules in the same order.
//
// Order matters within the forward chain, because an accept ends the chain: every drop that must
// hold (isolation, internal networks) comes first, then the replies and the traffic between a
// network's own containers, then the drop of new connections from outside, and last the accept of
// what leaves a network. An accept here never overrides a drop in another table (nftables runs
// every table's chains; a drop anywhere is final), so the operator's own firewall keeps the last word.
func Rules(nets []Network) []Rule {
	var rs []Rule
	add := func(chain string, n Network, what string, exprs ...[]expr.Any) {
		var all []expr.Any
		for _, e := range exprs {
			all = append(all, e...)
		}
		rs = append(rs, Rule{Chain: chain, Comment: describe(n, what), Exprs: all})
	}
	// Isolation: a network reaches no other Docker network (Docker's DOCKER-ISOLATION chains), and
	// an internal network reaches nothing but itself.
	for _, n := range nets {
		if n.Internal {
			add(chainForward, n, "internal: nothing leaves", iif(n.Bridge, true), oif(n.Bridge, false), counterVerdict(expr.VerdictDrop, ""))
			add(chainForward, n, "internal: nothing enters", oif(n.Bridge, true), iif(n.Bridge, false), counterVerdict(expr.VerdictDrop, ""))
			continue
		}
		add(chainForward, n, "to another network: isolation", iif(n.Bridge, true), oif(n.Bridge, false), verdict(expr.VerdictJump, chainIsolation))
	}
	for _, n := range nets {
		if !n.Internal {
			add(chainIsolation, n, "isolated from the other networks", oif(n.Bridge, true), counterVerdict(expr.VerdictDrop, ""))
		}
	}
	for _, n := range nets {
		add(chainForward, n, "replies", oif(n.Bridge, true), ctState(expr.CtStateBitESTABLISHED|expr.CtStateBitRELATED), counterVerdict(expr.VerdictAccept, ""))
		if n.ICC {
			add(chainForward, n, "between its containers", iif(n.Bridge, true), oif(n.Bridge, true), counterVerdict(expr.VerdictAccept, ""))
		} else {
			add(chainForward, n, "between its containers: icc off", iif(n.Bridge, true), oif(n.Bridge, true), counterVerdict(expr.VerdictDrop, ""))
		}
	}
	// New connections from outside reach a container only through a published port, which the
	// shim and Envoy serve on the host (not forwarded): drop the rest, as Docker does. A connection
	// someone else DNATed (Docker's own rules, if they come back) is theirs to allow.
	for _, n := range nets {
		if n.Internal {
			continue
		}
		for _, f := range families(n) {
			if f.family.Protected {
				add(chainForward, n, "DNATed elsewhere "+f.name, oif(n.Bridge, true), nfproto(f.proto), ctStatusDNAT(), counterVerdict(expr.VerdictAccept, ""))
				add(chainForward, n, "from outside "+f.name, oif(n.Bridge, true), nfproto(f.proto), counterVerdict(expr.VerdictDrop, ""))
			}
		}
	}
	for _, n := range nets {
		if !n.Internal {
			add(chainForward, n, "outbound", iif(n.Bridge, true), counterVerdict(expr.VerdictAccept, ""))
		}
	}
	// Outbound NAT, as Docker's `-s SUBNET ! -o BRIDGE -j MASQUERADE`.
	for _, n := range nets {
		for _, f := range families(n) {
			if !f.family.Masquerade {
				continue
			}
			for _, p := range f.family.Subnets {
				add(chainPostrouting, n, "masquerade "+p.String(), nfproto(f.proto), saddr(p), oif(n.Bridge, false), []expr.Any{&expr.Counter{}, &expr.Masq{}})
			}
		}
	}
	return rs
}

type family struct {
	name   string
	proto  byte
	family Family
}

// families lists the IP versions a network has subnets for.
func families(n Network) []family {
	var out []family
	if len(n.IPv4.Subnets) > 0 {
		out = append(out, family{"ipv4", unix.NFPROTO_IPV4, n.IPv4})
	}
	if len(n.IPv6.Subnets) > 0 {
		out = append(out, family{"ipv6", unix.NFPROTO_IPV6, n.IPv6})
	}
	return out
}

// describe names the network in a rule's comment: its bridge (what the rule matches) and its name
// (what the operator knows it by). nft keeps comments up to 128 bytes.
func describe(n Network, what string) string {
	name := n.Name
	if len(name) > 40 {
		name = name[:40]
	}
	return fmt.Sprintf("%s (%s): %s", n.Bridge, name, what)
}

// ifname is an interface name as the kernel compares it: IFNAMSIZ bytes, NUL-padded.
func ifname(name string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, name)
	return b
}

func iif(name string, equal bool) []expr.Any { return ifMatch(expr.MetaKeyIIFNAME, name, equal) }
func oif(name string, equal bool) []expr.Any { return ifMatch(expr.MetaKeyOIFNAME, name, equal) }

func ifMatch(key expr.MetaKey, name string, equal bool) []expr.Any {
	op := expr.CmpOpEq
	if !equal {
		op = expr.CmpOpNeq
	}
	return []expr.Any{
		&expr.Meta{Key: key, Register: 1},
		&expr.Cmp{Op: op, Register: 1, Data: ifname(name)},
	}
}

// nfproto restricts an inet-family rule to one IP version (`meta nfproto ipv4`).
func nfproto(proto byte) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
	}
}

// saddr matches a source prefix (`ip saddr 172.17.0.0/16`, `ip6 saddr fd00::/64`).
func saddr(p netip.Prefix) []expr.Any {
	offset, length := uint32(12), uint32(4) // IPv4 header: source address
	if p.Addr().Is6() {
		offset, length = 8, 16
	}
	mask := make([]byte, length)
	for i := range p.Bits() {
		mask[i/8] |= 0x80 >> (i % 8)
	}
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: length},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: length, Mask: mask, Xor: make([]byte, length)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: p.Masked().Addr().AsSlice()},
	}
}

// ctState matches connections in any of the given conntrack states (`ct state established,related`).
func ctState(bits uint32) []expr.Any {
	return ctBits(expr.CtKeySTATE, bits)
}

// ipsDstNAT is conntrack's IPS_DST_NAT status bit (linux/netfilter/nf_conntrack_common.h).
const ipsDstNAT = 1 << 5

// ctStatusDNAT matches connections whose destination was translated (`ct status dnat`).
func ctStatusDNAT() []expr.Any {
	return ctBits(expr.CtKeySTATUS, ipsDstNAT)
}

func ctBits(key expr.CtKey, bits uint32) []expr.Any {
	return []expr.Any{
		&expr.Ct{Register: 1, Key: key},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: binaryutil.NativeEndian.PutUint32(bits), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)},
	}
}

func counterVerdict(kind expr.VerdictKind, chain string) []expr.Any {
	return append([]expr.Any{&expr.Counter{}}, verdict(kind, chain)...)
}

func verdict(kind expr.VerdictKind, chain string) []expr.Any {
	return []expr.Any{&expr.Verdict{Kind: kind, Chain: chain}}
}
