package appliance

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
)

// The fake host's daemon.json before the install: the user's keys must survive the merge.
const userDaemonJSON = `{
  "log-driver": "json-file",
  "log-opts": {"max-size": "10m", "max-file": "3"},
  "iptables": true,
  "default-address-pools": [{"base": "10.123.0.0/16", "size": 24}]
}
`

// TestE2EAppliance proves the appliance offline on a private dockerd of each generation: the four
// images build from this repository with stand-in base images (on the first daemon; the others
// load them); `compose up -d` installs the shim the daemon uses, configures the fake host's
// daemon.json, and brings server and Envoy up healthy; a labelled container published with -p
// answers through Envoy under its labels' name; a second installer run changes nothing; `compose
// down` and `up` come back to the same state. The UI serves.
func TestE2EAppliance(t *testing.T) {
	for _, gen := range testbed.Generations(t) {
		t.Run(string(gen), func(t *testing.T) {
			start := time.Now()
			testAppliance(t, startShared(t, Options{Generation: gen, DaemonJSON: userDaemonJSON, ConfigureDockerd: true}), start)
		})
	}
}

func testAppliance(t *testing.T, a *Appliance, start time.Time) {
	if !a.HasShim {
		t.Fatalf("the shim (%s) is missing from the installer image", ShimPackage)
	}

	// The installer replaced the placeholder with the image's shim, which runs.
	installerLog := a.Logs(t, a.Container(t, "installer"))
	t.Logf("installer output:\n%s", installerLog)
	shimVersion := checkShimInstalled(t, a)
	if !strings.Contains(installerLog, "installed "+a.ShimPath) {
		t.Errorf("installer did not report installing %s", a.ShimPath)
	}
	for _, want := range []string{"systemctl restart docker", "iptables -t nat -S DOCKER"} {
		if !strings.Contains(installerLog, want) {
			t.Errorf("installer's next steps lack %q", want)
		}
	}
	checkDaemonJSON(t, a)
	checkNetfilter(t, a, true)
	backups := backupsOf(t, a)
	if len(backups) != 1 || !bytes.Equal(readFile(t, backups[0]), []byte(userDaemonJSON)) {
		t.Fatalf("daemon.json backups %q, want one holding the original", backups)
	}

	// A labelled container published on loopback answers through Envoy.
	port := testbed.FreePort(t)
	web := a.Daemon.Run(t, testbed.RunOptions{
		Publish: []string{fmt.Sprintf("127.0.0.1:%d:80", port)},
		Labels:  map[string]string{"ServiceName": "web", "EnvironmentName": "e2e"},
	})
	url := fmt.Sprintf("http://127.0.0.1:%d/hello", port)
	requestThroughEnvoy(t, a, url, web.Name)
	regs := a.Registrations(t)
	if len(regs) != 1 || regs[0].Service != "web-e2e" || regs[0].ContainerID != web.ID || regs[0].Mode != "MODE_HTTP" {
		t.Fatalf("registrations %+v, want one web-e2e HTTP mapping of %s", regs, web.ID)
	}
	listeners := a.Listeners(t)
	if !slices.Contains(listeners, regs[0].Listener) {
		t.Fatalf("Envoy's listeners %q lack %s", listeners, regs[0].Listener)
	}
	// The Envoy container's UI (ENVOY_UI_LISTEN_PORT) serves its page and the port's traffic.
	if page := a.get(t, "http://"+a.UIAddr+"/"); !strings.Contains(page, "<title>envoy-docker-shim</title>") {
		t.Errorf("the UI page on %s is not the appliance's:\n%.300s", a.UIAddr, page)
	}
	if stats := a.get(t, "http://"+a.UIAddr+"/stats?filter=%5Ehttp%5C.web-e2e%5C.downstream_rq_total"); !strings.Contains(stats, "http.web-e2e.downstream_rq_total") {
		t.Errorf("the UI's metrics lack web-e2e: %q", stats)
	}
	// The UI reaches the server's /ports (compose passes EDS_HTTP_ADDR to both): the container's
	// name and image.
	if ports := a.get(t, "http://"+a.UIAddr+"/ports"); !strings.Contains(ports, fmt.Sprintf(`"container_name":%q,"image":%q`, web.Name, testbed.EchoImageTag)) {
		t.Errorf("the UI's /ports lacks %s and its image: %.500s", web.Name, ports)
	}

	// The installer a second time: same result, nothing rewritten, no new backup.
	shimBefore, jsonBefore := identity(t, a.ShimPath), identity(t, daemonJSONPath(a))
	out := a.Compose(t, "run", "--rm", "-T", "installer")
	t.Logf("second installer run:\n%s", out)
	if !strings.Contains(out, "nothing changed: nothing to restart") || !strings.Contains(out, "up to date") {
		t.Errorf("second installer run did not report an unchanged install")
	}
	if identity(t, a.ShimPath) != shimBefore || identity(t, daemonJSONPath(a)) != jsonBefore {
		t.Error("second installer run rewrote the shim or daemon.json")
	}
	if n := len(backupsOf(t, a)); n != 1 {
		t.Errorf("%d daemon.json backups after the second run, want 1", n)
	}
	requestThroughEnvoy(t, a, url, web.Name)

	// compose down, then up: the same state, nothing stale.
	a.Down(t)
	if left := a.Containers(t, ""); len(left) != 0 {
		t.Fatalf("containers left after compose down: %q", left)
	}
	checkNetfilter(t, a, true) // kept while the server is down (EDS_NETFILTER_KEEP)
	a.Up(t)
	requestThroughEnvoy(t, a, url, web.Name)
	if got := a.Registrations(t); !reflect.DeepEqual(got, regs) {
		t.Errorf("registrations after down and up:\n%+v\nwant\n%+v", got, regs)
	}
	if got := a.Listeners(t); !reflect.DeepEqual(got, listeners) {
		t.Errorf("Envoy's listeners after down and up: %q, want %q", got, listeners)
	}
	if n := len(a.Containers(t, "")); n != 4 {
		t.Errorf("%d appliance containers after up, want 4 (server, envoy, installer, resync)", n)
	}
	if v := checkShimInstalled(t, a); v != shimVersion {
		t.Errorf("shim version %q after down and up, want %q", v, shimVersion)
	}
	checkDaemonJSON(t, a)
	if n := len(backupsOf(t, a)); n != 1 {
		t.Errorf("%d daemon.json backups after down and up, want 1", n)
	}
	checkNoLeftovers(t, a)
	checkImages(t, a)

	// Uninstall, as the README tells an operator: the user's daemon.json comes back, the shim goes.
	ctx, cancel := context.WithTimeout(context.Background(), composeTimeout)
	defer cancel()
	out, err := a.ComposeEnvErr(ctx, []string{"EDS_UNINSTALL=true"}, "run", "--rm", "-T", "installer")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("uninstall:\n%s", out)
	var got, want map[string]any
	if err := json.Unmarshal(readFile(t, daemonJSONPath(a)), &got); err != nil {
		t.Fatal(err)
	}
	_ = json.Unmarshal([]byte(userDaemonJSON), &want)
	if !reflect.DeepEqual(got, want) {
		t.Errorf("daemon.json after uninstall = %v, want the user's %v", got, want)
	}
	if _, err := os.Stat(a.ShimPath); !os.IsNotExist(err) {
		t.Errorf("shim still there after uninstall: %v", err)
	}
	if !strings.Contains(out, "systemctl restart docker") {
		t.Error("uninstall did not say to restart dockerd")
	}
	if !strings.Contains(out, "removed the nftables table inet "+a.NetfilterTable.Name) {
		t.Error("uninstall did not say it removed the server's netfilter rules")
	}
	checkNetfilter(t, a, false)
	// compose down after uninstall keeps nothing (the uninstall mark overrides EDS_NETFILTER_KEEP).
	a.Down(t)
	checkNetfilter(t, a, false)
	t.Logf("TestE2EAppliance: %s in all", time.Since(start).Round(100*time.Millisecond))
}

