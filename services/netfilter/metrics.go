package netfilter

import "github.com/prometheus/client_golang/prometheus"

// Metrics are the reconciler's Prometheus series; a nil *Metrics records nothing.
type Metrics struct {
	networks prometheus.Gauge
	errors   prometheus.Counter
}

// NewMetrics registers the series with reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		networks: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "eds_netfilter_networks",
			Help: "Docker bridge networks whose outbound NAT, forwarding and isolation rules are in place.",
		}),
		errors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "eds_netfilter_errors_total",
			Help: "Reconciles of the netfilter rules that failed (see the server's log for why).",
		}),
	}
	reg.MustRegister(m.networks, m.errors)
	return m
}

func (m *Metrics) setNetworks(n int) {
	if m != nil {
		m.networks.Set(float64(n))
	}
}

func (m *Metrics) countError() {
	if m != nil {
		m.errors.Inc()
	}
}
