package testbed

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// cgroupPrefix names the cgroup parent of each daemon's containers. Only cgroups under it are ever
// removed, so a corrupt state file cannot make the cleaner rmdir anything else.
const cgroupPrefix = "/eds-testbed-"

// sweepStale removes every instance under root whose lock no live process holds, then every
// edsb* bridge that no remaining instance owns. It returns the states of the instances that are
// still there, keyed by directory: live ones, and stale ones that could not be removed (so their
// slots are not handed out again while their bridge may still exist).
func sweepStale(root string, logf func(string, ...any)) map[string]instanceState {
	occupied := map[string]instanceState{}
	entries, err := os.ReadDir(root)
	if err != nil {
		logf("testbed: listing %s: %v", root, err)
	}
	for _, e := range entries {
		kind, slot, ok := parseInstanceName(e.Name())
		if !ok || !e.IsDir() {
			continue
		}
		dir := filepath.Join(root, e.Name())
		st, stErr := readState(dir)
		if stErr != nil {
			st = instanceState{Kind: kind, Slot: slot}
		}
		lock, held, err := tryLock(dir)
		switch {
		case held:
			occupied[dir] = st
			continue
		case err != nil && !errors.Is(err, fs.ErrNotExist):
			// Not provably stale: leave it alone rather than risk wrecking a live instance.
			logf("testbed: cannot tell whether %s is live, leaving it: %v", dir, err)
			occupied[dir] = st
			continue
		}
		logf("testbed: removing stale instance %s (its test process, pid %d, is gone)", dir, st.Owner)
		if err := cleanInstance(dir, st, logf); err != nil {
			logf("testbed: stale instance %s not fully removed: %v", dir, err)
			occupied[dir] = st
		}
		if lock != nil {
			lock.Close()
		}
	}
	removeOrphanBridges(occupied, logf)
	removeOrphanTables(occupied, logf)
	return occupied
}

// cleanInstance undoes one instance, live or stale: kill its processes, then what they held
// (shim sockets, mounts, cgroups, bridges, Envoy's shared memory), then the directory.
func cleanInstance(dir string, st instanceState, logf func(string, ...any)) error {
	var errs []error
	if err := killInstanceProcs(dir, st, logf); err != nil {
		errs = append(errs, err)
	}
	removeShimSockets(dir, logf)
	if err := unmountUnder(dir); err != nil {
		errs = append(errs, err)
	}
	if err := removeCgroups(st.CgroupParent); err != nil {
		errs = append(errs, err)
	}
	if err := removeInstanceBridges(st, logf); err != nil {
		errs = append(errs, err)
	}
	if st.BaseID > 0 {
		if err := os.Remove(envoyShmPath(st.BaseID)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, fmt.Errorf("removing Envoy shared memory: %w", err))
		}
	}
	if len(errs) == 0 {
		if err := os.RemoveAll(dir); err != nil {
			errs = append(errs, fmt.Errorf("removing %s: %w", dir, err))
		}
	}
	return errors.Join(errs...)
}

