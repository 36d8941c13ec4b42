package testbed

import (
	"slices"
	"strings"
	"testing"
)

func TestParseGenerations(t *testing.T) {
	tests := []struct {
		value   string
		want    []Generation
		wantErr string
	}{
		{"", []Generation{Docker20, Docker29}, ""},
		{"  ", []Generation{Docker20, Docker29}, ""},
		{"docker29", []Generation{Docker29}, ""},
		{"docker29, docker20", []Generation{Docker29, Docker20}, ""},
		{"docker20,docker20", []Generation{Docker20}, ""},
		{"docker28", nil, `unknown daemon generation "docker28"`},
		{"docker20,", nil, `unknown daemon generation ""`},
	}
	for _, tt := range tests {
		got, err := parseGenerations(tt.value)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("parseGenerations(%q) = %v, %v; want an error with %q", tt.value, got, err, tt.wantErr)
			}
			continue
		}
		if err != nil || !slices.Equal(got, tt.want) {
			t.Errorf("parseGenerations(%q) = %v, %v; want %v", tt.value, got, err, tt.want)
		}
	}
}

func TestPrependPath(t *testing.T) {
	tests := []struct {
		env  []string
		want []string
	}{
		{[]string{"A=1", "PATH=/usr/bin", "B=2"}, []string{"A=1", "PATH=/d:/usr/bin", "B=2"}},
		// exec uses the last PATH; that is the one to change.
		{[]string{"PATH=/old", "PATH=/usr/bin"}, []string{"PATH=/old", "PATH=/d:/usr/bin"}},
		{[]string{"A=1"}, []string{"A=1", "PATH=/d"}},
	}
	for _, tt := range tests {
		in := slices.Clone(tt.env)
		if got := prependPath(tt.env, "/d"); !slices.Equal(got, tt.want) {
			t.Errorf("prependPath(%q) = %q, want %q", tt.env, got, tt.want)
		}
		if !slices.Equal(tt.env, in) {
			t.Errorf("prependPath modified its argument: %q", tt.env)
		}
	}
}

// TestContainerdConfigIsPrivate: a private containerd keeps everything in its instance directory
// and loads nothing of the host's.
func TestContainerdConfigIsPrivate(t *testing.T) {
	cfg := containerdConfig("/tmp/eds-testbed/d1-0123abcd/containerd")
	for _, want := range []string{
		"version = 3",
		`root = "/tmp/eds-testbed/d1-0123abcd/containerd/root"`,
		`state = "/tmp/eds-testbed/d1-0123abcd/containerd/state"`,
		"imports = []",
		`"io.containerd.nri.v1.nri"`,
		`address = "/tmp/eds-testbed/d1-0123abcd/containerd/containerd.sock"`,
		`address = "/tmp/eds-testbed/d1-0123abcd/containerd/containerd.sock.ttrpc"`,
		`path = "/tmp/eds-testbed/d1-0123abcd/containerd/opt"`,
	} {
		if !strings.Contains(cfg, want) {
			t.Errorf("containerd config lacks %s:\n%s", want, cfg)
		}
	}
	for _, line := range strings.Split(cfg, "\n") {
		if strings.Contains(line, "/") && !strings.Contains(line, "/tmp/eds-testbed/d1-0123abcd/containerd/") {
			t.Errorf("containerd config names a path outside the instance: %s", line)
		}
	}
	// The cleaner finds this containerd's shim sockets through the same layout.
	layouts := containerdLayouts("/tmp/eds-testbed/d1-0123abcd")
	if !slices.ContainsFunc(layouts, func(l containerdLayout) bool {
		return l.address == "/tmp/eds-testbed/d1-0123abcd/containerd/containerd.sock" && l.state == "/tmp/eds-testbed/d1-0123abcd/containerd/state"
	}) {
		t.Errorf("containerdLayouts lacks the harness's own containerd: %+v", layouts)
	}
}
