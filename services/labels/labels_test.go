package labels

import (
	"net/netip"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/envoy-docker-shim/envoy-docker-shim/services/registry"
)

func TestSanitize(t *testing.T) {
	tests := []struct{ in, want string }{
		{"web", "web"},
		{"web-test", "web-test"},
		{"my.service", "my_service"},
		{"a b:c/d", "a_b_c_d"},
		{"..dots..", "dots"},
		{"", "unnamed"},
		{"___", "unnamed"},
		{"ünïcødé", "n_c_d"},
		{"café-prod", "caf_-prod"},
		{"x\ny\tz", "x_y_z"},
		{strings.Repeat("a", 300), strings.Repeat("a", maxNameLen)},
		{"UPPER_lower-09", "UPPER_lower-09"},
	}
	for _, tt := range tests {
		if got := Sanitize(tt.in); got != tt.want {
			t.Errorf("Sanitize(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

// TestStatName: a name kept as written is used as it is; a changed one (characters replaced or
// dropped, or cut) carries a hash of what was written, so it stays distinct and readable.
func TestStatName(t *testing.T) {
	tests := []struct {
		name                  string
		service, env, standIn string
		want                  string
	}{
		{"kept as written", "web", "prod", "c1", "web-prod"},
		{"no environment", "web", "", "c1", "web"},
		{"dots replaced", "a.b", "", "c1", "a_b-2e7336dc"},
		{"already clean twin of the above", "a_b", "", "c1", "a_b"},
		{"odd characters in both", "my svc.v2", "eu:west", "c1", "my_svc_v2-eu_west-f1369587"},
		{"the README's example", "my.api", "eu west", "c1", "my_api-eu_west-36e85e73"},
		{"nothing readable: the container's name stands in", "服务", "prød", "web1", "web1-pr_d-06fcdea5"},
		{"nothing readable and no stand-in", "服务", "", "", "unnamed-ec309ab2"},
		{"accents", "café", "prod", "c1", "caf-prod-37874986"},
		{"3,000 characters cut", strings.Repeat("x", 3000), "", "c1", strings.Repeat("x", maxNameLen-1-hashLen) + "-e1630f84"},
		{"exactly the limit", strings.Repeat("y", maxNameLen), "", "c1", strings.Repeat("y", maxNameLen)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := StatName(tt.service, tt.env, tt.standIn); got != tt.want {
				t.Errorf("StatName(%q, %q, %q) = %q, want %q", tt.service, tt.env, tt.standIn, got, tt.want)
			}
		})
	}
}

// TestStatNamesDistinct: values that sanitise alike, or to nothing, still name distinct services.
func TestStatNamesDistinct(t *testing.T) {
	pairs := [][2]string{
		{"服务", "prød"}, {"服務", "prød"}, {"服务", "prod"}, {"-pr_d", ""}, {"", "-pr_d"},
		{"a.b", ""}, {"a_b", ""}, {"a b", ""}, {"a:b", ""}, {"a__b", ""},
		{strings.Repeat("x", 3000), ""}, {strings.Repeat("x", 2999) + "y", ""}, {strings.Repeat("x", 3000), "prod"},
		{"web", "prod"}, {"web", "prød"}, {"web-prod", ""},
	}
	seen := map[string][2]string{}
	for _, p := range pairs {
		name := StatName(p[0], p[1], "c1")
		if other, dup := seen[name]; dup && other != [2]string{"web", "prod"} && p != [2]string{"web-prod", ""} {
			t.Errorf("%q and %q both became %q", other, p, name)
		}
		seen[name] = p
	}
}

func TestDisplay(t *testing.T) {
	long := strings.Repeat("服", 1000) // 3,000 bytes
	tests := []struct{ in, want string }{
		{"服务", "服务"},
		{"prød", "prød"},
		{"bad\xffutf8", "bad\uFFFDutf8"},
		{long, strings.Repeat("服", (maxDisplayLen-len("…"))/3) + "…"},
	}
	for _, tt := range tests {
		if got := Display(tt.in); got != tt.want {
			t.Errorf("Display(%.20q) = %.40q, want %.40q", tt.in, got, tt.want)
		}
	}
}

func TestParseMode(t *testing.T) {
	tests := []struct {
		in      string
		want    registry.Mode
		wantErr bool
	}{
		{"", registry.ModeHTTP, false},
		{"http", registry.ModeHTTP, false},
		{"HTTP", registry.ModeHTTP, false},
		{" tcp ", registry.ModeTCP, false},
		{"udp", "", true},
		{"grpc", "", true},
	}
	for _, tt := range tests {
		got, err := ParseMode(tt.in)
		if (err != nil) != tt.wantErr || got != tt.want {
			t.Errorf("ParseMode(%q) = %q, %v; want %q, err=%v", tt.in, got, err, tt.want, tt.wantErr)
		}
		if err != nil && !strings.Contains(err.Error(), "ProxyMode=tcp") {
			t.Errorf("ParseMode(%q) error %q does not say what to do", tt.in, err)
		}
	}
}

func TestParseProxyProtocol(t *testing.T) {
	tests := []struct {
		in      string
		mode    registry.Mode
		want    registry.ProxyProtocol
		wantErr string
	}{
		{"", registry.ModeTCP, registry.ProxyProtocolNone, ""},
		{"", registry.ModeHTTP, registry.ProxyProtocolNone, ""},
		{"v1", registry.ModeTCP, registry.ProxyProtocolV1, ""},
		{" V2 ", registry.ModeTCP, registry.ProxyProtocolV2, ""},
		{"2", registry.ModeTCP, registry.ProxyProtocolV2, ""},
		{"v3", registry.ModeTCP, "", `ProxyProtocol="v3" is not supported: use ProxyProtocol=v1`},
		{"true", registry.ModeTCP, "", "use ProxyProtocol=v1 (text header) or ProxyProtocol=v2"},
		{"v1", registry.ModeHTTP, "", "ProxyProtocol=v1 needs ProxyMode=tcp: add the label ProxyMode=tcp"},
	}
	for _, tt := range tests {
		got, err := ParseProxyProtocol(tt.in, tt.mode)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("ParseProxyProtocol(%q, %s) error %v, want %q", tt.in, tt.mode, err, tt.wantErr)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("ParseProxyProtocol(%q, %s) = %q, %v; want %q", tt.in, tt.mode, got, err, tt.want)
		}
	}
}

// FuzzParseProxyProtocol: any label value is a known version or an error saying what to use.
func FuzzParseProxyProtocol(f *testing.F) {
	for _, seed := range []string{"", "v1", "v2", "V1 ", "2", "v3", "\x00", "true"} {
		f.Add(seed, true)
	}
	f.Fuzz(func(t *testing.T, value string, tcp bool) {
		mode := registry.ModeHTTP
		if tcp {
			mode = registry.ModeTCP
		}
		got, err := ParseProxyProtocol(value, mode)
		if err != nil {
			if !strings.Contains(err.Error(), "ProxyProtocol") || got != "" {
				t.Fatalf("ParseProxyProtocol(%q, %s) = %q, error %q does not name the label", value, mode, got, err)
			}
			return
		}
		if got != registry.ProxyProtocolNone && got != registry.ProxyProtocolV1 && got != registry.ProxyProtocolV2 {
			t.Fatalf("ParseProxyProtocol(%q, %s) = %q", value, mode, got)
		}
		if got != registry.ProxyProtocolNone && !tcp {
			t.Fatalf("ParseProxyProtocol(%q, http) = %q: only TCP mode can send PROXY headers", value, got)
		}
	})
}

func TestDescribe(t *testing.T) {
	ip := netip.MustParseAddr("172.29.0.2")
	tests := []struct {
		name      string
		container *Container
		want      registry.Service
		wantErr   string
	}{
		{
			name:      "service and environment labels",
			container: &Container{ID: "abc", Name: "/web1", Image: "nginx:1.27", Labels: map[string]string{"ServiceName": "web", "EnvironmentName": "test"}},
			want:      registry.Service{Name: "web-test", Operation: "web", ContainerID: "abc", ContainerName: "web1", Mode: registry.ModeHTTP, ServiceLabel: "web", EnvironmentLabel: "test", Image: "nginx:1.27"},
		},
		{
			name:      "tcp mode",
			container: &Container{ID: "abc", Name: "/db", Labels: map[string]string{"ServiceName": "pg", "EnvironmentName": "prod", "ProxyMode": "tcp"}},
			want:      registry.Service{Name: "pg-prod", Operation: "pg", ContainerID: "abc", ContainerName: "db", Mode: registry.ModeTCP, ServiceLabel: "pg", EnvironmentLabel: "prod"},
		},
		{
			name:      "no labels falls back to the container name",
			container: &Container{ID: "abc", Name: "/quirky_name"},
			want:      registry.Service{Name: "quirky_name", Operation: "quirky_name", ContainerID: "abc", ContainerName: "quirky_name", Mode: registry.ModeHTTP},
		},
		{
			name:      "spaces around values are not part of the name",
			container: &Container{ID: "abc", Name: "/web1", Labels: map[string]string{"ServiceName": " web", "EnvironmentName": "test\n"}},
			want:      registry.Service{Name: "web-test", Operation: "web", ContainerID: "abc", ContainerName: "web1", Mode: registry.ModeHTTP, ServiceLabel: " web", EnvironmentLabel: "test\n"},
		},
		{
			name:      "environment without service name",
			container: &Container{ID: "abc", Name: "/api", Labels: map[string]string{"EnvironmentName": "stage"}},
			want:      registry.Service{Name: "api-stage", Operation: "api", ContainerID: "abc", ContainerName: "api", Mode: registry.ModeHTTP, EnvironmentLabel: "stage"},
		},
		{
			name:      "odd characters are sanitised, with a hash of what was written",
			container: &Container{ID: "abc", Name: "/x", Labels: map[string]string{"ServiceName": "my svc.v2", "EnvironmentName": "eu:west"}},
			want: registry.Service{Name: "my_svc_v2-eu_west-f1369587", Operation: "my_svc_v2-326bdbb8", ContainerID: "abc", ContainerName: "x", Mode: registry.ModeHTTP,
				ServiceLabel: "my svc.v2", EnvironmentLabel: "eu:west"},
		},
		{
			name:      "a service name with nothing readable: the container's name stands in",
			container: &Container{ID: "abc", Name: "/web1", Image: "registry.example/svc@sha256:0123", Labels: map[string]string{"ServiceName": "服务", "EnvironmentName": "prød"}},
			want: registry.Service{Name: "web1-pr_d-06fcdea5", Operation: "web1-ec309ab2", ContainerID: "abc", ContainerName: "web1", Mode: registry.ModeHTTP,
				ServiceLabel: "服务", EnvironmentLabel: "prød", Image: "registry.example/svc@sha256:0123"},
		},
		{
			name:      "a 3,000-character service name is cut, and shown cut",
			container: &Container{ID: "abc", Name: "/x", Labels: map[string]string{"ServiceName": strings.Repeat("x", 3000)}},
			want: registry.Service{Name: strings.Repeat("x", 91) + "-e1630f84", Operation: strings.Repeat("x", 91) + "-e1630f84", ContainerID: "abc", ContainerName: "x", Mode: registry.ModeHTTP,
				ServiceLabel: strings.Repeat("x", maxDisplayLen-len("…")) + "…"},
		},
		{
			name:      "access log on",
			container: &Container{ID: "abc", Name: "/web1", Labels: map[string]string{"ServiceName": "web", "AccessLog": "true"}},
			want:      registry.Service{Name: "web", Operation: "web", ContainerID: "abc", ContainerName: "web1", Mode: registry.ModeHTTP, AccessLog: registry.ChoiceOn, ServiceLabel: "web"},
		},
		{
			name:      "access log off",
			container: &Container{ID: "abc", Name: "/db", Labels: map[string]string{"ProxyMode": "tcp", "AccessLog": " FALSE "}},
			want:      registry.Service{Name: "db", Operation: "db", ContainerID: "abc", ContainerName: "db", Mode: registry.ModeTCP, AccessLog: registry.ChoiceOff},
		},
		{
			name:      "access log neither true nor false is an error",
			container: &Container{ID: "abc", Name: "/x", Labels: map[string]string{"AccessLog": "yes"}},
			wantErr:   `AccessLog="yes" is not supported: use AccessLog=true`,
		},
		{
			name:      "PROXY protocol in tcp mode",
			container: &Container{ID: "abc", Name: "/db", Labels: map[string]string{"ServiceName": "pg", "ProxyMode": "tcp", "ProxyProtocol": "v2"}},
			want:      registry.Service{Name: "pg", Operation: "pg", ContainerID: "abc", ContainerName: "db", Mode: registry.ModeTCP, ProxyProtocol: registry.ProxyProtocolV2, ServiceLabel: "pg"},
		},
		{
			name:      "PROXY protocol in http mode is an error",
			container: &Container{ID: "abc", Name: "/web", Labels: map[string]string{"ProxyProtocol": "v1"}},
			wantErr:   "ProxyProtocol=v1 needs ProxyMode=tcp",
		},
		{
			name:      "unknown PROXY protocol version is an error",
			container: &Container{ID: "abc", Name: "/db", Labels: map[string]string{"ProxyMode": "tcp", "ProxyProtocol": "yes"}},
			wantErr:   `ProxyProtocol="yes" is not supported`,
		},
		{
			name:      "unknown proxy mode is an error",
			container: &Container{ID: "abc", Name: "/x", Labels: map[string]string{"ProxyMode": "udp"}},
			wantErr:   `ProxyMode="udp"`,
		},
		{
			name: "container unknown (Docker API down)",
			want: registry.Service{Name: "container-172_29_0_2", Operation: "container-172_29_0_2", Mode: registry.ModeHTTP},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Describe(tt.container, ip)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("Describe error = %v, want it to contain %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Errorf("Describe = %+v, want %+v", got, tt.want)
			}
		})
	}
}

// FuzzSanitize checks that any label value becomes a usable, bounded stat name.
func FuzzSanitize(f *testing.F) {
	for _, seed := range []string{"web", "a.b.c", "", "\x00\xff", "ü", strings.Repeat("x", 500), "a__b", "_-_"} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, s string) {
		out := Sanitize(s)
		if out == "" || len(out) > maxNameLen {
			t.Fatalf("Sanitize(%q) = %q: empty or longer than %d", s, out, maxNameLen)
		}
		for _, r := range out {
			if !(r == '-' || r == '_' || (r >= 'a' && r <= 'z') || (r >= 'A' && r <= 'Z') || (r >= '0' && r <= '9')) {
				t.Fatalf("Sanitize(%q) = %q contains %q", s, out, r)
			}
		}
		if Sanitize(out) != out {
			t.Fatalf("Sanitize is not idempotent on %q: %q", out, Sanitize(out))
		}
	})
}

