// Package udpstats keeps the traffic of the ports that shims proxy themselves (UDP, which Envoy
// never sees), as the shims report it over the shim link, and exports it on the server's
// Prometheus endpoint under the services' names, the names Envoy's own stats use.
//
// A shim's reports are cumulative since the shim started, so a lost report loses nothing. The
// store adds the last report of every registration that ended to its port's totals, so a port's
// counters only grow while the server runs, across container restarts, as Envoy's do. It does no I/O.
package udpstats

import (
	"cmp"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/envoy-docker-shim/envoy-docker-shim/internal/shimlink"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/registry"
)

// Key is one port of one service: its stat name and its host address.
type Key struct {
	Service string
	Address netip.AddrPort
}

// Counters are a port's traffic. In: from clients; out: from the container back to clients.
type Counters struct {
	InDatagrams  uint64 `json:"in_datagrams"`
	InBytes      uint64 `json:"in_bytes"`
	OutDatagrams uint64 `json:"out_datagrams"`
	OutBytes     uint64 `json:"out_bytes"`
	// Flows are the live flows (client address and port) of the shims serving the port now.
	Flows      uint64 `json:"flows"`
	FlowsTotal uint64 `json:"flows_total"`
	// UpdatedUnixMs is when the latest of these counters arrived: a rate over two reports is
	// exact, where one over two reads of the store would see a 5-second step as a burst.
	UpdatedUnixMs int64 `json:"updated_unix_ms"`
}

func (c Counters) plus(s shimlink.Stats) Counters {
	return Counters{
		InDatagrams: c.InDatagrams + s.InDatagrams, InBytes: c.InBytes + s.InBytes,
		OutDatagrams: c.OutDatagrams + s.OutDatagrams, OutBytes: c.OutBytes + s.OutBytes,
		Flows: c.Flows + s.Flows, FlowsTotal: c.FlowsTotal + s.FlowsTotal, UpdatedUnixMs: c.UpdatedUnixMs,
	}
}

func (c Counters) updated(at time.Time) Counters {
	c.UpdatedUnixMs = max(c.UpdatedUnixMs, at.UnixMilli())
	return c
}

// Store is safe for concurrent use.
type Store struct {
	mu    sync.Mutex
	ended map[Key]Counters // the registrations that ended (live flows excluded: they ended too)
	live  map[registry.Owner]report
}

type report struct {
	key  Key
	last shimlink.Stats
	at   time.Time
}

// New returns an empty store.
func New() *Store {
	return &Store{ended: map[Key]Counters{}, live: map[registry.Owner]report{}}
}

// Report records the latest counters of the registration owner holds for key.
func (s *Store) Report(owner registry.Owner, key Key, stats shimlink.Stats) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.live[owner] = report{key: key, last: stats, at: time.Now()}
}

// End adds the registration's last report to its port's totals; its flows are gone.
func (s *Store) End(owner registry.Owner) {
	s.mu.Lock()
	defer s.mu.Unlock()
	r, ok := s.live[owner]
	if !ok {
		return
	}
	delete(s.live, owner)
	r.last.Flows = 0
	s.ended[r.key] = s.ended[r.key].plus(r.last).updated(time.Now())
}

// Port returns the counters of key, and whether any shim ever reported them.
func (s *Store) Port(key Key) (Counters, bool) {
	all := s.snapshot()
	c, ok := all[key]
	return c, ok
}

func (s *Store) snapshot() map[Key]Counters {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[Key]Counters, len(s.ended)+len(s.live))
	for k, c := range s.ended {
		out[k] = c
	}
	for _, r := range s.live {
		out[r.key] = out[r.key].plus(r.last).updated(r.at)
	}
	return out
}

var (
	portLabels     = []string{"service", "address"}
	datagramsDesc  = prometheus.NewDesc("eds_udp_datagrams_total", "UDP datagrams the shims carried, per service and published address; direction in: from clients, out: from the container back to clients.", []string{"service", "address", "direction"}, nil)
	bytesDesc      = prometheus.NewDesc("eds_udp_bytes_total", "UDP payload bytes the shims carried, per service and published address; direction as for eds_udp_datagrams_total.", []string{"service", "address", "direction"}, nil)
	flowsDesc      = prometheus.NewDesc("eds_udp_flows", "Live UDP flows (one per client address and port), per service and published address.", portLabels, nil)
	flowsTotalDesc = prometheus.NewDesc("eds_udp_flows_total", "UDP flows started, per service and published address.", portLabels, nil)
)

// Describe implements prometheus.Collector.
func (s *Store) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{datagramsDesc, bytesDesc, flowsDesc, flowsTotalDesc} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (s *Store) Collect(ch chan<- prometheus.Metric) {
	all := s.snapshot()
	keys := make([]Key, 0, len(all))
	for k := range all {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b Key) int {
		return cmp.Or(cmp.Compare(a.Service, b.Service), a.Address.Compare(b.Address))
	})
	for _, k := range keys {
		c, svc, addr := all[k], k.Service, k.Address.String()
		counter := func(d *prometheus.Desc, v uint64, extra ...string) {
			ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), append([]string{svc, addr}, extra...)...)
		}
		counter(datagramsDesc, c.InDatagrams, "in")
		counter(datagramsDesc, c.OutDatagrams, "out")
		counter(bytesDesc, c.InBytes, "in")
		counter(bytesDesc, c.OutBytes, "out")
		counter(flowsTotalDesc, c.FlowsTotal)
		ch <- prometheus.MustNewConstMetric(flowsDesc, prometheus.GaugeValue, float64(c.Flows), svc, addr)
	}
}
