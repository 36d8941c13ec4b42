package installer

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/services/netfilter"
)

// host is a fake host for one test: the directory the shim goes into, /etc/docker, and the image's
// shim, all in a temporary directory, wired as compose wires them.
type host struct {
	t      *testing.T
	bin    string // the host's install directory, mounted into the "container" as is
	docker string // the host's /etc/docker
	source string // the shim inside the image
	runDir string // envoy-docker-server's run directory
	clock  time.Time
	// tables are the nftables tables RemoveTable finds on this host.
	tables map[string]bool
}

func newHost(t *testing.T) *host {
	dir := t.TempDir()
	h := &host{
		t:      t,
		bin:    filepath.Join(dir, "bin"),
		docker: filepath.Join(dir, "etc-docker"),
		source: filepath.Join(dir, "image", "envoy-docker-shim"),
		runDir: filepath.Join(dir, "run"),
		clock:  time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC),
		tables: map[string]bool{},
	}
	for _, d := range []string{h.bin, h.docker, filepath.Dir(h.source), h.runDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	h.setShim("v1", 0)
	return h
}

// setShim puts a fake shim into the image: a script that prints its version, or fails.
func (h *host) setShim(version string, exitCode int) {
	h.t.Helper()
	script := "#!/bin/sh\necho 'envoy-docker-shim " + version + "'\nexit " + string(rune('0'+exitCode)) + "\n"
	if err := os.WriteFile(h.source, []byte(script), 0o755); err != nil {
		h.t.Fatal(err)
	}
}

func (h *host) daemonJSON() string { return filepath.Join(h.docker, "daemon.json") }
func (h *host) installed() string  { return filepath.Join(h.bin, "envoy-docker-shim") }

func (h *host) config(configure, uninstall bool) Config {
	return Config{
		InstallDir:       h.bin, // in these tests the "host path" and the mount are the same directory
		InstallMount:     h.bin,
		ShimName:         "envoy-docker-shim",
		ShimSource:       h.source,
		ConfigureDockerd: configure,
		DaemonJSON:       h.daemonJSON(),
		DaemonJSONHost:   "/etc/docker/daemon.json",
		Uninstall:        uninstall,
		NftTable:         "envoy_docker_shim",
		RunMount:         h.runDir,
	}
}

func (h *host) run(configure, uninstall bool) (Result, error) {
	h.t.Helper()
	h.clock = h.clock.Add(time.Second)
	now := h.clock
	return Installer{Config: h.config(configure, uninstall), Now: func() time.Time { return now }, RemoveTable: h.removeTable}.Run(context.Background())
}

func (h *host) removeTable(name string) (bool, error) {
	had := h.tables[name]
	delete(h.tables, name)
	return had, nil
}

func (h *host) mustRun(configure, uninstall bool) Result {
	h.t.Helper()
	r, err := h.run(configure, uninstall)
	if err != nil {
		h.t.Fatalf("run (configure=%v uninstall=%v): %v", configure, uninstall, err)
	}
	var b bytes.Buffer
	r.Print(&b)
	h.t.Logf("installer output:\n%s", b.String())
	return r
}

func (h *host) backups() []string {
	h.t.Helper()
	m, err := filepath.Glob(filepath.Join(h.docker, backupPrefix+"*"))
	if err != nil {
		h.t.Fatal(err)
	}
	return m
}

func (h *host) read(path string) []byte {
	h.t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		h.t.Fatal(err)
	}
	return b
}

// fileID is what tells a rewritten file from an untouched one.
type fileID struct {
	ino   uint64
	mtime time.Time
	mode  os.FileMode
}

func (h *host) id(path string) fileID {
	h.t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		h.t.Fatal(err)
	}
	return fileID{fi.Sys().(*syscall.Stat_t).Ino, fi.ModTime(), fi.Mode()}
}

