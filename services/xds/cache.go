// Package xds is envoy-docker-server's xDS control plane: per-resource caches that the registry
// feeds (one LinearCache per resource type, so a change costs the same with 10 ports or 10,000,
// and delta xDS sends only what changed), go-control-plane's ADS server over them, and a tracker
// of what Envoy acknowledged, so a registration is answered only once Envoy really serves it.
package xds

import (
	"fmt"

	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"

	"github.com/envoy-docker-shim/envoy-docker-shim/internal/mapping"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/envoyconfig"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/registry"
)

// Want names one resource at the exact content Envoy must have acknowledged.
type Want struct {
	TypeURL string
	Name    string
	// Version is the SHA-256 of the resource's deterministic encoding: the same for the same
	// content in every server boot, so an acknowledgement can never be mistaken for another content.
	Version string
}

// Cache holds what Envoy is told. It implements registry.Observer: the registry is the source of
// truth and every change there lands here, in order.
type Cache struct {
	tracker   *Tracker
	options   envoyconfig.Options
	listeners *cache.LinearCache
	clusters  *cache.LinearCache
	mux       *cache.MuxCache
	gate      *gate
	metrics   *Metrics
}

// NewCache makes the caches, empty but for the clusters every port's configuration may refer to
// (the trace collector's, when tracing is on), so that they reach Envoy before any listener.
// bootID prefixes every state-of-the-world version, so a restarted server never reuses a version
// Envoy saw from the previous one. Every change is reported to tracker before it can reach Envoy.
func NewCache(bootID string, options envoyconfig.Options, metrics *Metrics, tracker *Tracker) (*Cache, error) {
	c := &Cache{
		tracker:   tracker,
		options:   options,
		listeners: cache.NewLinearCache(resource.ListenerType, cache.WithVersionPrefix(bootID+"-")),
		clusters:  cache.NewLinearCache(resource.ClusterType, cache.WithVersionPrefix(bootID+"-")),
		metrics:   metrics,
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

// Upsert publishes the resources of e. The cluster goes first so that the listener's route finds it.
func (c *Cache) Upsert(e registry.Entry) error {
	res, ok, err := envoyconfig.ForEntry(e, c.options)
	if err != nil || !ok {
		return err
	}
	clusterVersion, err := contentVersion(res.Cluster)
	if err != nil {
		return err
	}
	listenerVersion, err := contentVersion(res.Listener)
	if err != nil {
		return err
	}
	c.tracker.Invalidate(resource.ClusterType, res.Cluster.GetName(), clusterVersion)
	c.tracker.Invalidate(resource.ListenerType, res.Listener.GetName(), listenerVersion)
	if err := c.clusters.UpdateResource(res.Cluster.GetName(), res.Cluster); err != nil {
		return fmt.Errorf("publish cluster %s: %w", res.Cluster.GetName(), err)
	}
	if err := c.listeners.UpdateResource(res.Listener.GetName(), res.Listener); err != nil {
		return fmt.Errorf("publish listener %s: %w", res.Listener.GetName(), err)
	}
	c.metrics.resources.WithLabelValues("listener").Set(float64(c.listeners.NumResources()))
	c.metrics.resources.WithLabelValues("cluster").Set(float64(c.clusters.NumResources()))
	return nil
}

// Delete withdraws the resources of e: the listener first, so no new connection meets a missing cluster.
func (c *Cache) Delete(e registry.Entry) {
	if e.Proto != mapping.TCP || e.Mode == registry.ModeShim {
		return
	}
	// Errors here only come from notifying watches of a resource that failed to marshal, which
	// cannot happen for a deletion; there is nothing to roll back.
	listenerName, clusterName := envoyconfig.ListenerName(e.Key), envoyconfig.ClusterName(e.Key)
	c.tracker.Invalidate(resource.ListenerType, listenerName, "")
	c.tracker.Invalidate(resource.ClusterType, clusterName, "")
	_ = c.listeners.DeleteResource(listenerName)
	_ = c.clusters.DeleteResource(clusterName)
	c.metrics.resources.WithLabelValues("listener").Set(float64(c.listeners.NumResources()))
	c.metrics.resources.WithLabelValues("cluster").Set(float64(c.clusters.NumResources()))
}

// Wanted lists the resources, at their exact versions, that Envoy must acknowledge before e is
// served. It is empty when Envoy does not carry e.
func (c *Cache) Wanted(e registry.Entry) ([]Want, error) {
	res, ok, err := envoyconfig.ForEntry(e, c.options)
	if err != nil || !ok {
		return nil, err
	}
	var wants []Want
	for _, r := range []struct {
		typeURL string
		name    string
		res     types.Resource
	}{
		{resource.ClusterType, res.Cluster.GetName(), res.Cluster},
		{resource.ListenerType, res.Listener.GetName(), res.Listener},
	} {
		version, err := contentVersion(r.res)
		if err != nil {
			return nil, err
		}
		wants = append(wants, Want{TypeURL: r.typeURL, Name: r.name, Version: version})
	}
	return wants, nil
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
