// Package dockerapi is envoy-docker-server's only contact with the Docker Engine API: it finds the
// container behind a container IP and watches for containers that go away.
//
// It never inspects a container (GET /containers/{id}/json): the shim registers while dockerd
// holds the container's lock in the middle of `docker start`, and inspect blocks until the start
// finishes, which deadlocks with the shim's own handshake. Network inspection and the container
// list answer at once and carry what we need.
//
// A network inspect lists each endpoint under the ID of the container whose sandbox it has joined,
// or, before the daemon has recorded that join, under "ep-<endpoint ID>". dockerd 20.10 starts the
// userland proxy after the join is recorded, so a starting container is listed under its ID;
// dockerd 29 (seen on API 1.56) starts it before, so the endpoint of a starting container is keyed
// "ep-..." there. The keying itself is the same code from 20.10 to 29 (moby's
// buildDetailedNetworkResources, later buildContainerAttachments); only the moment the proxy
// starts moved. So the Finder takes either shape from any version: an ID key is looked up by ID,
// an "ep-" key by the endpoint's name, which dockerd sets to the container's name when it creates
// the endpoint.
package dockerapi

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strings"
	"sync"
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

	// recent remembers the last lookups: dockerd starts a range's proxies one after another, all
	// for the same container IP, and waits for each, while the Docker API, busy starting the
	// container, takes a millisecond or more per call. A remembered answer is used only while
	// its network still lists the same endpoint (same key, same endpoint ID) at that IP, checked
	// with one call instead of a network list, an inspect per network and a container list, and
	// at most every trustFor: an endpoint ID names one attachment of one container, so a new
	// container that got the IP is never taken for the old one. Between checks, Forget (the
	// container died or was destroyed) drops it: for its IP to go to another container, the old
	// one must be gone, which dockerd reports before the new one can even be created.
	// Container labels never change; a name changed by `docker rename` is stale for recentFor at
	// most.
	mu     sync.Mutex
	recent map[netip.Addr]found
}

// found is one remembered lookup.
type found struct {
	ep        endpoint
	networkID string
	container labels.Container
	at        time.Time // looked up
	checked   time.Time // last seen unchanged on its network
}

// recentFor bounds how long a lookup is remembered, trustFor how long it is used without looking
// at its network again, recentMax how many are remembered.
const (
	recentFor = 10 * time.Second
	trustFor  = time.Second
	recentMax = 256
)

// Forget drops what is remembered of a container that died or was destroyed.
func (f *Finder) Forget(containerID string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for ip, r := range f.recent {
		if r.container.ID == containerID {
			delete(f.recent, ip)
		}
	}
}

// FindByIP returns the container that has ip on one of its networks.
func (f *Finder) FindByIP(ctx context.Context, ip netip.Addr) (labels.Container, error) {
	if f.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, f.Timeout)
		defer cancel()
	}
	ip = ip.Unmap()
	if c, ok := f.remembered(ctx, ip); ok {
		return c, nil
	}
	ep, networkID, err := f.endpointByIP(ctx, ip)
	if err != nil {
		return labels.Container{}, err
	}
	list, err := f.Engine.ContainerList(ctx, container.ListOptions{All: true, Filters: ep.listFilter()})
	if err != nil {
		return labels.Container{}, fmt.Errorf("list containers for %s: %w", ep, err)
	}
	for _, c := range list {
		if ep.ownedBy(c) {
			found := labels.Container{ID: c.ID, Name: containerName(c.Names), Image: c.Image, Labels: c.Labels}
			f.remember(ip, ep, networkID, found)
			return found, nil
		}
	}
	// Listed on a network but not in the container list: it was removed in between.
	return labels.Container{}, fmt.Errorf("%s: %w", ep, ErrNotFound)
}

// remembered returns the container of a recent lookup of ip, if its network still lists the same
// endpoint at ip.
func (f *Finder) remembered(ctx context.Context, ip netip.Addr) (labels.Container, bool) {
	f.mu.Lock()
	r, ok := f.recent[ip]
	f.mu.Unlock()
	if !ok || time.Since(r.at) > recentFor {
		return labels.Container{}, false
	}
	if time.Since(r.checked) < trustFor {
		return r.container, true
	}
	detail, err := f.Engine.NetworkInspect(ctx, r.networkID, network.InspectOptions{})
	if err != nil {
		return labels.Container{}, false
	}
	now, ok := detail.Containers[r.ep.key]
	if !ok || now.EndpointID != r.ep.EndpointID || (!addressIs(now.IPv4Address, ip) && !addressIs(now.IPv6Address, ip)) {
		f.forget(ip)
		return labels.Container{}, false
	}
	f.mu.Lock()
	if cur, ok := f.recent[ip]; ok && cur.ep.EndpointID == r.ep.EndpointID {
		cur.checked = time.Now()
		f.recent[ip] = cur
	}
	f.mu.Unlock()
	return r.container, true
}

