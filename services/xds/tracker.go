package xds

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math"
	"slices"
	"strings"
	"sync"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/protobuf/encoding/protowire"
)

// ErrEnvoyNotConnected says no Envoy holds an ADS stream to this server.
var ErrEnvoyNotConnected = errors.New("envoy is not connected to envoy-docker-server: check that the envoy container is running and that its bootstrap points at the server's xDS address")

// RejectedError carries Envoy's reason for refusing a resource (a NACK).
type RejectedError struct {
	Name   string
	Reason string
}

func (e *RejectedError) Error() string {
	return fmt.Sprintf("envoy rejected %s: %s", e.Name, e.Reason)
}

// Tracker follows every ADS stream's responses and the ACKs or NACKs that answer them, per
// resource and content version. It implements go-control-plane's server callbacks.
type Tracker struct {
	metrics *Metrics
	now     func() time.Time

	mu      sync.Mutex
	streams map[streamKey]*streamState
	// changed is closed and replaced whenever an acknowledgement or a stream changes, waking waiters.
	changed chan struct{}
}

type streamKey struct {
	delta bool
	id    int64
}

type streamState struct {
	node     string
	pending  map[string]sentResponse // by nonce
	acked    map[string]map[string]string
	rejected map[string]map[string]rejection
	// latest is the sequence number of the last response that carried or removed each resource.
	// An answer to an older response says nothing about a resource sent again since: without
	// this, a port closed and re-opened with the same content would look served before it is.
	latest map[string]map[string]uint64
	seq    uint64
	// answered is set once Envoy has answered any response: it is talking, not just connected.
	answered bool
}

type sentResponse struct {
	typeURL   string
	resources map[string]string // name -> content version
	removed   []string
	fullState bool
	at        time.Time
	seq       uint64
}

type rejection struct {
	version string
	reason  string
}

// NewTracker returns a tracker with no streams.
func NewTracker(metrics *Metrics) *Tracker {
	return &Tracker{metrics: metrics, now: time.Now, streams: make(map[streamKey]*streamState), changed: make(chan struct{})}
}

// Callbacks wires the tracker into go-control-plane's server.
func (t *Tracker) Callbacks() server.Callbacks {
	return server.CallbackFuncs{
		StreamOpenFunc: func(_ context.Context, id int64, _ string) error {
			t.open(streamKey{false, id})
			return nil
		},
		StreamClosedFunc: func(id int64, _ *core.Node) { t.close(streamKey{false, id}) },
		DeltaStreamOpenFunc: func(_ context.Context, id int64, _ string) error {
			t.open(streamKey{true, id})
			return nil
		},
		DeltaStreamClosedFunc: func(id int64, _ *core.Node) { t.close(streamKey{true, id}) },
		StreamRequestFunc: func(id int64, req *discovery.DiscoveryRequest) error {
			t.answered(streamKey{false, id}, req.GetNode(), req.GetResponseNonce(), req.GetErrorDetail().GetMessage(), req.GetErrorDetail() != nil)
			return nil
		},
		StreamResponseFunc: func(_ context.Context, id int64, _ *discovery.DiscoveryRequest, resp *discovery.DiscoveryResponse) {
			sent := sentResponse{typeURL: resp.GetTypeUrl(), resources: make(map[string]string, len(resp.GetResources())), fullState: true}
			for _, r := range resp.GetResources() {
				sent.resources[resourceName(r.GetValue())] = cache.HashResource(r.GetValue())
			}
			t.sent(streamKey{false, id}, resp.GetNonce(), sent)
		},
		StreamDeltaRequestFunc: func(id int64, req *discovery.DeltaDiscoveryRequest) error {
			t.answered(streamKey{true, id}, req.GetNode(), req.GetResponseNonce(), req.GetErrorDetail().GetMessage(), req.GetErrorDetail() != nil)
			return nil
		},
		StreamDeltaResponseFunc: func(id int64, _ *discovery.DeltaDiscoveryRequest, resp *discovery.DeltaDiscoveryResponse) {
			sent := sentResponse{typeURL: resp.GetTypeUrl(), resources: make(map[string]string, len(resp.GetResources())), removed: resp.GetRemovedResources()}
			for _, r := range resp.GetResources() {
				sent.resources[r.GetName()] = r.GetVersion()
			}
			t.sent(streamKey{true, id}, resp.GetNonce(), sent)
		},
	}
}

// resourceName reads field 1 (name) of an encoded Listener or Cluster without decoding the rest:
// a state-of-the-world push carries every resource, and decoding them all would cost per port.
func resourceName(b []byte) string {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return ""
		}
		b = b[n:]
		if num == 1 && typ == protowire.BytesType {
			v, m := protowire.ConsumeBytes(b)
			if m < 0 {
				return ""
			}
			return string(v)
		}
		m := protowire.ConsumeFieldValue(num, typ, b)
		if m < 0 {
			return ""
		}
		b = b[m:]
	}
	return ""
}

func (t *Tracker) open(k streamKey) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.streams[k] = &streamState{
		pending:  make(map[string]sentResponse),
		acked:    make(map[string]map[string]string),
		rejected: make(map[string]map[string]rejection),
		latest:   make(map[string]map[string]uint64),
	}
	t.metrics.streams.Set(float64(len(t.streams)))
	t.broadcast()
}

func (t *Tracker) close(k streamKey) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.streams, k)
	t.metrics.streams.Set(float64(len(t.streams)))
	t.broadcast()
}

