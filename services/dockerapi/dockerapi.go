// Package dockerapi is envoy-docker-server's only contact with the Docker Engine API: it finds the
// container behind a container IP and watches for containers that go away.
//
// It never inspects a container (GET /containers/{id}/json): the shim registers while dockerd
// holds the container's lock in the middle of `docker start`, and inspect blocks until the start
// finishes, which deadlocks with the shim's own handshake. Network inspection and the container
// list answer at once and carry what we need.
package dockerapi

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/events"
	"github.com/docker/docker/api/types/filters"
	"github.com/docker/docker/api/types/network"
	"github.com/docker/docker/client"

	"github.com/envoy-docker-shim/envoy-docker-shim/services/labels"
)

// Engine is the part of the Docker client this package uses; tests give it a fake.
type Engine interface {
	NetworkList(ctx context.Context, options network.ListOptions) ([]network.Summary, error)
	NetworkInspect(ctx context.Context, networkID string, options network.InspectOptions) (network.Inspect, error)
	ContainerList(ctx context.Context, options container.ListOptions) ([]container.Summary, error)
	Events(ctx context.Context, options events.ListOptions) (<-chan events.Message, <-chan error)
}

// NewClient connects to the Docker Engine at host (e.g. unix:///var/run/docker.sock), negotiating
// the API version so every daemon from 20.10 on works.
func NewClient(host string) (*client.Client, error) {
	c, err := client.NewClientWithOpts(client.WithHost(host), client.WithAPIVersionNegotiation())
	if err != nil {
		return nil, fmt.Errorf("docker client for %s: %w", host, err)
	}
	return c, nil
}

// ErrNotFound says no container on any network has the IP.
var ErrNotFound = errors.New("no container has this IP")

// Finder maps container IPs to containers.
type Finder struct {
	Engine Engine
	// Timeout bounds one lookup, all calls included: a slow Docker API must not hold up dockerd.
	Timeout time.Duration
}

// FindByIP returns the container that has ip on one of its networks.
func (f *Finder) FindByIP(ctx context.Context, ip netip.Addr) (labels.Container, error) {
	if f.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, f.Timeout)
		defer cancel()
	}
	id, name, err := f.endpointOwner(ctx, ip.Unmap())
	if err != nil {
		return labels.Container{}, err
	}
	list, err := f.Engine.ContainerList(ctx, container.ListOptions{All: true, Filters: filters.NewArgs(filters.Arg("id", id))})
	if err != nil {
		return labels.Container{}, fmt.Errorf("list container %s: %w", id, err)
	}
	for _, c := range list {
		if c.ID == id {
			n := name
			if len(c.Names) > 0 {
				n = c.Names[0]
			}
			return labels.Container{ID: c.ID, Name: strings.TrimPrefix(n, "/"), Labels: c.Labels}, nil
		}
	}
	// Listed on a network but not in the container list: it was removed in between.
	return labels.Container{}, fmt.Errorf("container %s: %w", id, ErrNotFound)
}

func (f *Finder) endpointOwner(ctx context.Context, ip netip.Addr) (id, name string, err error) {
	nets, err := f.Engine.NetworkList(ctx, network.ListOptions{})
	if err != nil {
		return "", "", fmt.Errorf("list networks: %w", err)
	}
	for _, n := range nets {
		if n.Driver == "host" || n.Driver == "null" {
			continue
		}
		detail, err := f.Engine.NetworkInspect(ctx, n.ID, network.InspectOptions{})
		if err != nil {
			if ctx.Err() != nil {
				return "", "", fmt.Errorf("inspect network %s: %w", n.Name, err)
			}
			continue // removed since the list: not where our container is
		}
		for cid, ep := range detail.Containers {
			if addressIs(ep.IPv4Address, ip) || addressIs(ep.IPv6Address, ip) {
				return cid, ep.Name, nil
			}
		}
	}
	return "", "", fmt.Errorf("container IP %s: %w", ip, ErrNotFound)
}

// addressIs compares an endpoint address in CIDR form ("172.17.0.2/16") with ip.
func addressIs(cidr string, ip netip.Addr) bool {
	if cidr == "" {
		return false
	}
	if p, err := netip.ParsePrefix(cidr); err == nil {
		return p.Addr().Unmap() == ip
	}
	a, err := netip.ParseAddr(cidr)
	return err == nil && a.Unmap() == ip
}

// Watcher reports containers that are gone, so mappings nobody deregistered do not linger.
type Watcher struct {
	Engine Engine
	// Gone is called with the ID of every container that died or was destroyed.
	Gone func(containerID string)
	// OnError is told of every broken event stream before the watcher reconnects.
	OnError func(error)
	// Backoff is the first wait before reconnecting (default one second); it doubles while the
	// API stays down, up to MaxBackoff (default 30 s), so a stopped daemon is not hammered.
	Backoff, MaxBackoff time.Duration
}

// Run follows the Docker event stream until ctx ends, reconnecting after errors.
func (w *Watcher) Run(ctx context.Context) error {
	first, limit := w.Backoff, w.MaxBackoff
	if first <= 0 {
		first = time.Second
	}
	if limit < first {
		limit = max(first, 30*time.Second)
	}
	backoff := first
	for {
		started := time.Now()
		err := w.follow(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if w.OnError != nil {
			w.OnError(err)
		}
		if time.Since(started) > limit {
			backoff = first // the stream was healthy for a while: this is a fresh failure
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, limit)
	}
}

func (w *Watcher) follow(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	msgs, errs := w.Engine.Events(ctx, events.ListOptions{Filters: filters.NewArgs(
		filters.Arg("type", string(events.ContainerEventType)),
		filters.Arg("event", string(events.ActionDie)),
		filters.Arg("event", string(events.ActionDestroy)),
	)})
	for {
		select {
		case m := <-msgs:
			if m.Actor.ID != "" && w.Gone != nil {
				w.Gone(m.Actor.ID)
			}
		case err := <-errs:
			if err == nil {
				err = errors.New("event stream closed")
			}
			return fmt.Errorf("docker events: %w", err)
		}
	}
}

// Unavailable is the Engine of a server configured without a Docker API (DOCKER_HOST empty): no
// container is ever found, so every port is named after its container IP, and no event arrives.
type Unavailable struct{}

func (Unavailable) NetworkList(context.Context, network.ListOptions) ([]network.Summary, error) {
	return nil, nil
}

func (Unavailable) NetworkInspect(context.Context, string, network.InspectOptions) (network.Inspect, error) {
	return network.Inspect{}, ErrNotFound
}

func (Unavailable) ContainerList(context.Context, container.ListOptions) ([]container.Summary, error) {
	return nil, nil
}

func (Unavailable) Events(ctx context.Context, _ events.ListOptions) (<-chan events.Message, <-chan error) {
	errs := make(chan error, 1)
	go func() { <-ctx.Done(); errs <- ctx.Err() }()
	return nil, errs
}
