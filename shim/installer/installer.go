// Package installer puts the static envoy-docker-shim on a Docker host and, when asked, points the
// host's dockerd at it. It runs in the installer container with two host directories mounted: the
// one the shim goes into (default /usr/local/bin) and the one holding daemon.json (/etc/docker).
//
// It owns: copying the shim atomically (temp file, verify it runs, rename), merging the shim's
// settings into daemon.json while keeping every other key (backup first, idempotent), recording
// what it changed so that uninstall restores exactly that, and telling the operator precisely what
// to restart.
//
// It must never: write a daemon.json it could not parse, touch a daemon.json key other than the
// three it manages, replace a working shim with one that does not run, or restart anything itself
// (restarting dockerd stops containers; that is the operator's call).
package installer

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/kelseyhightower/envconfig"

	"github.com/envoy-docker-shim/envoy-docker-shim/services/netfilter"
)

// Config is every setting of the installer, read from the environment.
type Config struct {
	InstallDir       string `envconfig:"EDS_INSTALL_DIR" default:"/usr/local/bin" desc:"Host directory the shim is installed into, as the host sees it; daemon.json names the shim by this path."`
	InstallMount     string `envconfig:"EDS_INSTALL_MOUNT" default:"/host/bin" desc:"Where EDS_INSTALL_DIR is mounted in the installer container."`
	ShimName         string `envconfig:"EDS_SHIM_NAME" default:"envoy-docker-shim" desc:"File name of the installed shim (resync looks for processes of this name)."`
	ShimSource       string `envconfig:"EDS_SHIM_SOURCE" default:"/envoy-docker-shim" desc:"The static shim binary to install, inside the installer image."`
	ConfigureDockerd bool   `envconfig:"EDS_CONFIGURE_DOCKERD" default:"false" desc:"true: merge userland-proxy-path, \"iptables\": false and \"ip6tables\": false into daemon.json (timestamped backup first; idempotent)."`
	DaemonJSON       string `envconfig:"EDS_DAEMON_JSON" default:"/host/etc/docker/daemon.json" desc:"The host's daemon.json inside the installer container; mount its directory, not the file, so it can be replaced atomically."`
	DaemonJSONHost   string `envconfig:"EDS_DAEMON_JSON_HOST" default:"/etc/docker/daemon.json" desc:"The same file as the host sees it, for messages."`
	Uninstall        bool   `envconfig:"EDS_UNINSTALL" default:"false" desc:"true: restore the daemon.json values the installer changed, remove the shim, and remove envoy-docker-server's netfilter rules (the nftables table EDS_NETFILTER_TABLE)."`
	NftTable         string `envconfig:"EDS_NETFILTER_TABLE" default:"envoy_docker_shim" desc:"envoy-docker-server's nftables table (family inet; the server's EDS_NETFILTER_TABLE), which uninstall removes."`
	RunMount         string `envconfig:"EDS_RUN_MOUNT" default:"/run/envoy-docker-shim" desc:"envoy-docker-server's run directory (EDS_RUN_DIR on the host) inside the installer container: uninstall leaves a mark there so that a server still running does not restore its netfilter rules; install removes the mark."`
}

// ConfigFromEnv reads Config from the environment and checks it.
func ConfigFromEnv() (Config, error) {
	var c Config
	if err := envconfig.Process("", &c); err != nil {
		return Config{}, fmt.Errorf("configuration: %w", err)
	}
	return c, c.Validate()
}

// Validate rejects settings that would put the shim somewhere dockerd cannot name.
func (c Config) Validate() error {
	if err := checkShimPath(c.InstallDir); err != nil {
		return fmt.Errorf("configuration: EDS_INSTALL_DIR: %w", err)
	}
	if c.ShimName == "" || strings.ContainsAny(c.ShimName, "/\x00\n") || c.ShimName == "." || c.ShimName == ".." {
		return fmt.Errorf("configuration: EDS_SHIM_NAME=%q: want a plain file name", c.ShimName)
	}
	if c.InstallMount == "" || c.DaemonJSON == "" || c.ShimSource == "" || c.RunMount == "" {
		return errors.New("configuration: EDS_INSTALL_MOUNT, EDS_DAEMON_JSON, EDS_SHIM_SOURCE and EDS_RUN_MOUNT must not be empty")
	}
	if err := netfilter.CheckTable(c.NftTable); err != nil {
		return fmt.Errorf("configuration: EDS_NETFILTER_TABLE: %w", err)
	}
	return nil
}

// HostShimPath is the shim's path on the host: what dockerd is given as userland-proxy-path.
func (c Config) HostShimPath() string { return filepath.Join(c.InstallDir, c.ShimName) }

func (c Config) target() string    { return filepath.Join(c.InstallMount, c.ShimName) }
func (c Config) statePath() string { return filepath.Join(filepath.Dir(c.DaemonJSON), stateFileName) }