// answeredBy checks that the echo server named name answers url.
func answeredBy(url, name string) error {
	status, body, err := testbed.HTTPGet(context.Background(), url)
	if err != nil {
		return err
	}
	var reply struct{ Name string }
	if status != 200 || json.Unmarshal([]byte(body), &reply) != nil || reply.Name != name {
		return fmt.Errorf("%s: status %d body %q, want the echo server %s", url, status, body, name)
	}
	return nil
}

// sameMappings compares registrations by mapping and service, not by shim pid or ready time.
func sameMappings(got, want []Registration) bool {
	key := func(rs []Registration) []string {
		var out []string
		for _, r := range rs {
			out = append(out, fmt.Sprintf("%+v %s %s", r.Mapping, r.Service, r.Listener))
		}
		slices.Sort(out)
		return out
	}
	return slices.Equal(key(got), key(want))
}

// checkImages checks what the Dockerfiles promise of each image: OCI labels with the version, the
// user, and a healthcheck for the long-running ones.
func checkImages(t *testing.T, a *Appliance) {
	t.Helper()
	for _, img := range []struct {
		name, title string
		health      bool
	}{
		{"server", "envoy-docker-server", true},
		{"envoy", "envoy-docker-shim-envoy", true},
		{"installer", "envoy-docker-shim-installer", false},
		{"resync", "envoy-docker-shim-resync", false},
	} {
		ref := "envoy-docker-shim/" + img.name + ":e2e"
		got := a.Daemon.MustDocker(t, "image", "inspect", "-f",
			`{{index .Config.Labels "org.opencontainers.image.title"}} {{index .Config.Labels "org.opencontainers.image.version"}} user={{.Config.User}} health={{if .Config.Healthcheck}}{{index .Config.Healthcheck.Test 0}}{{end}}`, ref)
		want := img.title + " e2e user=0:0 health="
		if img.health {
			want += "CMD"
		}
		if got != want {
			t.Errorf("image %s: %q, want %q", ref, got, want)
		}
	}
}