func (f *Finder) remember(ip netip.Addr, ep endpoint, networkID string, c labels.Container) {
	if ep.EndpointID == "" {
		return // nothing to recognise the attachment by
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.recent == nil || len(f.recent) >= recentMax {
		f.recent = make(map[netip.Addr]found)
	}
	now := time.Now()
	f.recent[ip] = found{ep: ep, networkID: networkID, container: c, at: now, checked: now}
}

func (f *Finder) forget(ip netip.Addr) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.recent, ip)
}

// containerName picks the container's own name from the list's names, which also hold the names
// other containers link to it by ("/web/db").
func containerName(names []string) string {
	for _, n := range names {
		if rest, ok := strings.CutPrefix(n, "/"); ok && !strings.Contains(rest, "/") {
			return rest
		}
	}
	return strings.TrimPrefix(names[0], "/")
}

// endpoint is a network inspect's entry for one container's attachment.
type endpoint struct {
	key     string // the container ID, or "ep-<endpoint ID>" before the daemon records the join
	network string // the network's name, the key of a container's own record of it
	network.EndpointResource
}

// endpointKeyPrefix marks an endpoint listed under its own ID rather than its container's.
const endpointKeyPrefix = "ep-"

func (e endpoint) String() string {
	if e.containerID() != "" {
		return "container " + e.key
	}
	return fmt.Sprintf("endpoint %s (named %q) on network %s", e.EndpointID, e.Name, e.network)
}

// containerID is the key when it is a container ID, else "".
func (e endpoint) containerID() string {
	if strings.HasPrefix(e.key, endpointKeyPrefix) {
		return ""
	}
	return e.key
}

// listFilter asks the container list for the endpoint's container: by ID when the network says
// which, else by name. The daemon matches a name filter as a regular expression against the name
// with and without its leading "/", so it is anchored and quoted to match this name only.
func (e endpoint) listFilter() filters.Args {
	if id := e.containerID(); id != "" {
		return filters.NewArgs(filters.Arg("id", id))
	}
	return filters.NewArgs(filters.Arg("name", "^/?"+regexp.QuoteMeta(e.Name)+"$"))
}

// ownedBy reports whether c is the container of the endpoint. Keyed by container ID, the ID
// decides. Keyed by endpoint, the name does (names are unique among a daemon's containers), unless
// the container's own record already names another endpoint on this network: then the endpoint is
// a stale one and c merely shares its name. While the container starts, its record has no
// endpoint ID yet.
func (e endpoint) ownedBy(c container.Summary) bool {
	if len(c.Names) == 0 {
		return false
	}
	if id := e.containerID(); id != "" {
		return c.ID == id
	}
	if e.Name == "" || !slices.Contains(c.Names, "/"+e.Name) {
		return false
	}
	if c.NetworkSettings != nil {
		if n := c.NetworkSettings.Networks[e.network]; n != nil && n.EndpointID != "" && n.EndpointID != e.EndpointID {
			return false
		}
	}
	return true
}

// endpointByIP finds the endpoint with ip, and the ID of its network.
func (f *Finder) endpointByIP(ctx context.Context, ip netip.Addr) (endpoint, string, error) {
	nets, err := f.Engine.NetworkList(ctx, network.ListOptions{})
	if err != nil {
		return endpoint{}, "", fmt.Errorf("list networks: %w", err)
	}
	for _, n := range nets {
		if n.Driver == "host" || n.Driver == "null" {
			continue
		}
		detail, err := f.Engine.NetworkInspect(ctx, n.ID, network.InspectOptions{})
		if err != nil {
			if ctx.Err() != nil {
				return endpoint{}, "", fmt.Errorf("inspect network %s: %w", n.Name, err)
			}
			continue // removed since the list: not where our container is
		}
		for key, ep := range detail.Containers {
			if addressIs(ep.IPv4Address, ip) || addressIs(ep.IPv6Address, ip) {
				return endpoint{key: key, network: detail.Name, EndpointResource: ep}, n.ID, nil
			}
		}
	}
	return endpoint{}, "", fmt.Errorf("container IP %s: %w", ip, ErrNotFound)
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
