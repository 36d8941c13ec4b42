package testbed

import "testing"

func TestStatValue(t *testing.T) {
	const stats = `{"stats":[{"name":"cluster.echo.upstream_cx_total","value":3},
	{"name":"server.live","value":1},{"name":"zero","value":0},
	{"histograms":{"supported_quantiles":[0,25,50],"computed_quantiles":[]}}]}`
	tests := []struct {
		name  string
		value int64
		found bool
	}{
		{"cluster.echo.upstream_cx_total", 3, true},
		{"server.live", 1, true},
		{"zero", 0, true},
		{"cluster.echo.upstream_cx", 0, false},
		{"histograms", 0, false},
	}
	for _, tt := range tests {
		v, ok, err := statValue([]byte(stats), tt.name)
		if err != nil {
			t.Fatal(err)
		}
		if v != tt.value || ok != tt.found {
			t.Errorf("statValue(%q) = %d, %v; want %d, %v", tt.name, v, ok, tt.value, tt.found)
		}
	}
	if _, _, err := statValue([]byte("not json"), "x"); err == nil {
		t.Error("statValue accepted malformed JSON")
	}
}
