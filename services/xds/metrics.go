package xds

import "github.com/prometheus/client_golang/prometheus"

// Metrics are the control plane's own Prometheus series.
type Metrics struct {
	pushes       *prometheus.CounterVec
	acks         *prometheus.CounterVec
	nacks        *prometheus.CounterVec
	pushToAck    *prometheus.HistogramVec
	streams      prometheus.Gauge
	resources    *prometheus.GaugeVec
	translations prometheus.Counter
}

// NewMetrics registers the series with reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		pushes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "eds_xds_pushes_total", Help: "xDS responses sent to Envoy, by resource type.",
		}, []string{"type"}),
		acks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "eds_xds_acks_total", Help: "xDS responses Envoy accepted, by resource type.",
		}, []string{"type"}),
		nacks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "eds_xds_nacks_total", Help: "xDS responses Envoy rejected, by resource type.",
		}, []string{"type"}),
		pushToAck: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "eds_xds_push_to_ack_seconds",
			Help:    "Time from sending an xDS response to Envoy's ACK or NACK of it.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5},
		}, []string{"type"}),
		streams: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "eds_xds_streams", Help: "Open ADS streams (connected Envoys).",
		}),
		translations: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "eds_xds_translations_total", Help: "Registrations translated into Envoy resources (once per published mapping).",
		}),
		resources: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "eds_xds_resources", Help: "Resources in the xDS cache, by kind.",
		}, []string{"kind"}),
	}
	// Every series exists from the start, at zero: a rate over a counter that only appears at its
	// first increment misses that increment, and dashboards would show "no data" for no NACKs.
	for _, typ := range []string{"listener", "cluster"} {
		m.pushes.WithLabelValues(typ)
		m.acks.WithLabelValues(typ)
		m.nacks.WithLabelValues(typ)
		m.pushToAck.WithLabelValues(typ)
	}
	if reg != nil {
		reg.MustRegister(m.pushes, m.acks, m.nacks, m.pushToAck, m.streams, m.resources, m.translations)
	}
	return m
}