// requestThroughEnvoy gets url until the echo server named want answers, then checks that Envoy
// counted the request under the service's name.
func requestThroughEnvoy(t *testing.T, a *Appliance, url, want string) {
	t.Helper()
	stat := "http.web-e2e.downstream_rq_completed"
	before, _ := a.EnvoyStat(t, stat)
	testbed.WaitFor(t, 15*time.Second, "echo server through Envoy at "+url, func() error { return answeredBy(url, want) })
	testbed.WaitFor(t, 5*time.Second, stat, func() error {
		if v, ok := a.EnvoyStat(t, stat); !ok || v <= before {
			return fmt.Errorf("%s = %d (present %v), want more than %d", stat, v, ok, before)
		}
		return nil
	})
	for _, s := range []string{"cluster.web-e2e.upstream_rq_completed"} {
		if v, ok := a.EnvoyStat(t, s); !ok || v < 1 {
			t.Errorf("%s = %d (present %v)", s, v, ok)
		}
	}
}

// checkShimInstalled checks that the daemon's userland proxy is the installer's shim and returns
// what it prints for -version.
func checkShimInstalled(t *testing.T, a *Appliance) string {
	t.Helper()
	fi, err := os.Stat(a.ShimPath)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o755 {
		t.Errorf("shim mode %v, want 0755", fi.Mode())
	}
	if !bytes.HasPrefix(readFile(t, a.ShimPath), []byte("\x7fELF")) {
		t.Fatal("the installer did not replace the placeholder shim (a shell script) with the static binary")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := execOutput(ctx, a.ShimPath, "-version")
	if err != nil || out == "" {
		t.Fatalf("%s -version: %q, %v", a.ShimPath, out, err)
	}
	return out
}

func daemonJSONPath(a *Appliance) string { return filepath.Join(a.DockerConfigDir, "daemon.json") }

// checkDaemonJSON checks the merge: the shim's settings, and every key of the user's kept.
func checkDaemonJSON(t *testing.T, a *Appliance) {
	t.Helper()
	var got, want map[string]any
	if err := json.Unmarshal(readFile(t, daemonJSONPath(a)), &got); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal([]byte(userDaemonJSON), &want); err != nil {
		t.Fatal(err)
	}
	want["iptables"] = false
	want["ip6tables"] = false
	want["userland-proxy-path"] = a.ShimPath
	if !reflect.DeepEqual(got, want) {
		t.Errorf("daemon.json = %v, want %v", got, want)
	}
}

func backupsOf(t *testing.T, a *Appliance) []string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(a.DockerConfigDir, "daemon.json.envoy-docker-shim-backup-*"))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// checkNoLeftovers: no temporary files of the installer, nothing but the sockets in the run dir.
func checkNoLeftovers(t *testing.T, a *Appliance) {
	t.Helper()
	for dir, want := range map[string][]string{
		a.InstallDir: {"envoy-docker-shim"},
		a.RunDir:     {"server.sock", "shim.sock"},
	} {
		entries, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		if !reflect.DeepEqual(names, want) {
			t.Errorf("%s holds %q, want %q", dir, names, want)
		}
	}
}

// checkNetfilter checks the server's nftables table in the host: with rules for the daemon's
// bridge (the server in its container has CAP_NET_ADMIN in the host's network namespace) and IP
// forwarding on, or gone.
func checkNetfilter(t *testing.T, a *Appliance, present bool) {
	t.Helper()
	testbed.WaitFor(t, 10*time.Second, fmt.Sprintf("table %s present=%v", a.NetfilterTable, present), func() error {
		lines, exists, err := a.NetfilterTable.Current()
		text := strings.Join(lines, "\n")
		switch {
		case err != nil:
			return err
		case exists != present:
			return fmt.Errorf("table exists=%v:\n%s", exists, text)
		case present && !strings.Contains(text, a.Daemon.Bridge+" (bridge): masquerade "+a.Daemon.Subnet.String()):
			return fmt.Errorf("no masquerade of %s in:\n%s", a.Daemon.Subnet, text)
		}
		// The server turns IPv4 forwarding on, through its mount of the stand-in /proc/sys/net.
		if b := readFile(t, filepath.Join(a.SysctlDir, "ipv4", "ip_forward")); present && string(b) != "1\n" {
			return fmt.Errorf("ip_forward is %q", b)
		}
		return nil
	})
}

type fileIdentity struct {
	ino   uint64
	mtime time.Time
	size  int64
}

func identity(t *testing.T, path string) fileIdentity {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fileIdentity{fi.Sys().(*syscall.Stat_t).Ino, fi.ModTime(), fi.Size()}
}

func execOutput(ctx context.Context, name string, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