const userDaemonJSON = `{
  "log-driver": "json-file",
  "log-opts": {"max-size": "10m", "max-file": "3"},
  "iptables": true,
  "registry-mirrors": ["https://mirror.example"]
}
`

func TestInstallConfigureIdempotentUninstall(t *testing.T) {
	h := newHost(t)
	if err := os.WriteFile(h.daemonJSON(), []byte(userDaemonJSON), 0o640); err != nil {
		t.Fatal(err)
	}

	r := h.mustRun(true, false)
	if !r.ShimChanged || !r.DaemonChanged || r.DaemonCreated || !r.IPTablesChanged || r.Version != "envoy-docker-shim v1" {
		t.Fatalf("first run: %+v", r)
	}
	if got := h.read(h.installed()); !bytes.Equal(got, h.read(h.source)) {
		t.Error("installed shim differs from the image's")
	}
	if id := h.id(h.installed()); id.mode.Perm() != 0o755 {
		t.Errorf("installed shim mode %v, want 0755", id.mode)
	}
	merged := h.read(h.daemonJSON())
	want := decode(t, []byte(userDaemonJSON))
	want["iptables"] = false
	want["ip6tables"] = false
	want["userland-proxy-path"] = h.installed()
	if got := decode(t, merged); !reflect.DeepEqual(got, want) {
		t.Errorf("daemon.json after install:\n%s", merged)
	}
	if id := h.id(h.daemonJSON()); id.mode.Perm() != 0o640 {
		t.Errorf("daemon.json mode %v, want the user's 0640 kept", id.mode)
	}
	backups := h.backups()
	if len(backups) != 1 || !bytes.Equal(h.read(backups[0]), []byte(userDaemonJSON)) {
		t.Fatalf("backups %q, want one holding the original", backups)
	}
	if filepath.Base(backups[0]) != r.Backup || !strings.HasSuffix(r.Backup, "20260102T030406Z") {
		t.Errorf("backup named %q, result says %q", backups[0], r.Backup)
	}
	if _, err := os.Stat(filepath.Join(h.docker, stateFileName)); err != nil {
		t.Errorf("no installer record: %v", err)
	}
	next := strings.Join(r.Next(), "\n")
	for _, s := range []string{"systemctl restart docker", "stops every running container", "iptables -t nat -S DOCKER", "ip6tables -t nat -S DOCKER"} {
		if !strings.Contains(next, s) {
			t.Errorf("next steps lack %q:\n%s", s, next)
		}
	}

	// Second run: nothing changes, nothing is rewritten, no new backup.
	shimID, jsonID := h.id(h.installed()), h.id(h.daemonJSON())
	r = h.mustRun(true, false)
	if r.ShimChanged || r.DaemonChanged || len(r.Next()) != 0 {
		t.Errorf("second run changed something: %+v, next %q", r, r.Next())
	}
	if h.id(h.installed()) != shimID || h.id(h.daemonJSON()) != jsonID || len(h.backups()) != 1 {
		t.Error("second run rewrote a file or made a backup")
	}
	if !strings.Contains(strings.Join(r.Done(), "\n"), "nothing to restart") {
		t.Errorf("second run does not say there is nothing to restart: %q", r.Done())
	}

	// A new shim version: replaced, daemon.json untouched, no dockerd restart.
	h.setShim("v2", 0)
	r = h.mustRun(true, false)
	if !r.ShimChanged || r.DaemonChanged || r.Version != "envoy-docker-shim v2" {
		t.Errorf("upgrade: %+v", r)
	}
	if next := strings.Join(r.Next(), "\n"); !strings.Contains(next, "No restart needed") {
		t.Errorf("upgrade next steps: %s", next)
	}

	// Uninstall: the user's values come back, the shim and the record go.
	r = h.mustRun(false, true)
	if !r.DaemonChanged || !r.ShimChanged || len(r.Kept) != 0 {
		t.Errorf("uninstall: %+v", r)
	}
	if got := decode(t, h.read(h.daemonJSON())); !reflect.DeepEqual(got, decode(t, []byte(userDaemonJSON))) {
		t.Errorf("daemon.json after uninstall:\n%s", h.read(h.daemonJSON()))
	}
	if _, err := os.Stat(h.installed()); !os.IsNotExist(err) {
		t.Errorf("shim still there after uninstall: %v", err)
	}
	if _, err := os.Stat(filepath.Join(h.docker, stateFileName)); !os.IsNotExist(err) {
		t.Errorf("record still there after uninstall: %v", err)
	}
	if n := len(h.backups()); n != 2 {
		t.Errorf("%d backups after uninstall, want 2 (one before each change)", n)
	}
	if next := strings.Join(r.Next(), "\n"); !strings.Contains(next, "systemctl restart docker") || !strings.Contains(next, "docker compose down") {
		t.Errorf("uninstall next steps: %s", next)
	}

	// Uninstalling again finds nothing to do.
	r = h.mustRun(false, true)
	if r.DaemonChanged || r.ShimChanged {
		t.Errorf("second uninstall: %+v", r)
	}
}

