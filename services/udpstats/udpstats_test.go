package udpstats

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/envoy-docker-shim/envoy-docker-shim/internal/shimlink"
)

func TestStore(t *testing.T) {
	dns := Key{Service: "dns-prod", Address: netip.MustParseAddrPort("0.0.0.0:5353")}
	dns6 := Key{Service: "dns-prod", Address: netip.MustParseAddrPort("[::]:5353")}
	s := New()
	for _, step := range []struct {
		name string
		do   func()
		want map[Key]Counters
	}{
		{"nothing reported", func() {}, map[Key]Counters{}},
		{"a shim reports", func() {
			s.Report(1, dns, shimlink.Stats{InDatagrams: 10, InBytes: 100, OutDatagrams: 9, OutBytes: 90, Flows: 2, FlowsTotal: 3})
		}, map[Key]Counters{dns: {10, 100, 9, 90, 2, 3, 0}}},
		{"its reports are cumulative: the latest counts", func() {
			s.Report(1, dns, shimlink.Stats{InDatagrams: 20, InBytes: 200, OutDatagrams: 20, OutBytes: 200, Flows: 1, FlowsTotal: 3})
		}, map[Key]Counters{dns: {20, 200, 20, 200, 1, 3, 0}}},
		{"another address of the service is its own port", func() {
			s.Report(2, dns6, shimlink.Stats{InDatagrams: 1, InBytes: 1, FlowsTotal: 1, Flows: 1})
		}, map[Key]Counters{dns: {20, 200, 20, 200, 1, 3, 0}, dns6: {1, 1, 0, 0, 1, 1, 0}}},
		{"the shim ends: its traffic stays, its flows go", func() { s.End(1) },
			map[Key]Counters{dns: {20, 200, 20, 200, 0, 3, 0}, dns6: {1, 1, 0, 0, 1, 1, 0}}},
		{"the container's next shim adds to the port's totals", func() {
			s.Report(3, dns, shimlink.Stats{InDatagrams: 5, InBytes: 50, OutDatagrams: 5, OutBytes: 50, Flows: 1, FlowsTotal: 1})
		}, map[Key]Counters{dns: {25, 250, 25, 250, 1, 4, 0}, dns6: {1, 1, 0, 0, 1, 1, 0}}},
		{"ending twice, or a registration that never reported, changes nothing", func() { s.End(1); s.End(9) },
			map[Key]Counters{dns: {25, 250, 25, 250, 1, 4, 0}, dns6: {1, 1, 0, 0, 1, 1, 0}}},
	} {
		step.do()
		got := s.snapshot()
		if len(got) != len(step.want) {
			t.Fatalf("%s: %v, want %v", step.name, got, step.want)
		}
		for k, w := range step.want {
			c, ok := s.Port(k)
			if updated := time.UnixMilli(c.UpdatedUnixMs); time.Since(updated) > time.Minute || time.Since(updated) < 0 {
				t.Fatalf("%s: %v updated at %v", step.name, k, updated)
			}
			if c.UpdatedUnixMs = 0; !ok || c != w {
				t.Fatalf("%s: %v = %+v (%v), want %+v", step.name, k, c, ok, w)
			}
		}
	}
	want := `
# HELP eds_udp_datagrams_total UDP datagrams the shims carried, per service and published address; direction in: from clients, out: from the container back to clients.
# TYPE eds_udp_datagrams_total counter
eds_udp_datagrams_total{address="0.0.0.0:5353",direction="in",service="dns-prod"} 25
eds_udp_datagrams_total{address="0.0.0.0:5353",direction="out",service="dns-prod"} 25
eds_udp_datagrams_total{address="[::]:5353",direction="in",service="dns-prod"} 1
eds_udp_datagrams_total{address="[::]:5353",direction="out",service="dns-prod"} 0
# HELP eds_udp_flows Live UDP flows (one per client address and port), per service and published address.
# TYPE eds_udp_flows gauge
eds_udp_flows{address="0.0.0.0:5353",service="dns-prod"} 1
eds_udp_flows{address="[::]:5353",service="dns-prod"} 1
`
	if err := testutil.CollectAndCompare(s, strings.NewReader(want), "eds_udp_datagrams_total", "eds_udp_flows"); err != nil {
		t.Error(err)
	}
	if n := testutil.CollectAndCount(s); n != 12 {
		t.Errorf("%d series, want 6 per port", n)
	}
	if problems, err := testutil.CollectAndLint(s); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %v", problems, err)
	}
}
