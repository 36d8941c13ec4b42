package testbed

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
)

func TestChooseDaemonSlot(t *testing.T) {
	routes := func(s ...string) []netip.Prefix {
		var out []netip.Prefix
		for _, r := range s {
			out = append(out, netip.MustParsePrefix(r))
		}
		return out
	}
	noLinks := func(string) bool { return false }
	tests := []struct {
		name    string
		slot    int
		routes  []netip.Prefix
		links   func(string) bool
		wantErr string
	}{
		{"free", 7, routes("0.0.0.0/0", "192.0.2.0/24"), noLinks, ""},
		{"bridge subnet routed", 7, routes("172.29.7.0/24"), noLinks, "overlaps"},
		{"pool routed by a wider route", 7, routes("172.28.0.0/16"), noLinks, "overlaps"},
		{"host address inside", 7, routes("172.29.7.1/32"), noLinks, "overlaps"},
		{"neighbour slot routed", 7, routes("172.29.8.0/24"), noLinks, ""},
		{"bridge name taken", 7, nil, func(n string) bool { return n == "edsb7" }, "exists"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var st instanceState
			err := chooseDaemonSlot(tt.slot, &st, tt.routes, tt.links)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want one mentioning %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if st.Bridge != "edsb7" || st.Subnet != "172.29.7.0/24" || st.Pool != "172.28.7.0/24" {
				t.Errorf("state = %+v", st)
			}
		})
	}
}

func TestParseRoutes(t *testing.T) {
	out := `[{"dst":"default","gateway":"192.0.2.1","dev":"eth0"},{"dst":"192.0.2.0/24","dev":"eth0"},
	{"type":"local","dst":"192.0.2.2","dev":"eth0","table":"local"},{"dst":"172.29.3.9/24","dev":"edsb3"}]`
	got, err := parseRoutes([]byte(out))
	if err != nil {
		t.Fatal(err)
	}
	want := []netip.Prefix{
		netip.MustParsePrefix("192.0.2.0/24"),
		netip.MustParsePrefix("192.0.2.2/32"),
		netip.MustParsePrefix("172.29.3.0/24"),
	}
	if !slices.Equal(got, want) {
		t.Errorf("parseRoutes = %v, want %v", got, want)
	}
}

func TestRunArgs(t *testing.T) {
	got := runArgs(RunOptions{
		Name:    "web",
		Image:   "eds-echo:test",
		Publish: []string{"127.0.0.1:18080:80", "18081:7/udp"},
		Labels:  map[string]string{"ServiceName": "web", "EnvironmentName": "prod"},
		Env:     map[string]string{"ECHO_NAME": "web", "A": "1"},
		Flags:   []string{"--network", "web"},
		Args:    []string{"-x"},
	})
	want := []string{"run", "-d", "--name", "web",
		"-p", "127.0.0.1:18080:80", "-p", "18081:7/udp",
		"--label", "EnvironmentName=prod", "--label", "ServiceName=web",
		"-e", "A=1", "-e", "ECHO_NAME=web",
		"--network", "web",
		"eds-echo:test", "-x"}
	if !slices.Equal(got, want) {
		t.Errorf("runArgs =\n%q\nwant\n%q", got, want)
	}
}

func TestDockerCLIEnvDropsUserTargets(t *testing.T) {
	t.Setenv("DOCKER_HOST", "tcp://198.51.100.1:2375")
	t.Setenv("DOCKER_CONTEXT", "prod")
	t.Setenv("DOCKER_BUILDKIT", "1")
	env := dockerCLIEnv("/tmp/cli")
	for _, kv := range env {
		if strings.HasPrefix(kv, "DOCKER_HOST=") || strings.HasPrefix(kv, "DOCKER_CONTEXT=") || kv == "DOCKER_BUILDKIT=1" {
			t.Errorf("docker CLI environment keeps %s", kv)
		}
	}
	if !slices.Contains(env, "DOCKER_CONFIG=/tmp/cli") || !slices.Contains(env, "DOCKER_BUILDKIT=0") {
		t.Errorf("docker CLI environment lacks its own config dir or the classic builder: %v", env)
	}
}