// killInstanceProcs SIGKILLs every process that belongs to the instance until none is left.
func killInstanceProcs(dir string, st instanceState, logf func(string, ...any)) error {
	deadline := time.Now().Add(15 * time.Second)
	reported := map[int]bool{}
	for {
		procs := instanceProcs(dir, st.CgroupParent)
		if len(procs) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("processes of %s survive SIGKILL: %v", dir, procs)
		}
		for _, p := range procs {
			if !reported[p.pid] {
				reported[p.pid] = true
				logf("testbed: killing leftover %s", p)
			}
			_ = syscall.Kill(p.pid, syscall.SIGKILL)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

type proc struct {
	pid  int
	comm string
	why  string
}

func (p proc) String() string { return fmt.Sprintf("%s (pid %d, %s)", p.comm, p.pid, p.why) }

// instanceProcs lists the live (not zombie) processes of an instance: those carrying its marker
// in their environment, naming its directory in their command line, running from or in it, and
// those in its containers' cgroups (container processes show none of the other signs).
func instanceProcs(dir, cgroupParent string) []proc {
	inCgroup := cgroupPids(cgroupParent)
	marker := []byte(markerEnv + "=" + dir)
	self := os.Getpid()
	entries, _ := os.ReadDir("/proc")
	var out []proc
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self || pid == 1 {
			continue
		}
		base := "/proc/" + e.Name()
		comm, state, ok := procStat(base)
		if !ok || state == 'Z' || state == 'X' {
			continue
		}
		why := ""
		switch {
		case inCgroup[pid]:
			why = "in the containers' cgroup"
		case hasEnvEntry(readFile(base+"/environ"), marker):
			why = "carries the instance marker"
		case mentionsDir(string(bytes.ReplaceAll(readFile(base+"/cmdline"), []byte{0}, []byte{' '})), dir):
			why = "command line names the instance"
		case linkUnder(base+"/cwd", dir) || linkUnder(base+"/exe", dir):
			why = "runs in the instance directory"
		default:
			continue
		}
		out = append(out, proc{pid: pid, comm: comm, why: why})
	}
	return out
}

// procStat returns a process's command name and state letter from /proc/PID/stat.
func procStat(base string) (comm string, state byte, ok bool) {
	b := readFile(base + "/stat")
	open, closing := bytes.IndexByte(b, '('), bytes.LastIndexByte(b, ')')
	if open < 0 || closing < open || closing+2 >= len(b) {
		return "", 0, false
	}
	return string(b[open+1 : closing]), b[closing+2], true
}

func readFile(path string) []byte {
	b, _ := os.ReadFile(path)
	return b
}

func hasEnvEntry(environ, entry []byte) bool {
	for e := range bytes.SplitSeq(environ, []byte{0}) {
		if bytes.Equal(e, entry) {
			return true
		}
	}
	return false
}

// mentionsDir reports whether s names dir or a path beneath it, and not merely a sibling whose
// name starts the same ("/x/d1-ab" must not match "/x/d1-abc").
func mentionsDir(s, dir string) bool {
	for i := 0; ; {
		j := strings.Index(s[i:], dir)
		if j < 0 {
			return false
		}
		end := i + j + len(dir)
		if end == len(s) || !isNameByte(s[end]) {
			return true
		}
		i = end
	}
}

func isNameByte(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.'
}

func linkUnder(link, dir string) bool {
	target, err := os.Readlink(link)
	if err != nil {
		return false
	}
	target = strings.TrimSuffix(target, " (deleted)")
	return target == dir || strings.HasPrefix(target, dir+"/")
}

// removeShimSockets deletes the sockets that containerd's runc shims keep in /run/containerd/s,
// outside the instance directory. A shim removes its own on a clean exit; a SIGKILLed one cannot.
func removeShimSockets(dir string, logf func(string, ...any)) {
	for _, c := range containerdLayouts(dir) {
		tasks := filepath.Join(c.state, "io.containerd.runtime.v2.task")
		namespaces, _ := os.ReadDir(tasks)
		for _, ns := range namespaces {
			ids, _ := os.ReadDir(filepath.Join(tasks, ns.Name()))
			for _, id := range ids {
				sock := shimSocketPath(c.address, ns.Name(), id.Name())
				if err := os.Remove(sock); err == nil {
					logf("testbed: removed leftover shim socket %s", sock)
				}
			}
		}
	}
}

// shimSocketPath repeats containerd's (1.5 to 2.x) shim.SocketAddress: the socket is named after a
// hash of containerd's address, the namespace and the task ID, in /run/containerd/s for root.
func shimSocketPath(address, namespace, id string) string {
	sum := sha256.Sum256([]byte(filepath.Join(address, namespace, id)))
	return filepath.Join("/run/containerd/s", hex.EncodeToString(sum[:]))
}

type mount struct {
	point  string
	fstype string
}

// parseMountinfo reads /proc/PID/mountinfo: the mount point is field 5 and the filesystem type
// follows the " - " separator; paths escape space, tab, newline and backslash as octal.
func parseMountinfo(r io.Reader) ([]mount, error) {
	var out []mount
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		line := sc.Text()
		pre, post, ok := strings.Cut(line, " - ")
		fields := strings.Fields(pre)
		if !ok || len(fields) < 5 {
			return nil, fmt.Errorf("malformed mountinfo line %q", line)
		}
		fstype, _, _ := strings.Cut(post, " ")
		out = append(out, mount{point: unescapeOctal(fields[4]), fstype: fstype})
	}
	return out, sc.Err()
}

