package proxyargs

import (
	"errors"
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"github.com/envoy-docker-shim/envoy-docker-shim/internal/mapping"
)

func TestParse(t *testing.T) {
	base := []string{"-proto", "tcp", "-host-ip", "0.0.0.0", "-host-port", "8080", "-container-ip", "172.17.0.2", "-container-port", "80"}
	want := meaning{Mapping: tcp("0.0.0.0", 8080, "172.17.0.2", 80)}
	with := func(f func(*meaning)) meaning { m := want; f(&m); return m }
	tests := []struct {
		name    string
		args    []string
		want    meaning
		ignored []string
		version bool
		help    bool
		errText string
	}{
		{name: "daemon 20.10 argv", args: base, want: want},
		{name: "daemon 28 argv with -use-listen-fd", args: append(base, "-use-listen-fd"),
			want: with(func(m *meaning) { m.UseListenFD = true })},
		{name: "double dashes and = values", args: []string{"--proto=udp", "--host-ip=::", "--host-port=53", "-container-ip=fd00::2", "-container-port=5353", "-use-listen-fd=false"},
			want: meaning{Mapping: mapping.Mapping{Key: mapping.Key{Proto: mapping.UDP, HostIP: netip.IPv6Unspecified(), HostPort: 53}, ContainerIP: netip.MustParseAddr("fd00::2"), ContainerPort: 5353}}},
		{name: "6-to-4: IPv6 host, IPv4 container", args: []string{"-proto", "tcp", "-host-ip", "::", "-host-port", "80", "-container-ip", "172.17.0.2", "-container-port", "80"},
			want: with(func(m *meaning) { m.HostIP, m.HostPort = netip.IPv6Unspecified(), 80 })},
		{name: "IPv4-mapped host IP is IPv4, as for docker-proxy", args: []string{"-host-ip", "::ffff:127.0.0.1", "-host-port", "8080", "-container-ip", "172.17.0.2", "-container-port", "80"},
			want: with(func(m *meaning) { m.HostIP = netip.MustParseAddr("127.0.0.1") })},
		{name: "defaults: tcp on 0.0.0.0", args: []string{"-host-port", "8080", "-container-ip", "172.17.0.2", "-container-port", "80"}, want: want},
		{name: "last value wins", args: append([]string{"-host-port", "1"}, base...), want: want},
		{name: "unknown bool flag from a future daemon is ignored", args: append(base, "-use-listen-fd", "-future-thing"),
			want: with(func(m *meaning) { m.UseListenFD = true }), ignored: []string{"-future-thing"}},
		{name: "unknown flag with a value is ignored", args: append(base, "-future-opt", "x", "--future-eq=1"),
			want: want, ignored: []string{"-future-opt x", "--future-eq=1"}},
		{name: "unknown flag before known ones", args: append([]string{"-future"}, base...), want: want, ignored: []string{"-future"}},
		{name: "stray argument is ignored", args: append(base, "stray"), want: want, ignored: []string{"stray"}},
		{name: "-version", args: []string{"-version"}, version: true},
		{name: "-v with junk", args: []string{"-v", "-host-port", "junk"}, version: true},
		{name: "-help", args: []string{"-h"}, help: true},

		{name: "port out of range", args: replace(base, "8080", "70000"), errText: `invalid -host-port "70000": port out of range (1-65535)`},
		{name: "port zero", args: replace(base, "80", "0"), errText: `invalid -container-port "0": port out of range (1-65535)`},
		{name: "huge port", args: replace(base, "8080", "99999999999999999999999"), errText: "port out of range"},
		{name: "negative port", args: replace(base, "8080", "-1"), errText: `invalid -host-port "-1": not a port number`},
		{name: "port not a number", args: replace(base, "8080", "http"), errText: `invalid -host-port "http": not a port number`},
		{name: "bad host IP", args: replace(base, "0.0.0.0", "300.1.2.3"), errText: `invalid -host-ip "300.1.2.3": not an IP address`},
		{name: "host IP with zone", args: replace(base, "0.0.0.0", "fe80::1%eth0"), errText: `invalid -host-ip "fe80::1%eth0": not an IP address`},
		{name: "bad container IP", args: replace(base, "172.17.0.2", "container"), errText: `invalid -container-ip "container": not an IP address`},
		{name: "unspecified container IP", args: replace(base, "172.17.0.2", "0.0.0.0"), errText: "cannot be unspecified"},
		{name: "unknown protocol", args: replace(base, "tcp", "icmp"), errText: `unsupported protocol "icmp" for -proto: want tcp, udp or sctp`},
		{name: "protocol is case-sensitive like docker-proxy", args: replace(base, "tcp", "TCP"), errText: `unsupported protocol "TCP"`},
		{name: "missing container IP", args: []string{"-host-port", "1", "-container-port", "2"}, errText: "missing -container-ip"},
		{name: "missing host port", args: []string{"-container-ip", "10.0.0.1", "-container-port", "2"}, errText: "missing -host-port"},
		{name: "flag without its value", args: append(base[:8:8], "-container-port"), errText: "flag needs an argument: -container-port"},
		{name: "bad bool", args: append(base, "-use-listen-fd=maybe"), errText: `invalid boolean value "maybe" for -use-listen-fd`},
		{name: "three dashes", args: append(base, "---x"), errText: "bad flag syntax: ---x"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := Parse(tt.args)
			if tt.errText != "" {
				if err == nil || !strings.Contains(err.Error(), tt.errText) {
					t.Fatalf("Parse error = %v, want one containing %q", err, tt.errText)
				}
				if !errors.Is(err, ErrUsage) {
					t.Errorf("error %v does not wrap ErrUsage", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if r.Version != tt.version || r.Help != tt.help {
				t.Fatalf("Version, Help = %v, %v; want %v, %v", r.Version, r.Help, tt.version, tt.help)
			}
			if tt.version || tt.help {
				return
			}
			if got := (meaning{r.Mapping, r.UseListenFD}); got != tt.want {
				t.Errorf("Parse = %+v, want %+v", got, tt.want)
			}
			if !reflect.DeepEqual(r.Ignored, tt.ignored) {
				t.Errorf("Ignored = %q, want %q", r.Ignored, tt.ignored)
			}
		})
	}
}

func replace(args []string, old, new string) []string {
	out := append([]string(nil), args...)
	for i, a := range out {
		if a == old {
			out[i] = new
			return out
		}
	}
	panic("no " + old)
}

// meaning is what a command line says: the mapping, and whether fd 4 is the host socket.
type meaning struct {
	mapping.Mapping
	UseListenFD bool
}

func tcp(hostIP string, hostPort uint16, containerIP string, containerPort uint16) mapping.Mapping {
	return mapping.Mapping{
		Key:         mapping.Key{Proto: mapping.TCP, HostIP: netip.MustParseAddr(hostIP), HostPort: hostPort},
		ContainerIP: netip.MustParseAddr(containerIP), ContainerPort: containerPort,
	}
}

func TestArgsRoundTrip(t *testing.T) {
	m := mapping.Mapping{Key: mapping.Key{Proto: mapping.UDP, HostIP: netip.MustParseAddr("::1"), HostPort: 1}, ContainerIP: netip.MustParseAddr("10.1.2.3"), ContainerPort: 65535}
	r, err := Parse(Args(m, true))
	if err != nil || r.Mapping != m || !r.UseListenFD || len(r.Ignored) != 0 {
		t.Fatalf("Parse(%q) = %+v, %v", Args(m, true), r, err)
	}
}

// FuzzParse checks that no command line panics, that whatever is accepted is a valid mapping,
// and that a valid mapping survives rendering and parsing again.
func FuzzParse(f *testing.F) {
	f.Add("-proto\x00tcp\x00-host-ip\x000.0.0.0\x00-host-port\x008080\x00-container-ip\x00172.17.0.2\x00-container-port\x0080")
	f.Add("-proto\x00udp\x00-host-ip\x00::\x00-host-port\x0053\x00-container-ip\x00fd00::1\x00-container-port\x0053\x00-use-listen-fd")
	f.Add("--host-port=1\x00-container-ip=1.2.3.4\x00-container-port=65535\x00-new\x00value\x00-x=")
	f.Add("-version")
	f.Add("--\x00-a")
	f.Fuzz(func(t *testing.T, joined string) {
		args := strings.Split(joined, "\x00")
		r, err := Parse(args)
		if err != nil {
			if !errors.Is(err, ErrUsage) || err.Error() == "" {
				t.Fatalf("error %q is not a usage error with a message", err)
			}
			return
		}
		if r.Version || r.Help {
			return
		}
		m := r.Mapping
		switch m.Proto {
		case mapping.TCP, mapping.UDP, mapping.SCTP:
		default:
			t.Fatalf("accepted protocol %q", m.Proto)
		}
		if m.HostPort == 0 || m.ContainerPort == 0 || !m.HostIP.IsValid() || !m.ContainerIP.IsValid() ||
			m.HostIP.Is4In6() || m.HostIP.Zone() != "" || m.ContainerIP.IsUnspecified() {
			t.Fatalf("accepted invalid mapping %+v from %q", m, args)
		}
		again, err := Parse(Args(m, r.UseListenFD))
		if err != nil || again.Mapping != m || again.UseListenFD != r.UseListenFD || len(again.Ignored) != 0 {
			t.Fatalf("round trip of %+v: %+v, %v", m, again, err)
		}
	})
}