func TestInstallCreatesAndUninstallRemovesDaemonJSON(t *testing.T) {
	h := newHost(t)
	r := h.mustRun(true, false)
	if !r.DaemonChanged || !r.DaemonCreated || r.Backup != "" {
		t.Fatalf("install without daemon.json: %+v", r)
	}
	if len(h.backups()) != 0 {
		t.Error("backup of a file that did not exist")
	}
	r = h.mustRun(false, true)
	if !r.DaemonCreated {
		t.Errorf("uninstall: %+v", r)
	}
	if _, err := os.Stat(h.daemonJSON()); !os.IsNotExist(err) {
		t.Errorf("daemon.json the installer created is still there: %v", err)
	}
}

func TestInstallKeepsUserKeysAddedLater(t *testing.T) {
	h := newHost(t)
	h.mustRun(true, false)
	// The user adds a key after the install; uninstall must keep it and the file.
	doc, err := parseDocument(h.read(h.daemonJSON()))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(h.daemonJSON(), doc.set("debug", json.RawMessage("true")).encode(), 0o644); err != nil {
		t.Fatal(err)
	}
	h.mustRun(false, true)
	if got := decode(t, h.read(h.daemonJSON())); !reflect.DeepEqual(got, map[string]any{"debug": true}) {
		t.Errorf("after uninstall: %v", got)
	}
}

func TestInvalidDaemonJSONIsLeftAlone(t *testing.T) {
	h := newHost(t)
	bad := []byte("{\n  \"debug\": true,\n}\n")
	if err := os.WriteFile(h.daemonJSON(), bad, 0o644); err != nil {
		t.Fatal(err)
	}
	r, err := h.run(true, false)
	if err == nil || !strings.Contains(err.Error(), "invalid JSON") || !strings.Contains(err.Error(), "nothing was changed") {
		t.Fatalf("error %v, want invalid JSON and nothing changed", err)
	}
	if !bytes.Equal(h.read(h.daemonJSON()), bad) || len(h.backups()) != 0 {
		t.Error("an invalid daemon.json was touched")
	}
	if _, err := os.Stat(filepath.Join(h.docker, stateFileName)); !os.IsNotExist(err) {
		t.Error("record written for a failed merge")
	}
	if r.Version == "" {
		t.Error("the shim step's result was lost")
	}
}

func TestBrokenShimNeverReplacesAWorkingOne(t *testing.T) {
	h := newHost(t)
	h.mustRun(false, false)
	good := h.read(h.installed())
	h.setShim("broken", 3)
	if _, err := h.run(false, false); err == nil || !strings.Contains(err.Error(), "not installed") {
		t.Fatalf("error %v, want the broken shim refused", err)
	}
	if !bytes.Equal(h.read(h.installed()), good) {
		t.Error("the working shim was replaced")
	}
	left, _ := filepath.Glob(filepath.Join(h.bin, ".envoy-docker-shim.install-*"))
	if len(left) != 0 {
		t.Errorf("temporary files left: %q", left)
	}
}

