// Package vagrant_test checks the Vagrant testbed (testbed/Vagrantfile and the scripts beside this
// file) without booting it: `vagrant validate` accepts the Vagrantfile for both providers and
// rejects bad settings, and the steps it provisions the VM with are the ones the README lists.
// Booting it is `make testbed-up` and `make testbed-smoke`, outside `make test`.
package vagrant_test

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
)

const (
	readme       = "../../README.md"
	makefile     = "../../Makefile"
	vagrantfile  = "../Vagrantfile"
	provisionVM  = "provision-vm.sh"
	stepsBegin   = "<!-- vagrant steps: what testbed/vagrant/provision-vm.sh runs; checked by testbed/vagrant -->"
	stepsEnd     = "<!-- end of vagrant steps -->"
	vagrantHint  = "run `make provision` (Debian packages vagrant and vagrant-libvirt)"
	validateTime = 2 * time.Minute
)

func read(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// scriptSteps returns the lines of provision-vm.sh's step list (its here-document STEPS).
func scriptSteps(t *testing.T) []string {
	t.Helper()
	script := read(t, provisionVM)
	_, rest, ok := strings.Cut(script, "<<'STEPS'\n")
	if !ok {
		t.Fatalf("%s has no step list (here-document <<'STEPS')", provisionVM)
	}
	body, _, ok := strings.Cut(rest, "\nSTEPS\n")
	if !ok {
		t.Fatalf("%s: the step list does not end with a line STEPS", provisionVM)
	}
	return strings.Split(body, "\n")
}

// readmeSteps returns the lines of the fenced block between the README's step markers.
func readmeSteps(t *testing.T) []string {
	t.Helper()
	doc := read(t, readme)
	_, rest, ok := strings.Cut(doc, stepsBegin+"\n")
	if !ok {
		t.Fatalf("README.md lacks the marker %q before the VM's steps", stepsBegin)
	}
	block, _, ok := strings.Cut(rest, stepsEnd)
	if !ok {
		t.Fatalf("README.md lacks the marker %q after the VM's steps", stepsEnd)
	}
	block = strings.TrimSpace(block)
	if !strings.HasPrefix(block, "```sh\n") || !strings.HasSuffix(block, "\n```") {
		t.Fatalf("README.md: the VM's steps are not one ```sh block:\n%s", block)
	}
	return strings.Split(strings.TrimSuffix(strings.TrimPrefix(block, "```sh\n"), "\n```"), "\n")
}

// TestReadmeListsTheVMSteps: what `vagrant up` provisions the VM with is what the README says,
// line for line, and it starts from CI's own provisioning.
func TestReadmeListsTheVMSteps(t *testing.T) {
	vf := read(t, vagrantfile)
	if !regexp.MustCompile(`(?m)^\s*config\.vm\.provision "appliance", type: "shell",\s*\n\s*inline: "/vagrant/testbed/vagrant/` + regexp.QuoteMeta(provisionVM) + `"`).MatchString(vf) {
		t.Fatalf("the Vagrantfile does not provision the VM with /vagrant/testbed/vagrant/%s", provisionVM)
	}
	steps, doc := scriptSteps(t), readmeSteps(t)
	if strings.Join(steps, "\n") != strings.Join(doc, "\n") {
		t.Fatalf("the README's VM steps differ from %s's; make them the same.\n%s:\n%s\nREADME.md:\n%s",
			provisionVM, provisionVM, strings.Join(steps, "\n"), strings.Join(doc, "\n"))
	}
	want := []string{
		"testbed/provision.sh",
		"EDS_CONFIGURE_DOCKERD=true $COMPOSE run --rm installer",
		"systemctl restart docker",
	}
	for _, w := range want {
		found := false
		for _, s := range steps {
			found = found || s == w
		}
		if !found {
			t.Errorf("the VM's steps lack %q", w)
		}
	}
	// Every script a step runs is in the repository; the ones run directly are executable.
	for _, s := range steps {
		f := strings.Fields(s)
		sourced := f[0] == "."
		if sourced {
			f = f[1:]
		}
		if !strings.HasPrefix(f[0], "testbed/") {
			continue
		}
		fi, err := os.Stat(filepath.Join("../..", f[0]))
		if err != nil {
			t.Errorf("step %q: %v", s, err)
		} else if !sourced && fi.Mode().Perm()&0o111 == 0 {
			t.Errorf("step %q: %s is not executable", s, f[0])
		}
	}
}

// TestReadmeVMCommandsAreMakeTargets: the README's "Try it in a VM" commands exist.
func TestReadmeVMCommandsAreMakeTargets(t *testing.T) {
	doc, mk := read(t, readme), read(t, makefile)
	_, section, ok := strings.Cut(doc, "## Try it in a VM\n")
	if !ok {
		t.Fatal(`README.md lacks the section "## Try it in a VM"`)
	}
	section, _, _ = strings.Cut(section, "\n## ")
	targets := regexp.MustCompile("(?m)^sudo make (testbed-[a-z]+)").FindAllStringSubmatch(section, -1)
	if len(targets) != 3 {
		t.Fatalf("the section lists %d `sudo make testbed-...` commands, want three: %q", len(targets), targets)
	}
	for _, m := range targets {
		if !regexp.MustCompile(`(?m)^` + m[1] + `:`).MatchString(mk) {
			t.Errorf("the README runs `make %s`, which the Makefile lacks", m[1])
		}
	}
}

// TestVagrantValidate runs `vagrant validate` on the Vagrantfile with each provider and the
// settings that change what it configures, and with bad settings, which it must reject with a
// message naming the setting. The libvirt provider's options are checked by vagrant-libvirt;
// VirtualBox is not in Debian 12, so for it Vagrant checks everything but the provider block
// (--ignore-provider), including the forwarded ports of its override.
func TestVagrantValidate(t *testing.T) {
	vagrant := testbed.RequireTool(t, "vagrant", vagrantHint)
	for _, tc := range []struct {
		name     string
		provider string
		env      []string
		args     []string
		wantErr  string // empty: validation must pass
	}{
		{name: "libvirt, debian/bookworm64", provider: "libvirt", env: []string{"EDS_VAGRANT_BOX=debian/bookworm64"}},
		{name: "libvirt, local box, emulated", provider: "libvirt", env: []string{"EDS_VAGRANT_BOX=envoy-docker-shim/debian12", "EDS_VAGRANT_ACCEL=qemu", "EDS_VAGRANT_CONSOLE_LOG=/tmp/eds-console.log"}},
		{name: "libvirt, kvm, other ports", provider: "libvirt", env: []string{"EDS_VAGRANT_ACCEL=kvm", "EDS_VAGRANT_SSH_PORT=2200", "EDS_VAGRANT_DEMO_PORT=18080", "EDS_VAGRANT_UI_PORT=18081"}},
		{name: "virtualbox", provider: "virtualbox", args: []string{"--ignore-provider"}},
		{name: "bad port", provider: "libvirt", env: []string{"EDS_VAGRANT_UI_PORT=80801"}, wantErr: "EDS_VAGRANT_UI_PORT=80801: want a port number"},
		{name: "bad offline", provider: "libvirt", env: []string{"EDS_VAGRANT_OFFLINE=maybe"}, wantErr: "EDS_VAGRANT_OFFLINE=maybe: want true or false"},
		{name: "bad accel", provider: "libvirt", env: []string{"EDS_VAGRANT_ACCEL=xen"}, wantErr: "EDS_VAGRANT_ACCEL=xen: want kvm or qemu"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			out, err := validate(t, vagrant, tc.provider, tc.env, tc.args...)
			if strings.Contains(out, "The provider '"+tc.provider+"' could not be found") {
				testbed.Missing(t, "Vagrant's "+tc.provider+" provider", vagrantHint)
			}
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("vagrant validate: %v\n%s", err, out)
			case tc.wantErr == "" && !strings.Contains(out, "Vagrantfile validated successfully"):
				t.Fatalf("vagrant validate did not say it validated the Vagrantfile:\n%s", out)
			case tc.wantErr != "" && err == nil:
				t.Fatalf("vagrant validate accepted %q:\n%s", tc.env, out)
			case tc.wantErr != "" && !strings.Contains(out, tc.wantErr):
				t.Fatalf("vagrant validate's error lacks %q:\n%s", tc.wantErr, out)
			}
		})
	}
}

// validate runs `vagrant validate` in the Vagrantfile's directory, with Vagrant's state in the
// test's own directories (not the user's ~/.vagrant.d, not testbed/.vagrant) and its version check
// off: nothing goes to the network.
func validate(t *testing.T, vagrant, provider string, env []string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), validateTime)
	defer cancel()
	cmd := exec.CommandContext(ctx, vagrant, append([]string{"validate"}, args...)...)
	cmd.Dir = filepath.Dir(vagrantfile)
	// The test's settings only: none of the caller's Vagrant or testbed variables.
	cmd.Env = slices.DeleteFunc(os.Environ(), func(kv string) bool {
		return strings.HasPrefix(kv, "VAGRANT_") || strings.HasPrefix(kv, "EDS_VAGRANT_")
	})
	cmd.Env = append(cmd.Env,
		"VAGRANT_HOME="+t.TempDir(),
		"VAGRANT_DOTFILE_PATH="+t.TempDir(),
		"VAGRANT_CHECKPOINT_DISABLE=1",
		"VAGRANT_DEFAULT_PROVIDER="+provider,
	)
	cmd.Env = append(cmd.Env, env...)
	cmd.WaitDelay = 5 * time.Second
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}