// FuzzStatName: any label values give a bounded, valid stat name; values that differ give names
// that differ (unless the hash suffixes collide, which the fuzzer would need 2^32 tries to find).
func FuzzStatName(f *testing.F) {
	f.Add("服务", "prød", "a.b", "", "web1")
	f.Add("a_b", "", "a.b", "", "c")
	f.Add(strings.Repeat("x", 3000), "", strings.Repeat("x", 2999), "", "")
	f.Add("web", "prod", "web-prod", "", "c")
	f.Fuzz(func(t *testing.T, service1, env1, service2, env2, standIn string) {
		a, b := StatName(service1, env1, standIn), StatName(service2, env2, standIn)
		for _, n := range []string{a, b} {
			if n == "" || len(n) > maxNameLen || n != Sanitize(n) || !readable(n) {
				t.Fatalf("StatName gave %q: empty, longer than %d, unsanitised or unreadable", n, maxNameLen)
			}
		}
		joined := func(s, e string) string {
			if e == "" {
				return s
			}
			return s + "-" + e
		}
		if a == b && joined(service1, env1) != joined(service2, env2) {
			t.Fatalf("%q/%q and %q/%q share the name %q", service1, env1, service2, env2, a)
		}
	})
}

// FuzzDescribe feeds arbitrary label values: the result is an error or a valid service.
func FuzzDescribe(f *testing.F) {
	f.Add("web", "prod", "http", "/c", "", "")
	f.Add("", "", "tcp", "", "true", "v1")
	f.Add("a.b", "c d", "bogus", "/x", "0", "v9")
	f.Fuzz(func(t *testing.T, service, env, mode, name, accessLog, proxyProtocol string) {
		c := &Container{ID: "id", Name: name, Labels: map[string]string{"ServiceName": service, "EnvironmentName": env, "ProxyMode": mode, "AccessLog": accessLog, "ProxyProtocol": proxyProtocol}}
		got, err := Describe(c, netip.MustParseAddr("10.0.0.1"))
		if err != nil {
			return
		}
		if got.Name == "" || got.Name != Sanitize(got.Name) || got.Operation != Sanitize(got.Operation) {
			t.Fatalf("Describe gave unsanitised names %+v", got)
		}
		for _, v := range []string{got.ServiceLabel, got.EnvironmentLabel, got.ContainerName} {
			if !utf8.ValidString(v) || len(v) > maxDisplayLen {
				t.Fatalf("Describe kept %q for display: invalid UTF-8 or longer than %d", v, maxDisplayLen)
			}
		}
		if got.AccessLog != registry.ChoiceDefault && got.AccessLog != registry.ChoiceOn && got.AccessLog != registry.ChoiceOff {
			t.Fatalf("Describe gave access log choice %q", got.AccessLog)
		}
		if got.Mode != registry.ModeHTTP && got.Mode != registry.ModeTCP {
			t.Fatalf("Describe gave mode %q", got.Mode)
		}
		if got.ProxyProtocol != registry.ProxyProtocolNone && got.Mode != registry.ModeTCP {
			t.Fatalf("Describe gave PROXY protocol %q in mode %q", got.ProxyProtocol, got.Mode)
		}
	})
}