func (t *Tracker) sent(k streamKey, nonce string, s sentResponse) {
	s.at = t.now()
	t.metrics.pushes.WithLabelValues(shortType(s.typeURL)).Inc()
	t.mu.Lock()
	defer t.mu.Unlock()
	st, ok := t.streams[k]
	if !ok {
		return
	}
	st.seq++
	s.seq = st.seq
	st.pending[nonce] = s
	latest := inner(st.latest, s.typeURL)
	for _, name := range append(slices.Collect(maps.Keys(s.resources)), s.removed...) {
		latest[name] = s.seq
		// Until Envoy answers this response, what it said of the resource before no longer holds.
		delete(st.acked[s.typeURL], name)
		delete(st.rejected[s.typeURL], name)
	}
}

func inner[V any](m map[string]map[string]V, key string) map[string]V {
	v, ok := m[key]
	if !ok {
		v = make(map[string]V)
		m[key] = v
	}
	return v
}

func (t *Tracker) answered(k streamKey, node *core.Node, nonce, detail string, nack bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	st, ok := t.streams[k]
	if !ok {
		return
	}
	if node.GetId() != "" {
		st.node = node.GetId()
	}
	s, ok := st.pending[nonce]
	if !ok || nonce == "" {
		return // the first request of a type, or a nonce already answered
	}
	delete(st.pending, nonce)
	typ := shortType(s.typeURL)
	t.metrics.pushToAck.WithLabelValues(typ).Observe(t.now().Sub(s.at).Seconds())

	acked := inner(st.acked, s.typeURL)
	rejected := inner(st.rejected, s.typeURL)
	latest := inner(st.latest, s.typeURL)
	current := func(name string) bool { return latest[name] == s.seq }
	if s.fullState {
		// A state-of-the-world response replaces everything Envoy had of its type.
		for name := range acked {
			if _, ok := s.resources[name]; !ok && latest[name] <= s.seq {
				delete(acked, name)
			}
		}
	}
	for _, name := range s.removed {
		if current(name) {
			delete(acked, name)
		}
	}
	st.answered = true
	if !nack {
		t.metrics.acks.WithLabelValues(typ).Inc()
		for name, version := range s.resources {
			if current(name) {
				acked[name] = version
			}
		}
		t.broadcast()
		return
	}
	t.metrics.nacks.WithLabelValues(typ).Inc()
	// Envoy applies the resources of a response it can and names the ones it could not
	// ("Error adding/updating listener(s) NAME: reason"). When no name can be picked out, the
	// whole response is taken as rejected: a false failure is retried, a false success is a dead port.
	blamed := make(map[string]string)
	for name := range s.resources {
		if reason, ok := reasonFor(detail, name); ok {
			blamed[name] = reason
		}
	}
	for name, version := range s.resources {
		if !current(name) {
			continue
		}
		reason, isBlamed := blamed[name]
		switch {
		case len(blamed) == 0:
			rejected[name] = rejection{version: version, reason: strings.TrimSpace(detail)}
		case isBlamed:
			rejected[name] = rejection{version: version, reason: reason}
		default:
			acked[name] = version
		}
	}
	t.broadcast()
}

// reasonFor picks the part of Envoy's error detail about the named resource.
func reasonFor(detail, name string) (string, bool) {
	for _, line := range strings.Split(detail, "\n") {
		if i := strings.Index(line, name+": "); i >= 0 {
			return strings.TrimSpace(line[i+len(name)+2:]), true
		}
	}
	return "", false
}

func shortType(typeURL string) string {
	switch typeURL {
	case resource.ListenerType:
		return "listener"
	case resource.ClusterType:
		return "cluster"
	}
	return typeURL[strings.LastIndex(typeURL, ".")+1:]
}

// dirty marks a resource the cache changed but no response has carried yet.
const dirty = math.MaxUint64

// Invalidate is called by the cache, in the same order as its changes, before the change can
// reach any stream: until a response carries the new state, nothing Envoy said of the resource
// counts. Without it, a wait that starts before the response goes out would read the answer to
// the previous state (a port closed and re-opened with the same content, or a stale rejection).
func (t *Tracker) Invalidate(typeURL, name string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, st := range t.streams {
		inner(st.latest, typeURL)[name] = dirty
		delete(st.acked[typeURL], name)
		delete(st.rejected[typeURL], name)
	}
}

// broadcast wakes every waiter; callers hold t.mu.
func (t *Tracker) broadcast() {
	close(t.changed)
	t.changed = make(chan struct{})
}

// Connected reports whether an Envoy holds a stream and has answered at least one response.
func (t *Tracker) Connected() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, st := range t.streams {
		if st.answered {
			return true
		}
	}
	return false
}

// Wait returns nil once one connected Envoy has acknowledged every wanted resource at its exact
// version, a *RejectedError when Envoy refused one of them, and ErrEnvoyNotConnected or the
// context's error when ctx ends first.
func (t *Tracker) Wait(ctx context.Context, wants []Want) error {
	for {
		t.mu.Lock()
		done, err := t.check(wants)
		changed := t.changed
		connected := len(t.streams) > 0
		t.mu.Unlock()
		if done {
			return err
		}
		select {
		case <-changed:
		case <-ctx.Done():
			if !connected {
				return ErrEnvoyNotConnected
			}
			return fmt.Errorf("envoy did not confirm the configuration in time: %w", ctx.Err())
		}
	}
}

func (t *Tracker) check(wants []Want) (bool, error) {
	for _, st := range t.streams {
		for _, w := range wants {
			if r, ok := st.rejected[w.TypeURL][w.Name]; ok && r.version == w.Version {
				return true, &RejectedError{Name: w.Name, Reason: r.reason}
			}
		}
	}
	for _, st := range t.streams {
		all := true
		for _, w := range wants {
			if st.acked[w.TypeURL][w.Name] != w.Version {
				all = false
				break
			}
		}
		if all {
			return true, nil
		}
	}
	return false, nil
}
