// Package xds is envoy-docker-server's xDS control plane: per-resource caches that the registry
// feeds (one LinearCache per resource type, and delta xDS sends only what changed),
// go-control-plane's ADS server over them, and a tracker of what Envoy acknowledged.
//
// New resources reach the caches in batches: a change waits until none has come for a moment
// (coalesceQuiet), or at most coalesceMax after the first one waiting; only one that comes after
// such a pause goes at once, since it may be a lone docker run's. A port range publishes a
// port every few milliseconds; one push per port made Envoy and the server rebuild and compare
// their state a thousand times, on the same CPUs dockerd needed to start the range, while the
// shims serve their ports themselves until Envoy takes them over (package handover). Removals
// are never held back: they go out at once, after whatever was waiting.
package xds

import (
	"fmt"
	"sync"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"

	"github.com/envoy-docker-shim/envoy-docker-shim/internal/mapping"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/envoyconfig"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/registry"
)

// Cache holds what Envoy is told. It is the registry's Publisher: the registry is the source of
// truth and every change there lands here, in order, translated once.
type Cache struct {
	tracker   *Tracker
	options   envoyconfig.Options
	listeners *cache.LinearCache
	clusters  *cache.LinearCache
	mux       *cache.MuxCache
	gate      *gate
	metrics   *Metrics

	// pending holds the resources published but not yet in the caches, by type; flush moves them.
	mu            sync.Mutex
	pending       map[*cache.LinearCache]map[string]types.Resource
	firstPending  time.Time
	lastPublish   time.Time // when Publish last ran
	flushTimer    *time.Timer
	quiet, maxAge time.Duration
	batches       int // how many times flush updated the caches
}

// Batching of new resources (see the package documentation).
const (
	coalesceQuiet = 20 * time.Millisecond
	coalesceMax   = time.Second
)

// NewCache makes the caches, empty but for the clusters every port's configuration may refer to
// (the trace collector's, when tracing is on), so that they reach Envoy before any listener.
// bootID prefixes every cache version, so a restarted server never reuses a version
// Envoy saw from the previous one. Every change is reported to tracker before it can reach Envoy.
func NewCache(bootID string, options envoyconfig.Options, metrics *Metrics, tracker *Tracker) (*Cache, error) {
	c := &Cache{
		tracker:   tracker,
		options:   options,
		listeners: cache.NewLinearCache(resource.ListenerType, cache.WithVersionPrefix(bootID+"-")),
		clusters:  cache.NewLinearCache(resource.ClusterType, cache.WithVersionPrefix(bootID+"-")),
		metrics:   metrics,
		quiet:     coalesceQuiet,
		maxAge:    coalesceMax,
	}
	c.mux = &cache.MuxCache{
		Classify:      func(r *cache.Request) string { return r.GetTypeUrl() },
		ClassifyDelta: func(r *cache.DeltaRequest) string { return r.GetTypeUrl() },
		Caches: map[string]cache.Cache{
			resource.ListenerType: c.listeners,
			resource.ClusterType:  c.clusters,
		},
	}
	c.gate = newGate(c.mux)
	tracing, ok, err := envoyconfig.TracingCluster(options)
	if err != nil {
		return nil, err
	}
	if ok {
		version, err := contentVersion(tracing)
		if err != nil {
			return nil, err
		}
		tracker.Invalidate(resource.ClusterType, tracing.GetName(), version)
		if err := c.clusters.UpdateResource(tracing.GetName(), tracing); err != nil {
			return nil, fmt.Errorf("publish cluster %s: %w", tracing.GetName(), err)
		}
	}
	c.metrics.resources.WithLabelValues("cluster").Set(float64(c.clusters.NumResources()))
	return c, nil
}

