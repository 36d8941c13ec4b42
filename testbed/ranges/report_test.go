package ranges

import (
	"bytes"
	"image/png"
	"strings"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/testbed/bench"
)

func TestSummarize(t *testing.T) {
	s := Series{Generation: "docker20", Path: "ours", Ports: 100, Samples: []Sample{
		{Run: 3 * time.Second, Remove: time.Second, Procs: 100, Proxies: bench.Memory{RSS: 300, PSS: 30, USS: 20}, Envoy: bench.Memory{RSS: 1000, PSS: 900}, Left: Leftovers{0, 0, 0, 0, 0, 0}},
		{Run: time.Second, Remove: 3 * time.Second, Procs: 100, Proxies: bench.Memory{RSS: 100, PSS: 10, USS: 5}, Envoy: bench.Memory{RSS: 3000, PSS: 2000}, Left: Leftovers{2, 0, 0, 0, 1, 0}},
		{Run: 2 * time.Second, Remove: 2 * time.Second, Procs: 99, Proxies: bench.Memory{RSS: 200, PSS: 20, USS: 10}, Envoy: bench.Memory{RSS: 2000, PSS: 1000}, Later: Leftovers{0, 0, 3, 0, 0, 0}},
	}}
	got := Summarize(s)
	if got.Run != 2*time.Second || got.Remove != 2*time.Second || got.PerPort != 20*time.Millisecond || got.Procs != 100 {
		t.Errorf("times %v %v %v, procs %d", got.Run, got.Remove, got.PerPort, got.Procs)
	}
	if want := (bench.Memory{RSS: 200, PSS: 20, USS: 10}); got.Proxies != want {
		t.Errorf("proxies %+v, want %+v", got.Proxies, want)
	}
	if want := (bench.Memory{RSS: 20, PSS: 10}); got.EnvoyPerPort != want {
		t.Errorf("envoy per port %+v, want %+v", got.EnvoyPerPort, want)
	}
	if want := (Leftovers{2, 0, 0, 0, 1, 0}); got.Left != want {
		t.Errorf("left %+v, want the worst round's %+v", got.Left, want)
	}
	if want := (Leftovers{0, 0, 3, 0, 0, 0}); got.Later != want {
		t.Errorf("later %+v, want %+v", got.Later, want)
	}
}

func TestMarkdown(t *testing.T) {
	stock := Series{Generation: "docker20", Path: Reference, Ports: 1000, Samples: []Sample{
		{Run: 3 * time.Second, Remove: time.Second, Procs: 1000, Proxies: bench.Memory{RSS: 3000 << 20, PSS: 1000 << 20, USS: 900 << 20}, Left: Leftovers{0, 0, -1, -1, -1, -1}},
	}}
	ours := Series{Generation: "docker20", Path: "ours", Ports: 1000, Samples: []Sample{
		{Run: 4500 * time.Millisecond, AllIdle: 5200 * time.Millisecond, EnvoyAll: 6100 * time.Millisecond, Remove: time.Second, Procs: 1000, Proxies: bench.Memory{RSS: 1500 << 20, PSS: 400 << 20, USS: 300 << 20},
			Envoy: bench.Memory{RSS: 10000 << 10, PSS: 10000 << 10}, Server: bench.Memory{RSS: 5000 << 10, PSS: 5000 << 10}, HasStack: true, Left: Leftovers{0, 0, 2, 1000, 0, 0}},
	}}
	table := Markdown([]Summary{Summarize(stock), Summarize(ours)})
	for _, want := range []string{
		"### docker20",
		"| 1,000 | docker-proxy | 1 | 3.00 | – | – | 3.00 | 1000 | 3000.0 | 1000.0 | 900.0 | – | – | 1.00 | nothing | nothing | 0.00 |",
		"| 1,000 | ours | 1 | 4.50 (1.50x) | 6.10 | 5.20 | 4.50 | 1000 | 1500.0 (0.50x) | 400.0 (0.40x) | 300.0 (0.33x) | 10.0, 10.0 | 5.0, 5.0 | 1.00 (1.00x) | 0 procs, 0 sockets, 2 lis, 0 cl, 0 reg (1000 lis draining) | nothing | 0.00 |",
	} {
		if !strings.Contains(table, want) {
			t.Errorf("table lacks %q:\n%s", want, table)
		}
	}
	rounds := Rounds([]Series{stock, ours})
	if !strings.Contains(rounds, "| docker20 | 1000 | ours | 1 | 4.50 | 6.10 | 5.20 | 400.0 | 300.0 | 9.8 | 4.9 | 1.00 | 0.00, 0.00, 0.00, 0.00 |") {
		t.Errorf("rounds table:\n%s", rounds)
	}
	summaries, panels := Panels([]Summary{Summarize(stock), Summarize(ours)})
	chart, err := bench.Chart("port ranges", summaries, "", panels)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := png.Decode(bytes.NewReader(chart)); err != nil {
		t.Fatal(err)
	}
	if v := panels[1].Value(summaries[1]); v != 400.0*1024/1000 {
		t.Errorf("PSS per port %v KiB", v)
	}
}