// stateFileName records what the installer changed in daemon.json, beside it. dockerd reads only
// daemon.json itself, so the file is invisible to it.
const stateFileName = "envoy-docker-shim-install.json"

// backupPrefix starts the name of every daemon.json backup, followed by a UTC timestamp.
const backupPrefix = "daemon.json.envoy-docker-shim-backup-"

// verifyTimeout bounds `shim -version`: a shim that hangs there would hang dockerd too.
const verifyTimeout = 10 * time.Second

// Installer carries out one run. Now is the clock for backup names.
type Installer struct {
	Config
	Now func() time.Time
	// RemoveTable removes envoy-docker-server's nftables table on uninstall and says whether there
	// was one; nil leaves the host's nftables alone (unit tests).
	RemoveTable func(name string) (removed bool, err error)
}

// Result says what a run did; Next turns it into instructions.
type Result struct {
	Uninstall   bool
	ShimPath    string // on the host
	ShimChanged bool   // installed or replaced (install), removed (uninstall)
	Version     string // what the installed shim printed for -version

	DaemonJSON      string // on the host
	ConfigureAsked  bool
	DaemonChanged   bool
	DaemonCreated   bool // install: daemon.json did not exist; uninstall: it was removed again
	Configured      bool // after the run, daemon.json makes dockerd run the shim
	Backup          string
	Set             []Previous // install: the keys changed, with what they held before
	Kept            []string   // uninstall: keys the user changed since install, left alone
	IPTablesChanged bool       // install: iptables went from enabled (absent or true) to false
	// IP6TablesChanged: ip6tables went from absent or true to false (absent is on in Docker 27+).
	IP6TablesChanged bool
	LiveRestore      bool

	NftTable     string // envoy-docker-server's nftables table
	TableChecked bool   // uninstall: looked for the table (and removed it if TableRemoved)
	TableRemoved bool
	MarkCleared  bool // install: an earlier uninstall's mark was removed
}

// Run installs (or, with Uninstall, removes) the shim and returns what it did.
func (in Installer) Run(ctx context.Context) (Result, error) {
	if err := in.Validate(); err != nil {
		return Result{}, err
	}
	if in.Now == nil {
		in.Now = time.Now
	}
	r := Result{
		Uninstall:      in.Uninstall,
		ShimPath:       in.HostShimPath(),
		DaemonJSON:     in.DaemonJSONHost,
		ConfigureAsked: in.ConfigureDockerd,
		NftTable:       in.NftTable,
	}
	if in.Uninstall {
		return r, in.uninstall(&r)
	}
	cleared, err := netfilter.ClearUninstalled(in.RunMount)
	if err != nil {
		return r, err
	}
	r.MarkCleared = cleared
	changed, version, err := installFile(ctx, in.ShimSource, in.target())
	if err != nil {
		return r, err
	}
	r.ShimChanged, r.Version = changed, version
	if in.ConfigureDockerd {
		err = in.configure(&r)
	} else {
		err = in.inspect(&r)
	}
	return r, err
}

// installFile copies src to dst unless dst already has the same bytes and mode 0755. The copy is
// written to a temporary file in dst's directory, made executable, run with -version, and only
// then renamed over dst: a shim that does not run never replaces one that does, and dockerd never
// sees a half-written file. Running shims keep their old inode.
func installFile(ctx context.Context, src, dst string) (changed bool, version string, err error) {
	want, err := os.ReadFile(src)
	if err != nil {
		return false, "", fmt.Errorf("reading the shim to install: %w", err)
	}
	dir := filepath.Dir(dst)
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
		return false, "", fmt.Errorf("install directory %s is not there: mount the host directory at it (%v)", dir, err)
	}
	if fi, err := os.Lstat(dst); err == nil && fi.Mode().IsRegular() && fi.Mode().Perm() == 0o755 {
		if have, err := os.ReadFile(dst); err == nil && bytes.Equal(have, want) {
			version, err := verify(ctx, dst)
			return false, version, err
		}
	}
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(dst)+".install-*")
	if err != nil {
		return false, "", fmt.Errorf("creating a temporary file in %s: %w", dir, err)
	}
	tmpName := tmp.Name()
	defer func() {
		if err != nil {
			_ = os.Remove(tmpName)
		}
	}()
	if _, err = tmp.Write(want); err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return false, "", fmt.Errorf("writing %s: %w", tmpName, err)
	}
	if err = os.Chmod(tmpName, 0o755); err != nil {
		return false, "", err
	}
	if version, err = verify(ctx, tmpName); err != nil {
		return false, "", fmt.Errorf("the new shim does not run from %s, so it was not installed: %w", dir, err)
	}
	if err = os.Rename(tmpName, dst); err != nil {
		return false, "", fmt.Errorf("installing %s: %w", dst, err)
	}
	syncDir(dir)
	if version, err = verify(ctx, dst); err != nil {
		return true, "", err
	}
	return true, version, nil
}