func unescapeOctal(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func mounts() ([]mount, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return parseMountinfo(f)
}

// mountsUnder returns the mount points at or beneath dir, deepest first, the order they can be
// unmounted in.
func mountsUnder(all []mount, dir string) []string {
	var out []string
	for _, m := range all {
		if m.point == dir || strings.HasPrefix(m.point, dir+"/") {
			out = append(out, m.point)
		}
	}
	slices.SortStableFunc(out, func(a, b string) int {
		return strings.Count(b, "/") - strings.Count(a, "/")
	})
	return slices.Compact(out)
}

// unmountUnder unmounts everything at or beneath dir, falling back to a lazy unmount for what is
// busy: the directory must go, and a detached mount no longer pins it.
func unmountUnder(dir string) error {
	for range 5 {
		all, err := mounts()
		if err != nil {
			return fmt.Errorf("reading mounts: %w", err)
		}
		points := mountsUnder(all, dir)
		if len(points) == 0 {
			return nil
		}
		for _, p := range points {
			if err := syscall.Unmount(p, 0); err != nil && !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ENOENT) {
				_ = syscall.Unmount(p, syscall.MNT_DETACH)
			}
		}
	}
	all, err := mounts()
	if err != nil {
		return fmt.Errorf("reading mounts: %w", err)
	}
	if left := mountsUnder(all, dir); len(left) > 0 {
		return fmt.Errorf("still mounted under %s: %v", dir, left)
	}
	return nil
}

// cgroupDirs lists the directories of a cgroup parent in every mounted hierarchy (one per
// controller under cgroup v1, a single one under v2).
func cgroupDirs(parent string) []string {
	if !strings.HasPrefix(parent, cgroupPrefix) {
		return nil
	}
	all, err := mounts()
	if err != nil {
		return nil
	}
	var out []string
	for _, m := range all {
		if m.fstype != "cgroup" && m.fstype != "cgroup2" {
			continue
		}
		d := filepath.Join(m.point, parent)
		if fi, err := os.Stat(d); err == nil && fi.IsDir() {
			out = append(out, d)
		}
	}
	return out
}

func cgroupPids(parent string) map[int]bool {
	pids := map[int]bool{}
	for _, d := range cgroupDirs(parent) {
		_ = filepath.WalkDir(d, func(path string, e fs.DirEntry, err error) error {
			if err != nil || !e.IsDir() {
				return nil
			}
			for f := range strings.FieldsSeq(string(readFile(filepath.Join(path, "cgroup.procs")))) {
				if pid, err := strconv.Atoi(f); err == nil {
					pids[pid] = true
				}
			}
			return nil
		})
	}
	return pids
}

