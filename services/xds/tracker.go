package xds

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"sync"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/v3"

	"github.com/envoy-docker-shim/envoy-docker-shim/services/registry"
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
	streams map[int64]*streamState
	// current is the cache's version of every resource it holds, as Invalidate reported it: what
	// go-control-plane will make every stream converge to.
	current map[string]map[string]string
	// changed is closed and replaced whenever an acknowledgement or a stream changes, waking waiters.
	changed chan struct{}
}

type streamState struct {
	node      string
	responses map[string]sentResponse // unanswered responses, by nonce
	resources map[string]map[string]*resourceState
	seq       uint64
	// answered is set once Envoy has answered any response: it is talking, not just connected.
	answered bool
}

// resourceState is what one stream knows of one resource.
type resourceState struct {
	// held is the version Envoy acknowledged holding ("" when it holds none).
	held string
	// rejected is set when Envoy refused the version last sent.
	rejected *rejection
	// sent is the version go-control-plane believes Envoy has, as of the last response that
	// carried the resource ("" after a removal); sentSeq numbers that response and inFlight says
	// it is not answered yet. An answer to an older response says nothing about the resource.
	sent     string
	sentSeq  uint64
	inFlight bool
	// changing is set when the cache changed the resource so that a response carrying it will
	// follow: until then, what Envoy said of it describes the past.
	changing bool
}

type sentResponse struct {
	typeURL   string
	resources map[string]string // name -> content version
	removed   []string
	at        time.Time
	seq       uint64
}

type rejection struct {
	version string
	reason  string
}

// NewTracker returns a tracker with no streams.
func NewTracker(metrics *Metrics) *Tracker {
	return &Tracker{metrics: metrics, now: time.Now, streams: make(map[int64]*streamState), current: make(map[string]map[string]string), changed: make(chan struct{})}
}

// ErrStateOfTheWorld refuses an Envoy that opens a state-of-the-world stream.
var ErrStateOfTheWorld = errors.New("envoy-docker-server speaks delta xDS only: set api_type DELTA_GRPC in Envoy's ads_config (the envoy image's bootstrap does)")

// Callbacks wires the tracker into go-control-plane's server.
func (t *Tracker) Callbacks() server.Callbacks {
	return server.CallbackFuncs{
		StreamOpenFunc: func(context.Context, int64, string) error { return ErrStateOfTheWorld },
		DeltaStreamOpenFunc: func(_ context.Context, id int64, _ string) error {
			t.open(id)
			return nil
		},
		DeltaStreamClosedFunc: func(id int64, _ *core.Node) { t.close(id) },
		StreamDeltaRequestFunc: func(id int64, req *discovery.DeltaDiscoveryRequest) error {
			if len(req.GetInitialResourceVersions()) > 0 {
				t.alreadyHas(id, req.GetTypeUrl(), req.GetInitialResourceVersions())
			}
			t.answered(id, req.GetNode(), req.GetResponseNonce(), req.GetErrorDetail().GetMessage(), req.GetErrorDetail() != nil)
			return nil
		},
		StreamDeltaResponseFunc: func(id int64, _ *discovery.DeltaDiscoveryRequest, resp *discovery.DeltaDiscoveryResponse) {
			sent := sentResponse{typeURL: resp.GetTypeUrl(), resources: make(map[string]string, len(resp.GetResources())), removed: resp.GetRemovedResources()}
			for _, r := range resp.GetResources() {
				sent.resources[r.GetName()] = r.GetVersion()
			}
			t.sent(id, resp.GetNonce(), sent)
		},
	}
}

func (t *Tracker) open(k int64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.streams[k] = &streamState{responses: make(map[string]sentResponse), resources: make(map[string]map[string]*resourceState)}
	t.metrics.streams.Set(float64(len(t.streams)))
	t.broadcast()
}

func (t *Tracker) close(k int64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.streams, k)
	t.metrics.streams.Set(float64(len(t.streams)))
	t.broadcast()
}

func (st *streamState) resource(typeURL, name string) *resourceState {
	byName, ok := st.resources[typeURL]
	if !ok {
		byName = make(map[string]*resourceState)
		st.resources[typeURL] = byName
	}
	r, ok := byName[name]
	if !ok {
		r = &resourceState{}
		byName[name] = r
	}
	return r
}

// alreadyHas records what a reconnecting Envoy says it holds (delta's initial_resource_versions):
// go-control-plane does not send those resources again when they are unchanged, so this is the
// only acknowledgement they get on the new stream. Until the stream's first response, what the
// cache changed meanwhile was measured against nothing; it is measured again here against what
// Envoy holds, since that is what go-control-plane compares the cache with.
func (t *Tracker) alreadyHas(k int64, typeURL string, versions map[string]string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	st, ok := t.streams[k]
	if !ok {
		return
	}
	for name, version := range versions {
		r := st.resource(typeURL, name)
		if r.sentSeq != 0 {
			continue // this stream already carried the resource: its own answers say more
		}
		r.held, r.sent = version, version
		r.changing = t.differs(typeURL, name, version)
	}
	t.broadcast()
}

// Invalidate is called by the cache, in the order of its changes and before they can reach any
// stream, with the resource's new version ("" for a deletion). Where go-control-plane will send
// the change (what Envoy was last sent differs), nothing Envoy said before counts until it
// answers that response; where it will not (the change cancelled out), the state stands.
func (t *Tracker) Invalidate(typeURL, name, version string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	byName, ok := t.current[typeURL]
	if !ok {
		byName = make(map[string]string)
		t.current[typeURL] = byName
	}
	if version == "" {
		delete(byName, name)
	} else {
		byName[name] = version
	}
	for _, st := range t.streams {
		r := st.resource(typeURL, name)
		r.changing = r.sent != version
		if !r.changing && !r.inFlight && r.sent == "" && r.held == "" {
			delete(st.resources[typeURL], name)
		}
	}
}