// verify runs `path -version` and returns the first line it printed.
func verify(ctx context.Context, path string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, verifyTimeout)
	defer cancel()
	var out []byte
	var err error
	// A file just closed after writing can still read as busy to exec for a moment when another
	// thread forked meanwhile (ETXTBSY); retry briefly.
	for range 20 {
		cmd := exec.CommandContext(ctx, path, "-version")
		cmd.WaitDelay = time.Second
		out, err = cmd.CombinedOutput()
		if !errors.Is(err, syscall.ETXTBSY) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	if err != nil {
		if line != "" {
			return "", fmt.Errorf("%s -version: %w: %s", path, err, line)
		}
		return "", fmt.Errorf("%s -version: %w", path, err)
	}
	if line == "" {
		return "", fmt.Errorf("%s -version printed nothing", path)
	}
	return line, nil
}

// state is what the installer changed in daemon.json, kept beside it for uninstall.
type state struct {
	Shim     string     `json:"shim"`
	Created  bool       `json:"created,omitempty"`
	Backup   string     `json:"backup,omitempty"`
	Previous []Previous `json:"previous"`
}

func (in Installer) configure(r *Result) error {
	orig, err := os.ReadFile(in.DaemonJSON)
	missing := errors.Is(err, fs.ErrNotExist)
	if err != nil && !missing {
		return fmt.Errorf("reading %s: %w", in.DaemonJSONHost, err)
	}
	out, prev, changed, err := Merge(orig, r.ShimPath)
	if err != nil {
		return fmt.Errorf("%s: %w; nothing was changed", in.DaemonJSONHost, err)
	}
	r.LiveRestore = LiveRestore(out)
	r.Configured = true
	if !changed {
		return nil
	}
	st, err := readState(in.statePath())
	if err != nil {
		return err
	}
	if st == nil {
		st = &state{Created: missing}
	}
	// A key already recorded keeps its first value: the one before the installer ever touched it,
	// also when the shim moved (EDS_INSTALL_DIR changed) or the user reverted a key by hand.
	st.Shim = r.ShimPath
	st.Previous = adoptPrevious(st.Previous, prev)
	if !missing {
		backup, err := writeBackup(filepath.Dir(in.DaemonJSON), orig, in.Now())
		if err != nil {
			return err
		}
		r.Backup = backup
		if st.Backup == "" {
			st.Backup = backup
		}
	}
	// The record first: once daemon.json changes, uninstall must know how to undo it.
	if err := writeState(in.statePath(), st); err != nil {
		return err
	}
	if err := writeFileAtomic(in.DaemonJSON, out, 0o644); err != nil {
		return err
	}
	r.DaemonChanged, r.DaemonCreated, r.Set = true, missing, prev
	for _, p := range prev {
		if p.Key == KeyIPTables && !(p.Present && isBool(p.Value, false)) {
			r.IPTablesChanged = true
		}
		if p.Key == KeyIP6Tables && !(p.Present && isBool(p.Value, false)) {
			r.IP6TablesChanged = true
		}
	}
	return nil
}

// adoptPrevious adds to have the keys of more it does not record yet: a key's first recorded value
// is the one from before the installer ever touched it.
func adoptPrevious(have, more []Previous) []Previous {
	for _, p := range more {
		found := false
		for _, h := range have {
			found = found || h.Key == p.Key
		}
		if !found {
			have = append(have, p)
		}
	}
	return have
}

// inspect reports, without changing it, whether daemon.json already points dockerd at the shim.
func (in Installer) inspect(r *Result) error {
	b, err := os.ReadFile(in.DaemonJSON)
	if err != nil {
		return nil // not mounted or not there: the instructions say what to add
	}
	r.LiveRestore = LiveRestore(b)
	r.Configured, _ = Configured(b, r.ShimPath)
	return nil
}

