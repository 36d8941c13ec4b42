package xds

import (
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// TestMetricsStartAtZero: the per-type series exist before anything happened, so that a
// dashboard shows 0 NACKs rather than no data, and the first NACK is a rate, not a new series.
func TestMetricsStartAtZero(t *testing.T) {
	reg := prometheus.NewRegistry()
	NewMetrics(reg)
	want := `# HELP eds_xds_nacks_total xDS responses Envoy rejected, by resource type.
# TYPE eds_xds_nacks_total counter
eds_xds_nacks_total{type="cluster"} 0
eds_xds_nacks_total{type="listener"} 0
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "eds_xds_nacks_total"); err != nil {
		t.Error(err)
	}
	for _, name := range []string{"eds_xds_pushes_total", "eds_xds_acks_total", "eds_xds_push_to_ack_seconds"} {
		if n, err := testutil.GatherAndCount(reg, name); err != nil || n != 2 {
			t.Errorf("%s: %d series, %v; want one per resource type", name, n, err)
		}
	}
}