func TestWithoutConfigureDaemonJSONIsUntouched(t *testing.T) {
	h := newHost(t)
	if err := os.WriteFile(h.daemonJSON(), []byte(userDaemonJSON), 0o644); err != nil {
		t.Fatal(err)
	}
	r := h.mustRun(false, false)
	if r.DaemonChanged || r.Configured || !bytes.Equal(h.read(h.daemonJSON()), []byte(userDaemonJSON)) {
		t.Errorf("daemon.json touched without EDS_CONFIGURE_DOCKERD: %+v", r)
	}
	next := strings.Join(r.Next(), "\n")
	if !strings.Contains(next, "EDS_CONFIGURE_DOCKERD=true") || !strings.Contains(next, `"userland-proxy-path": "`+h.installed()+`"`) {
		t.Errorf("next steps do not say how to configure dockerd:\n%s", next)
	}
}

func TestUninstallWarnsAboutHandConfiguredDaemon(t *testing.T) {
	h := newHost(t)
	h.mustRun(false, false)
	hand := `{"userland-proxy-path": "` + h.installed() + `", "iptables": false, "ip6tables": false, "live-restore": true}`
	if err := os.WriteFile(h.daemonJSON(), []byte(hand), 0o644); err != nil {
		t.Fatal(err)
	}
	r := h.mustRun(false, true)
	if r.DaemonChanged || !r.Configured || string(h.read(h.daemonJSON())) != hand {
		t.Errorf("uninstall touched a daemon.json it did not configure: %+v", r)
	}
	if next := strings.Join(r.Next(), "\n"); !strings.Contains(next, "did not set") {
		t.Errorf("no warning that dockerd still names the removed shim:\n%s", next)
	}
}

func TestNextStepsLiveRestore(t *testing.T) {
	r := Result{ShimPath: "/usr/local/bin/envoy-docker-shim", DaemonJSON: "/etc/docker/daemon.json", DaemonChanged: true, Configured: true, LiveRestore: true}
	next := strings.Join(r.Next(), "\n")
	if !strings.Contains(next, "live-restore is on") || strings.Contains(next, "stops every running container") {
		t.Errorf("live-restore next steps:\n%s", next)
	}
	if strings.Contains(next, "iptables -t nat") {
		t.Error("iptables advice without an iptables change")
	}
}

func TestConfigValidate(t *testing.T) {
	good := Config{InstallDir: "/usr/local/bin", InstallMount: "/host/bin", ShimName: "envoy-docker-shim", ShimSource: "/envoy-docker-shim", DaemonJSON: "/host/etc/docker/daemon.json",
		NftTable: "envoy_docker_shim", RunMount: "/run/envoy-docker-shim"}
	if err := good.Validate(); err != nil {
		t.Fatal(err)
	}
	for _, mutate := range []func(*Config){
		func(c *Config) { c.InstallDir = "usr/local/bin" },
		func(c *Config) { c.InstallDir = "/usr/local/bin/" },
		func(c *Config) { c.ShimName = "a/b" },
		func(c *Config) { c.ShimName = ".." },
		func(c *Config) { c.DaemonJSON = "" },
		func(c *Config) { c.RunMount = "" },
		func(c *Config) { c.NftTable = "" },
		func(c *Config) { c.NftTable = "x; flush ruleset" },
	} {
		c := good
		mutate(&c)
		if err := c.Validate(); err == nil {
			t.Errorf("Validate accepted %+v", c)
		}
	}
	if got := good.HostShimPath(); got != "/usr/local/bin/envoy-docker-shim" {
		t.Errorf("HostShimPath = %q", got)
	}
}