// differs reports whether the cache holds another version of the resource than version, so that
// go-control-plane will send it again; callers hold t.mu.
func (t *Tracker) differs(typeURL, name, version string) bool {
	current, known := t.current[typeURL][name]
	return known && current != version
}

func (t *Tracker) sent(k int64, nonce string, s sentResponse) {
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
	st.responses[nonce] = s
	carry := func(name, version string) {
		r := st.resource(s.typeURL, name)
		r.sent, r.sentSeq, r.inFlight, r.rejected = version, s.seq, true, nil
		r.changing = t.differs(s.typeURL, name, version)
	}
	for name, version := range s.resources {
		carry(name, version)
	}
	for _, name := range s.removed {
		carry(name, "")
	}
}

func (t *Tracker) answered(k int64, node *core.Node, nonce, detail string, nack bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	st, ok := t.streams[k]
	if !ok {
		return
	}
	if node.GetId() != "" {
		st.node = node.GetId()
	}
	s, ok := st.responses[nonce]
	if !ok || nonce == "" {
		return // the first request of a type, or a nonce already answered
	}
	delete(st.responses, nonce)
	st.answered = true
	typ := shortType(s.typeURL)
	t.metrics.pushToAck.WithLabelValues(typ).Observe(t.now().Sub(s.at).Seconds())
	if nack {
		t.metrics.nacks.WithLabelValues(typ).Inc()
	} else {
		t.metrics.acks.WithLabelValues(typ).Inc()
	}

	// Envoy applies the resources of a response it can and names the ones it could not
	// ("Error adding/updating listener(s) NAME: reason"). When no name can be picked out, the
	// whole response is taken as rejected: a false failure is retried, a false success is a dead port.
	blamed := make(map[string]string)
	if nack {
		for name := range s.resources {
			if reason, ok := reasonFor(detail, name); ok {
				blamed[name] = reason
			}
		}
	}
	byName := st.resources[s.typeURL]
	for name := range s.resources {
		t.settle(byName, name, byName[name], s, nack, blamed, detail)
	}
	for _, name := range s.removed {
		t.settle(byName, name, byName[name], s, nack, blamed, detail)
	}
	t.broadcast()
}

// settle applies Envoy's answer to response s to one resource, and forgets a resource that is
// gone and settled, so the state stays as large as the configuration.
func (t *Tracker) settle(byName map[string]*resourceState, name string, r *resourceState, s sentResponse, nack bool, blamed map[string]string, detail string) {
	if r == nil || r.sentSeq != s.seq {
		return // carried again since: this answer is about an older state
	}
	r.inFlight = false
	reason, isBlamed := blamed[name]
	switch {
	case r.sent != "" && nack && len(blamed) == 0:
		r.rejected = &rejection{version: r.sent, reason: cleanReason(detail)}
	case r.sent != "" && isBlamed:
		r.rejected = &rejection{version: r.sent, reason: reason}
	default:
		r.held = r.sent
	}
	if r.sent == "" && r.held == "" && !r.changing {
		delete(byName, name)
	}
}

// reasonFor picks the part of Envoy's error detail about the named resource: the rest of the line
// naming it, and the lines after it that name no other resource (a proto validation error spans
// several).
func reasonFor(detail, name string) (string, bool) {
	lines := strings.Split(detail, "\n")
	for i, line := range lines {
		j := strings.Index(line, name+": ")
		if j < 0 {
			continue
		}
		parts := []string{line[j+len(name)+2:]}
		for _, next := range lines[i+1:] {
			if resourceLine.MatchString(next) {
				break
			}
			parts = append(parts, next)
		}
		return cleanReason(strings.Join(parts, " ")), true
	}
	return "", false
}

// resourceLine matches a line of Envoy's error detail that starts with one of our resource names.
var resourceLine = regexp.MustCompile(`^(tcp|udp)_\S+: `)

// debugMarker is what protobuf's debug printing puts in messages (Envoy quotes them in NACKs)
// so that nobody parses them; it means nothing to a user of docker run.
var debugMarker = regexp.MustCompile(`goo\.gle/debug\w*`)

// cleanReason makes Envoy's error detail one readable line.
func cleanReason(s string) string {
	s = strings.Join(strings.Fields(debugMarker.ReplaceAllString(s, "")), " ")
	return strings.TrimSpace(strings.TrimLeft(s, ": "))
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
// version (Version "" waits until it holds none), a *RejectedError when Envoy refused one of them, and ErrEnvoyNotConnected or the
// context's error when ctx ends first.
func (t *Tracker) Wait(ctx context.Context, wants []registry.Expected) error {
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

func (t *Tracker) check(wants []registry.Expected) (bool, error) {
	settled := func(r *resourceState) bool { return r != nil && !r.changing && !r.inFlight }
	// A resource the stream forgot (removed and settled) is held by no one.
	held := func(r *resourceState) (string, bool) {
		if r == nil {
			return "", true
		}
		return r.held, settled(r)
	}
	for _, st := range t.streams {
		for _, w := range wants {
			if r := st.resources[w.TypeURL][w.Name]; settled(r) && r.rejected != nil && r.rejected.version == w.Version {
				return true, &RejectedError{Name: w.Name, Reason: r.rejected.reason}
			}
		}
	}
	for _, st := range t.streams {
		all := true
		for _, w := range wants {
			if v, ok := held(st.resources[w.TypeURL][w.Name]); !ok || v != w.Version {
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