// removeCgroups removes the cgroup parent's directories, children first. dockerd removes each
// container's cgroup but never the parent it was told to use.
func removeCgroups(parent string) error {
	var errs []error
	for _, d := range cgroupDirs(parent) {
		var dirs []string
		_ = filepath.WalkDir(d, func(path string, e fs.DirEntry, err error) error {
			if err == nil && e.IsDir() {
				dirs = append(dirs, path)
			}
			return nil
		})
		slices.Reverse(dirs)
		for _, sub := range dirs {
			var err error
			for range 50 {
				// EBUSY lasts until the kernel has finished tearing down the killed tasks.
				if err = syscall.Rmdir(sub); err == nil || errors.Is(err, syscall.ENOENT) || !errors.Is(err, syscall.EBUSY) {
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
			if err != nil && !errors.Is(err, syscall.ENOENT) {
				errs = append(errs, fmt.Errorf("removing cgroup %s: %w", sub, err))
			}
		}
	}
	return errors.Join(errs...)
}

type bridge struct {
	Name  string
	Index int
	Addrs []netip.Prefix
}

// listBridges asks iproute2 for every bridge and its IPv4 addresses.
func listBridges() ([]bridge, error) {
	out, err := exec.Command("ip", "-j", "-4", "addr", "show", "type", "bridge").Output()
	if err != nil {
		return nil, fmt.Errorf("ip addr show type bridge: %w", err)
	}
	return parseBridges(out)
}

func parseBridges(jsonText []byte) ([]bridge, error) {
	var links []struct {
		Ifname   string `json:"ifname"`
		Ifindex  int    `json:"ifindex"`
		AddrInfo []struct {
			Local     string `json:"local"`
			Prefixlen int    `json:"prefixlen"`
		} `json:"addr_info"`
	}
	if err := json.Unmarshal(jsonText, &links); err != nil {
		return nil, fmt.Errorf("decoding ip -j output: %w", err)
	}
	var out []bridge
	for _, l := range links {
		b := bridge{Name: l.Ifname, Index: l.Ifindex}
		for _, a := range l.AddrInfo {
			if ip, err := netip.ParseAddr(a.Local); err == nil {
				b.Addrs = append(b.Addrs, netip.PrefixFrom(ip, a.Prefixlen))
			}
		}
		out = append(out, b)
	}
	return out, nil
}

func deleteLink(name string) error {
	if out, err := exec.Command("ip", "link", "del", "dev", name).CombinedOutput(); err != nil {
		return fmt.Errorf("ip link del %s: %v: %s", name, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// removeInstanceBridges deletes the daemon's own bridge and the br-* bridges it created for user
// networks, recognised by an address inside the instance's address pool.
func removeInstanceBridges(st instanceState, logf func(string, ...any)) error {
	if st.Bridge == "" && st.Pool == "" {
		return nil
	}
	bridges, err := listBridges()
	if err != nil {
		return err
	}
	pool, _ := netip.ParsePrefix(st.Pool)
	var errs []error
	for _, b := range bridges {
		if b.Name == st.Bridge || (pool.IsValid() && strings.HasPrefix(b.Name, "br-") && addrsWithin(b.Addrs, pool)) {
			if err := deleteLink(b.Name); err != nil {
				errs = append(errs, err)
			} else if b.Name != st.Bridge {
				logf("testbed: deleted network bridge %s of %s", b.Name, pool)
			}
		}
	}
	return errors.Join(errs...)
}

func addrsWithin(addrs []netip.Prefix, pool netip.Prefix) bool {
	for _, a := range addrs {
		if pool.Contains(a.Addr()) {
			return true
		}
	}
	return false
}

// removeOrphanBridges deletes edsb* bridges that no remaining instance owns: left by a test
// process killed between creating its bridge and recording it, or by a removed instance directory.
func removeOrphanBridges(occupied map[string]instanceState, logf func(string, ...any)) {
	bridges, err := listBridges()
	if err != nil {
		logf("testbed: %v", err)
		return
	}
	owned := ownedBridges(occupied)
	for _, b := range bridges {
		if strings.HasPrefix(b.Name, bridgePrefix) && !owned[b.Name] {
			logf("testbed: deleting orphan bridge %s", b.Name)
			if err := deleteLink(b.Name); err != nil {
				logf("testbed: %v", err)
			}
		}
	}
}

// ownedBridges is the set of the bridges the instances own.
func ownedBridges(occupied map[string]instanceState) map[string]bool {
	owned := map[string]bool{}
	for _, st := range occupied {
		owned[st.Bridge] = true
	}
	return owned
}

// testTablePrefix begins the name of every nftables table a test gives a server of its own
// (EDS_NETFILTER_TABLE), so that the tests' tables never meet a real installation's.
const testTablePrefix = "eds_"

// removeOrphanTables deletes the nftables tables that servers of dead test processes left: a
// server keeps its rules when it stops (EDS_NETFILTER_KEEP, as shipped), and a test killed before
// its cleanup never removes them. Left, a table would masquerade and isolate whatever the next
// daemon on the same slot runs, under another test. An orphan is an eds_* table of family inet
// whose rules name edsb* bridges, none of them owned by a remaining instance or present as a link;
// a table naming none is left alone, since nothing tells whose it is.
func removeOrphanTables(occupied map[string]instanceState, logf func(string, ...any)) {
	tables, err := listTables()
	if err != nil {
		logf("testbed: %v", err)
		return
	}
	owned := ownedBridges(occupied)
	for _, tb := range tables {
		if !tb.ours() || !orphanTable(tb.bridges, owned, linkExists) {
			continue
		}
		logf("testbed: deleting nftables table %s, left by a dead test's server for %s", tb, strings.Join(tb.bridges, ", "))
		if err := tb.delete(); err != nil {
			logf("testbed: %v", err)
		}
	}
}

// nftTable is a table of the host's ruleset, its text (`nft list table`) and the testbed bridges
// its rules name.
type nftTable struct {
	family, name string
	listing      string
	bridges      []string
}

func (tb nftTable) String() string { return tb.family + " " + tb.name }

// ours reports whether a test made the table for a server of its own.
func (tb nftTable) ours() bool {
	return tb.family == "inet" && strings.HasPrefix(tb.name, testTablePrefix)
}

func (tb nftTable) delete() error {
	if out, err := exec.Command("nft", "delete", "table", tb.family, tb.name).CombinedOutput(); err != nil {
		return fmt.Errorf("nft delete table %s: %v: %s", tb, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// listTables lists the host's nftables tables with the testbed bridges each names; none without
// the nft command (then no test made one).
func listTables() ([]nftTable, error) {
	nft, err := exec.LookPath("nft")
	if err != nil {
		return nil, nil
	}
	out, err := exec.Command(nft, "list", "tables").Output()
	if err != nil {
		return nil, fmt.Errorf("nft list tables: %w", err)
	}
	var tables []nftTable
	for _, tb := range parseTables(string(out)) {
		listing, err := exec.Command(nft, "list", "table", tb.family, tb.name).Output()
		if err != nil {
			continue // removed meanwhile by its own test
		}
		tb.listing, tb.bridges = string(listing), tableBridges(string(listing))
		tables = append(tables, tb)
	}
	return tables, nil
}

// parseTables reads `nft list tables`: "table <family> <name>" per line.
func parseTables(listing string) []nftTable {
	var tables []nftTable
	for _, line := range strings.Split(listing, "\n") {
		if f := strings.Fields(line); len(f) == 3 && f[0] == "table" {
			tables = append(tables, nftTable{family: f[1], name: f[2]})
		}
	}
	return tables
}

// NftTablesMentioning lists the host's nftables tables ("inet envoy_docker_shim") whose text
// contains any of needles, e.g. a bridge's quoted name (`"edsb40"`) or a subnet: rules left there
// would act on the network a test is about to set up.
func NftTablesMentioning(needles ...string) ([]string, error) {
	tables, err := listTables()
	var names []string
	for _, tb := range mentioning(tables, needles) {
		names = append(names, tb.String())
	}
	return names, err
}

// mentioning keeps the tables whose text contains any of needles.
func mentioning(tables []nftTable, needles []string) []nftTable {
	var hits []nftTable
	for _, tb := range tables {
		if slices.ContainsFunc(needles, func(n string) bool { return strings.Contains(tb.listing, n) }) {
			hits = append(hits, tb)
		}
	}
	return hits
}

// testbedBridge matches the testbed's bridges as a table's rules name them (iifname "edsb40").
var testbedBridge = regexp.MustCompile(`"(` + bridgePrefix + `[0-9]+)"`)

// tableBridges lists the testbed bridges a table's rules name, sorted, each once.
func tableBridges(listing string) []string {
	var names []string
	for _, m := range testbedBridge.FindAllStringSubmatch(listing, -1) {
		names = append(names, m[1])
	}
	slices.Sort(names)
	return slices.Compact(names)
}

// orphanTable decides from the bridges a table names whether its test is gone: it names some,
// and none belongs to a remaining instance or exists.
func orphanTable(bridges []string, owned map[string]bool, exists func(string) bool) bool {
	if len(bridges) == 0 {
		return false
	}
	for _, b := range bridges {
		if owned[b] || exists(b) {
			return false
		}
	}
	return true
}

// envoyShmPath is the shared memory Envoy's hot restart creates for a base ID; Envoy leaves it
// behind even on a clean exit.
func envoyShmPath(baseID int) string {
	return "/dev/shm/envoy_shared_memory_" + strconv.Itoa(baseID*10)
}