func (in Installer) uninstall(r *Result) error {
	st, err := readState(in.statePath())
	if err != nil {
		return err
	}
	cur, rerr := os.ReadFile(in.DaemonJSON)
	if rerr != nil && !errors.Is(rerr, fs.ErrNotExist) {
		return fmt.Errorf("reading %s: %w", in.DaemonJSONHost, rerr)
	}
	r.LiveRestore = LiveRestore(cur)
	if st != nil && rerr == nil {
		out, kept, changed, err := Restore(cur, st.Shim, st.Previous)
		if err != nil {
			return fmt.Errorf("%s: %w; nothing was changed", in.DaemonJSONHost, err)
		}
		r.Kept = kept
		if changed {
			backup, err := writeBackup(filepath.Dir(in.DaemonJSON), cur, in.Now())
			if err != nil {
				return err
			}
			r.Backup, r.DaemonChanged = backup, true
			if doc, _ := parseDocument(out); st.Created && len(doc) == 0 {
				// The installer created daemon.json; nothing else was ever put in it.
				if err := os.Remove(in.DaemonJSON); err != nil {
					return err
				}
				r.DaemonCreated = true
			} else if err := writeFileAtomic(in.DaemonJSON, out, 0o644); err != nil {
				return err
			}
		}
	}
	if st != nil {
		if err := os.Remove(in.statePath()); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	if p, ok := ProxyPath(readOrNil(in.DaemonJSON)); ok && p == r.ShimPath {
		r.Configured = true // still named there: the operator configured it by hand
	}
	removed, err := removeShim(in.target())
	r.ShimChanged = removed
	return errors.Join(err, in.removeRules(r))
}

// removeRules takes away envoy-docker-server's netfilter rules: the mark first, so that a server
// still running (the operator stops it only after restarting dockerd) does not restore them, and
// keeps none when it stops; then the table itself.
func (in Installer) removeRules(r *Result) error {
	if err := netfilter.MarkUninstalled(in.RunMount); err != nil {
		return fmt.Errorf("%w: mount the host's envoy-docker-server run directory (EDS_RUN_DIR) at %s", err, in.RunMount)
	}
	if in.RemoveTable == nil {
		return nil
	}
	removed, err := in.RemoveTable(in.NftTable)
	if err != nil {
		return err
	}
	r.TableChecked, r.TableRemoved = true, removed
	return nil
}

func readOrNil(path string) []byte {
	b, _ := os.ReadFile(path)
	return b
}

// removeShim removes the installed shim and any temporary file an interrupted install left.
func removeShim(target string) (bool, error) {
	leftovers, _ := filepath.Glob(filepath.Join(filepath.Dir(target), "."+filepath.Base(target)+".install-*"))
	for _, l := range leftovers {
		_ = os.Remove(l)
	}
	fi, err := os.Lstat(target)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if fi.IsDir() {
		return false, fmt.Errorf("%s is a directory, not the shim; left alone", target)
	}
	if err := os.Remove(target); err != nil {
		return false, err
	}
	syncDir(filepath.Dir(target))
	return true, nil
}

func readState(path string) (*state, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading the installer's record %s: %w", path, err)
	}
	var st state
	if err := jsonUnmarshalStrict(b, &st); err != nil {
		return nil, fmt.Errorf("the installer's record %s is damaged (%v): compare daemon.json with its backups (%s*) and remove the record", path, err, backupPrefix)
	}
	return &st, nil
}

func writeState(path string, st *state) error {
	b, err := jsonMarshalIndent(st)
	if err != nil {
		return err
	}
	return writeFileAtomic(path, b, 0o644)
}

// writeBackup writes orig to a new file named after the time, never overwriting an older backup.
func writeBackup(dir string, orig []byte, now time.Time) (string, error) {
	base := backupPrefix + now.UTC().Format("20060102T150405Z")
	for i := 1; i < 100; i++ {
		name := base
		if i > 1 {
			name = fmt.Sprintf("%s-%d", base, i)
		}
		f, err := os.OpenFile(filepath.Join(dir, name), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
		if errors.Is(err, fs.ErrExist) {
			continue
		}
		if err != nil {
			return "", fmt.Errorf("writing a backup of daemon.json: %w", err)
		}
		_, err = f.Write(orig)
		if err == nil {
			err = f.Sync()
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return "", fmt.Errorf("writing a backup of daemon.json: %w", err)
		}
		return name, nil
	}
	return "", fmt.Errorf("writing a backup of daemon.json: too many backups named %s*", base)
}

// writeFileAtomic replaces path with data through a temporary file and a rename, keeping the mode
// of the file it replaces. Its directory must be the mount, not the file itself: a bind-mounted
// file cannot be renamed over.
func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	if fi, err := os.Stat(path); err == nil {
		mode = fi.Mode().Perm()
	}
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	name := tmp.Name()
	_, err = tmp.Write(data)
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(name, mode)
	}
	if err == nil {
		err = os.Rename(name, path)
	}
	if err != nil {
		_ = os.Remove(name)
		return fmt.Errorf("writing %s: %w", path, err)
	}
	syncDir(dir)
	return nil
}

func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		_ = d.Close()
	}
}

// Print writes the report of a run: what changed, then exactly what the operator has to do.
func (r Result) Print(w io.Writer) {
	for _, l := range r.Done() {
		fmt.Fprintln(w, l)
	}
	next := r.Next()
	if len(next) == 0 {
		return
	}
	fmt.Fprintln(w, "next:")
	for i, l := range next {
		fmt.Fprintf(w, "  %d. %s\n", i+1, l)
	}
}
