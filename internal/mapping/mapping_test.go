package mapping

import (
	"net/netip"
	"strings"
	"testing"
)

func TestMappingValidate(t *testing.T) {
	good := Mapping{
		Key:           Key{Proto: TCP, HostIP: netip.MustParseAddr("127.0.0.1"), HostPort: 80},
		ContainerIP:   netip.MustParseAddr("10.0.0.2"),
		ContainerPort: 80,
	}
	tests := []struct {
		name   string
		mutate func(*Mapping)
		want   string
	}{
		{"valid", func(*Mapping) {}, ""},
		{"bad protocol", func(m *Mapping) { m.Proto = "icmp" }, "unknown protocol"},
		{"no host IP", func(m *Mapping) { m.HostIP = netip.Addr{} }, "host IP"},
		{"zero host port", func(m *Mapping) { m.HostPort = 0 }, "host port"},
		{"unspecified container IP", func(m *Mapping) { m.ContainerIP = netip.MustParseAddr("0.0.0.0") }, "unspecified"},
		{"zero container port", func(m *Mapping) { m.ContainerPort = 0 }, "container port"},
	}
	for _, tt := range tests {
		m := good
		tt.mutate(&m)
		err := m.Validate()
		if (tt.want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tt.want)) {
			t.Errorf("%s: Validate = %v, want %q", tt.name, err, tt.want)
		}
	}
}

func TestParseProtocol(t *testing.T) {
	for _, s := range []string{"tcp", "udp", "sctp"} {
		if p, err := ParseProtocol(s); err != nil || string(p) != s {
			t.Errorf("ParseProtocol(%q) = %q, %v", s, p, err)
		}
	}
	if _, err := ParseProtocol("TCP "); err == nil {
		t.Error("ParseProtocol accepted a name dockerd never sends")
	}
}