func TestConfigFromEnvDefaults(t *testing.T) {
	for _, k := range []string{"EDS_INSTALL_DIR", "EDS_INSTALL_MOUNT", "EDS_SHIM_NAME", "EDS_SHIM_SOURCE", "EDS_CONFIGURE_DOCKERD", "EDS_DAEMON_JSON", "EDS_DAEMON_JSON_HOST", "EDS_UNINSTALL", "EDS_NETFILTER_TABLE", "EDS_RUN_MOUNT"} {
		t.Setenv(k, "")
		os.Unsetenv(k)
	}
	c, err := ConfigFromEnv()
	if err != nil {
		t.Fatal(err)
	}
	if c.HostShimPath() != "/usr/local/bin/envoy-docker-shim" || c.ConfigureDockerd || c.Uninstall || c.DaemonJSON != "/host/etc/docker/daemon.json" ||
		c.NftTable != "envoy_docker_shim" || c.RunMount != "/run/envoy-docker-shim" {
		t.Errorf("defaults: %+v", c)
	}
	t.Setenv("EDS_CONFIGURE_DOCKERD", "true")
	if c, err := ConfigFromEnv(); err != nil || !c.ConfigureDockerd {
		t.Errorf("EDS_CONFIGURE_DOCKERD=true: %+v, %v", c, err)
	}
}

// Uninstall removes envoy-docker-server's nftables table, after leaving the mark that keeps a
// server still running from restoring it; installing again removes the mark. The table is
// looked for even when dockerd was never configured by the installer: the server makes it
// whenever it runs.
func TestUninstallRemovesTheServersRules(t *testing.T) {
	h := newHost(t)
	h.mustRun(true, false)
	h.tables["envoy_docker_shim"] = true
	h.tables["someone_elses"] = true

	r := h.mustRun(false, true)
	if !r.TableChecked || !r.TableRemoved || h.tables["envoy_docker_shim"] || !h.tables["someone_elses"] {
		t.Errorf("uninstall: checked=%v removed=%v, tables left %v", r.TableChecked, r.TableRemoved, h.tables)
	}
	if !netfilter.Uninstalled(h.runDir) {
		t.Error("uninstall left no mark for a server still running")
	}
	if done := strings.Join(r.Done(), "\n"); !strings.Contains(done, "removed the nftables table inet envoy_docker_shim") {
		t.Errorf("uninstall does not say it removed the rules:\n%s", done)
	}

	r = h.mustRun(false, true)
	if !r.TableChecked || r.TableRemoved {
		t.Errorf("second uninstall: checked=%v removed=%v", r.TableChecked, r.TableRemoved)
	}
	if done := strings.Join(r.Done(), "\n"); !strings.Contains(done, "no nftables table inet envoy_docker_shim to remove") {
		t.Errorf("second uninstall:\n%s", done)
	}

	r = h.mustRun(false, false)
	if !r.MarkCleared || netfilter.Uninstalled(h.runDir) {
		t.Errorf("install after uninstall: mark cleared=%v, still marked=%v", r.MarkCleared, netfilter.Uninstalled(h.runDir))
	}
	if done := strings.Join(r.Done(), "\n"); !strings.Contains(done, "restores its netfilter rules again") {
		t.Errorf("install after uninstall does not say the rules come back:\n%s", done)
	}
	if r = h.mustRun(false, false); r.MarkCleared {
		t.Error("a second install reports clearing a mark again")
	}
}

// Without the run directory the mark cannot be left: uninstall says what to mount.
func TestUninstallWithoutRunDirectory(t *testing.T) {
	h := newHost(t)
	h.mustRun(true, false)
	if err := os.Remove(h.runDir); err != nil {
		t.Fatal(err)
	}
	_, err := h.run(false, true)
	if err == nil || !strings.Contains(err.Error(), "EDS_RUN_DIR") {
		t.Errorf("uninstall without the run directory: %v", err)
	}
}
