package netfilter

import (
	"errors"
	"fmt"
	"os"
	"slices"

	"github.com/google/nftables"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"
)

// Table is the one nftables table this package manages, spoken to over netlink with
// github.com/google/nftables: the server's image is a static binary FROM scratch, with no nft
// command to run, and netlink's batches give the atomic replace that keeps the rules consistent.
type Table struct {
	Name string
	// NetNS, when not zero, is an open network namespace the table lives in (tests); zero means
	// the caller's own.
	NetNS int
}

func (t Table) conn() (*nftables.Conn, error) {
	if err := CheckTable(t.Name); err != nil {
		return nil, err
	}
	var opts []nftables.ConnOption
	if t.NetNS != 0 {
		opts = append(opts, nftables.WithNetNSFd(t.NetNS))
	}
	c, err := nftables.New(opts...)
	if err != nil {
		return nil, fmt.Errorf("netfilter: %w", err)
	}
	return c, nil
}

func (t Table) table() *nftables.Table {
	return &nftables.Table{Name: t.Name, Family: nftables.TableFamilyINet}
}

// String is the table as nft names it.
func (t Table) String() string { return "inet " + t.Name }

// Replace makes the table hold exactly rules, in one transaction: create it (in case it is
// missing), delete it, and create it again with its chains and rules. Packets see either the old
// table or the new one, never a half-built one, and no other table is touched.
func (t Table) Replace(rules []Rule) error {
	c, err := t.conn()
	if err != nil {
		return err
	}
	tbl := t.table()
	c.AddTable(tbl)
	c.DelTable(tbl)
	c.AddTable(tbl)
	accept := nftables.ChainPolicyAccept
	chains := map[string]*nftables.Chain{
		chainForward: c.AddChain(&nftables.Chain{
			Name: chainForward, Table: tbl, Type: nftables.ChainTypeFilter,
			Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &accept,
		}),
		chainIsolation: c.AddChain(&nftables.Chain{Name: chainIsolation, Table: tbl}),
		chainPostrouting: c.AddChain(&nftables.Chain{
			Name: chainPostrouting, Table: tbl, Type: nftables.ChainTypeNAT,
			Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource, Policy: &accept,
		}),
	}
	for _, r := range rules {
		ch, ok := chains[r.Chain]
		if !ok {
			return fmt.Errorf("netfilter: rule %q names unknown chain %q", r.Comment, r.Chain)
		}
		c.AddRule(&nftables.Rule{
			Table: tbl, Chain: ch, Exprs: r.Exprs,
			UserData: userdata.AppendString(nil, userdata.TypeComment, r.Comment),
		})
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("replacing nftables table %s: %w", t, explain(err))
	}
	return nil
}

// Remove deletes the table and everything in it, if it is there, and says whether it was.
func (t Table) Remove() (bool, error) {
	_, exists, err := t.Current()
	if err != nil || !exists {
		return false, err
	}
	c, err := t.conn()
	if err != nil {
		return false, err
	}
	// Create-then-delete cannot fail on a table that went away meanwhile.
	tbl := t.table()
	c.AddTable(tbl)
	c.DelTable(tbl)
	if err := c.Flush(); err != nil {
		return false, fmt.Errorf("removing nftables table %s: %w", t, explain(err))
	}
	return true, nil
}

// Current describes what the table holds, as Summary describes rules: one line per chain and
// per rule, in order. exists is false when there is no such table.
func (t Table) Current() (lines []string, exists bool, err error) {
	c, err := t.conn()
	if err != nil {
		return nil, false, err
	}
	if _, err := c.ListTableOfFamily(t.Name, nftables.TableFamilyINet); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil, false, nil
		}
		return nil, false, fmt.Errorf("reading nftables table %s: %w", t, explain(err))
	}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return nil, true, fmt.Errorf("reading nftables table %s: %w", t, explain(err))
	}
	chains = slices.DeleteFunc(chains, func(ch *nftables.Chain) bool { return ch.Table.Name != t.Name })
	slices.SortFunc(chains, func(a, b *nftables.Chain) int { return chainOrder(a.Name) - chainOrder(b.Name) })
	for _, ch := range chains {
		lines = append(lines, "chain "+ch.Name)
		rules, err := c.GetRules(t.table(), ch)
		if err != nil {
			return nil, true, fmt.Errorf("reading nftables table %s: %w", t, explain(err))
		}
		for _, r := range rules {
			comment, _ := userdata.GetString(r.UserData, userdata.TypeComment)
			lines = append(lines, "  "+comment)
		}
	}
	return lines, true, nil
}

// Summary is what Current returns once the table holds exactly rules.
func Summary(rules []Rule) []string {
	var lines []string
	for _, ch := range []string{chainForward, chainIsolation, chainPostrouting} {
		lines = append(lines, "chain "+ch)
		for _, r := range rules {
			if r.Chain == ch {
				lines = append(lines, "  "+r.Comment)
			}
		}
	}
	return lines
}

// chainOrder lists our chains in the order Summary does, and anything else after them.
func chainOrder(name string) int {
	if i := slices.Index([]string{chainForward, chainIsolation, chainPostrouting}, name); i >= 0 {
		return i
	}
	return 3
}

// explain turns the one error an operator can fix into an instruction.
func explain(err error) error {
	if errors.Is(err, os.ErrPermission) {
		return fmt.Errorf("%w: changing the host's nftables needs root with CAP_NET_ADMIN in the host's network namespace (compose.yaml gives the server and the installer cap_add: [NET_ADMIN] and network_mode: host)", err)
	}
	return err
}