// Publish translates e into its resources once, tells Envoy of them (the cluster first, so that
// the listener's route finds it) and returns them at the versions Envoy must acknowledge.
func (c *Cache) Publish(e registry.Entry) ([]registry.Expected, error) {
	res, ok, err := envoyconfig.ForEntry(e, c.options)
	if err != nil || !ok {
		return nil, err
	}
	c.metrics.translations.Inc()
	var expected []registry.Expected
	for _, r := range []struct {
		typeURL string
		res     types.ResourceWithName
		cache   *cache.LinearCache
	}{
		{resource.ClusterType, res.Cluster, c.clusters},
		{resource.ListenerType, res.Listener, c.listeners},
	} {
		version, err := contentVersion(r.res)
		if err != nil {
			return nil, err
		}
		expected = append(expected, registry.Expected{TypeURL: r.typeURL, Name: r.res.GetName(), Version: version})
	}
	// Every change is reported to the tracker before it can reach a stream.
	for _, x := range expected {
		c.tracker.Invalidate(x.TypeURL, x.Name, x.Version)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	now := time.Now()
	alone := c.pending == nil && now.Sub(c.lastPublish) >= c.quiet
	c.lastPublish = now
	if c.pending == nil {
		c.pending = map[*cache.LinearCache]map[string]types.Resource{c.clusters: {}, c.listeners: {}}
		c.firstPending = now
	}
	c.pending[c.clusters][res.Cluster.GetName()] = res.Cluster
	c.pending[c.listeners][res.Listener.GetName()] = res.Listener
	if alone {
		// After a pause, the first port goes at once: a lone docker run's waits for no batch, and a
		// range's first is one push more.
		c.flushLocked()
		return expected, nil
	}
	// Flush once nothing new came for quiet, and no later than maxAge after the first.
	wait := min(c.quiet, time.Until(c.firstPending.Add(c.maxAge)))
	if c.flushTimer == nil {
		c.flushTimer = time.AfterFunc(wait, c.flushLater)
	} else {
		c.flushTimer.Reset(wait)
	}
	return expected, nil
}

func (c *Cache) flushLater() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.flushLocked()
}

// flushLocked moves the pending resources into the caches, clusters first so that the listeners'
// routes find them. Resources marshal (they were hashed when published), so the caches' errors,
// which come only from marshalling, cannot happen here.
func (c *Cache) flushLocked() {
	if c.pending == nil {
		return
	}
	for _, lc := range []*cache.LinearCache{c.clusters, c.listeners} {
		if len(c.pending[lc]) > 0 {
			_ = lc.UpdateResources(c.pending[lc], nil)
		}
	}
	c.pending = nil
	c.batches++
	c.countResources()
}

// Withdraw removes the resources of e, the listener first so that no new connection meets a
// missing cluster, and returns them as Envoy must no longer hold them.
func (c *Cache) Withdraw(e registry.Entry) []registry.Expected {
	if e.Proto != mapping.TCP || e.Mode == registry.ModeProxiedByShim {
		return nil
	}
	expected := []registry.Expected{
		{TypeURL: resource.ListenerType, Name: envoyconfig.ListenerName(e.Key)},
		{TypeURL: resource.ClusterType, Name: envoyconfig.ClusterName(e.Key)},
	}
	for _, x := range expected {
		c.tracker.Invalidate(x.TypeURL, x.Name, "")
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.flushLocked() // in order: what was published before goes first
	// Errors here only come from notifying watches of a resource that failed to marshal, which
	// cannot happen for a deletion; there is nothing to roll back.
	_ = c.listeners.DeleteResource(expected[0].Name)
	_ = c.clusters.DeleteResource(expected[1].Name)
	c.countResources()
	return expected
}

func (c *Cache) countResources() {
	c.metrics.resources.WithLabelValues("listener").Set(float64(c.listeners.NumResources()))
	c.metrics.resources.WithLabelValues("cluster").Set(float64(c.clusters.NumResources()))
}

// contentVersion is the version go-control-plane gives a resource in delta xDS: the hash of its
// deterministic encoding.
func contentVersion(r types.Resource) (string, error) {
	b, err := cache.MarshalResource(r)
	if err != nil {
		return "", fmt.Errorf("marshal %T: %w", r, err)
	}
	return cache.HashResource(b), nil
}

// Serving is the cache the ADS server serves from: nothing reaches Envoy before Open.
func (c *Cache) Serving() cache.Cache { return c.gate }

// Open starts answering Envoy, with the registry as complete as it is going to get: call it once
// shims have re-registered and resync has restored the rest, or when the grace period ends.
func (c *Cache) Open() { c.gate.Open() }

// IsOpen reports whether Envoy is being answered.
func (c *Cache) IsOpen() bool { return c.gate.isOpen() }
