package dockerapi

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/events"
	"github.com/docker/docker/api/types/filters"
	"github.com/docker/docker/api/types/network"

	"github.com/envoy-docker-shim/envoy-docker-shim/services/labels"
)

type fakeEngine struct {
	networks   []network.Inspect
	containers []container.Summary
	inspected  []string
	listed     []filters.Args
	events     chan events.Message
}

func (f *fakeEngine) NetworkList(context.Context, network.ListOptions) ([]network.Summary, error) {
	out := make([]network.Summary, len(f.networks))
	for i, n := range f.networks {
		out[i] = network.Summary{ID: n.ID, Name: n.Name, Driver: n.Driver}
	}
	return out, nil
}

func (f *fakeEngine) NetworkInspect(_ context.Context, id string, _ network.InspectOptions) (network.Inspect, error) {
	f.inspected = append(f.inspected, id)
	for _, n := range f.networks {
		if n.ID == id {
			return n, nil
		}
	}
	return network.Inspect{}, errors.New("no such network")
}

// ContainerList filters like dockerd: "id" by exact ID, "name" as a regular expression matched
// against each name with and without its leading "/".
func (f *fakeEngine) ContainerList(_ context.Context, o container.ListOptions) ([]container.Summary, error) {
	f.listed = append(f.listed, o.Filters)
	var out []container.Summary
	for _, c := range f.containers {
		if ids := o.Filters.Get("id"); len(ids) > 0 && !o.Filters.ExactMatch("id", c.ID) {
			continue
		}
		if patterns := o.Filters.Get("name"); len(patterns) > 0 && !slices.ContainsFunc(c.Names, func(n string) bool {
			return slices.ContainsFunc(patterns, func(p string) bool {
				re := regexp.MustCompile(p)
				return re.MatchString(n) || re.MatchString(strings.TrimPrefix(n, "/"))
			})
		}) {
			continue
		}
		out = append(out, c)
	}
	return out, nil
}

func (f *fakeEngine) Events(ctx context.Context, _ events.ListOptions) (<-chan events.Message, <-chan error) {
	errs := make(chan error, 1)
	go func() { <-ctx.Done(); errs <- ctx.Err() }()
	return f.events, errs
}

func engine() *fakeEngine {
	return &fakeEngine{
		networks: []network.Inspect{
			{ID: "h", Name: "host", Driver: "host"},
			{ID: "b", Name: "bridge", Driver: "bridge", Containers: map[string]network.EndpointResource{
				"c1": {Name: "web", IPv4Address: "172.17.0.2/16", IPv6Address: "fd00::2/64"},
			}},
			{ID: "u", Name: "mynet", Driver: "bridge", Containers: map[string]network.EndpointResource{
				"c2": {Name: "db", IPv4Address: "10.5.0.3/24"},
			}},
		},
		containers: []container.Summary{
			{ID: "c1", Names: []string{"/web"}, Labels: map[string]string{"ServiceName": "web"}},
			{ID: "c2", Names: []string{"/db"}, Image: "postgres:16", Labels: map[string]string{"ProxyMode": "tcp"}},
		},
	}
}

func TestFindByIP(t *testing.T) {
	tests := []struct {
		ip      string
		wantID  string
		wantErr error
	}{
		{"172.17.0.2", "c1", nil},
		{"fd00::2", "c1", nil},
		{"::ffff:172.17.0.2", "c1", nil},
		{"10.5.0.3", "c2", nil},
		{"10.5.0.4", "", ErrNotFound},
	}
	for _, tt := range tests {
		e := engine()
		f := &Finder{Engine: e, Timeout: time.Second}
		c, err := f.FindByIP(context.Background(), netip.MustParseAddr(tt.ip))
		if !errors.Is(err, tt.wantErr) || c.ID != tt.wantID {
			t.Errorf("FindByIP(%s) = %+v, %v; want %s, %v", tt.ip, c, err, tt.wantID, tt.wantErr)
		}
		for _, id := range e.inspected {
			if id == "h" {
				t.Errorf("FindByIP inspected the host network")
			}
		}
	}
	c, _ := (&Finder{Engine: engine()}).FindByIP(context.Background(), netip.MustParseAddr("10.5.0.3"))
	if c.Name != "db" || c.Image != "postgres:16" || c.Labels["ProxyMode"] != "tcp" {
		t.Errorf("container %+v", c)
	}
}

func TestContainerName(t *testing.T) {
	tests := []struct {
		names []string
		want  string
	}{
		{[]string{"/db"}, "db"},
		{[]string{"/web/db", "/db"}, "db"}, // linked to by web as db
		{[]string{"/web/db"}, "web/db"},
	}
	for _, tt := range tests {
		if got := containerName(tt.names); got != tt.want {
			t.Errorf("containerName(%q) = %q, want %q", tt.names, got, tt.want)
		}
	}
}

// summary is a container list entry; endpointID is its own record of its endpoint on network
// "bridge", empty while the daemon starts it.
func summary(id, name, endpointID string, labels map[string]string) container.Summary {
	return container.Summary{
		ID: id, Names: []string{"/" + name}, State: "created", Labels: labels,
		NetworkSettings: &container.NetworkSettingsSummary{Networks: map[string]*network.EndpointSettings{
			"bridge": {EndpointID: endpointID},
		}},
	}
}

// TestFindByIPWhileStarting: the two shapes in which a network inspect lists a container that
// the daemon is starting, as dockerd 20.10 and dockerd 29 answer them (captured from both with a
// probe in the userland proxy's place): 20.10 keys the endpoint by container ID, 29 by
// "ep-<endpoint ID>" with the container's name as the endpoint's Name. In both, the container
// list already has the labels but no endpoint ID yet.
func TestFindByIPWhileStarting(t *testing.T) {
	const (
		id    = "92a707a29706e252ccb3cdd6ccd115df58b120c231c7d73926a2276c947f3db7"
		epID  = "dc6c3c5457547ac10431628551693d658d3bd033188008083d1d22d7d5f90d2e"
		other = "0be3c1d6ae3f0b3a3b7b0f5a6d1c1c7d7f2b0e9a8c6d5e4f3a2b1c0d9e8f7a6b"
	)
	web := map[string]string{"ServiceName": "web", "ProxyMode": "tcp"}
	bridge := func(key, name string) network.Inspect {
		return network.Inspect{ID: "b", Name: "bridge", Driver: "bridge", Containers: map[string]network.EndpointResource{
			key: {Name: name, EndpointID: epID, IPv4Address: "172.29.8.2/24"},
		}}
	}
	tests := []struct {
		name       string
		network    network.Inspect
		containers []container.Summary
		wantID     string // empty: ErrNotFound
	}{
		{"20.10: keyed by container ID", bridge(id, "probe-web"),
			[]container.Summary{summary(id, "probe-web", "", web)}, id},
		{"29: keyed by endpoint, found by its name", bridge("ep-"+epID, "probe-web"),
			[]container.Summary{summary(id, "probe-web", "", web)}, id},
		{"29: the name is matched exactly, not as a pattern", bridge("ep-"+epID, "probe.web"),
			[]container.Summary{
				summary(other, "probeXweb", "", nil), summary(other, "probe.web2", "", nil), summary(other, "a-probe.web", "", nil),
				summary(id, "probe.web", "", web),
			}, id},
		{"29: a container whose record names this endpoint", bridge("ep-"+epID, "probe-web"),
			[]container.Summary{summary(id, "probe-web", epID, web)}, id},
		{"29: a container with the name but another endpoint on the network", bridge("ep-"+epID, "probe-web"),
			[]container.Summary{summary(id, "probe-web", other, web)}, ""},
		{"29: no container of that name (removed meanwhile)", bridge("ep-"+epID, "probe-web"),
			[]container.Summary{summary(other, "probe-web2", "", web)}, ""},
		{"29: an endpoint without a name", bridge("ep-"+epID, ""),
			[]container.Summary{summary(id, "probe-web", "", web)}, ""},
		{"20.10: the ID is not in the list (removed meanwhile)", bridge(id, "probe-web"),
			[]container.Summary{summary(other, "probe-web", "", web)}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := &fakeEngine{networks: []network.Inspect{tt.network}, containers: tt.containers}
			c, err := (&Finder{Engine: e, Timeout: time.Second}).FindByIP(context.Background(), netip.MustParseAddr("172.29.8.2"))
			if tt.wantID == "" {
				if !errors.Is(err, ErrNotFound) {
					t.Fatalf("FindByIP = %+v, %v; want ErrNotFound", c, err)
				}
				return
			}
			if err != nil || c.ID != tt.wantID || c.Labels["ServiceName"] != "web" || c.Labels["ProxyMode"] != "tcp" {
				t.Fatalf("FindByIP = %+v, %v; want %s with its labels", c, err, tt.wantID)
			}
			if len(e.listed) != 1 {
				t.Fatalf("%d container lists, want 1 (filtered)", len(e.listed))
			}
			if f := e.listed[0]; f.Len() != 1 {
				t.Errorf("container list filters %v, want exactly one (id or name)", f)
			}
		})
	}
}

// TestFindByIPBoundedWhenDockerHangs: a Docker API that accepts and never answers must not hold
// up a registration past the timeout (the real client, a real socket).
func TestFindByIPBoundedWhenDockerHangs(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "docker.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			defer c.Close() // hold every connection open, answer nothing
		}
	}()
	client, err := NewClient("unix://" + sock)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, err = (&Finder{Engine: client, Timeout: 300 * time.Millisecond}).FindByIP(context.Background(), netip.MustParseAddr("172.17.0.2"))
	if err == nil {
		t.Fatal("FindByIP succeeded against a silent API")
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("FindByIP took %v with a 300ms timeout", d)
	}
}

func TestWatcherReportsGoneContainers(t *testing.T) {
	e := engine()
	e.events = make(chan events.Message, 2)
	gone := make(chan string, 2)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- (&Watcher{Engine: e, Gone: func(id string) { gone <- id }}).Run(ctx) }()
	e.events <- events.Message{Type: events.ContainerEventType, Action: events.ActionDie, Actor: events.Actor{ID: "c1"}}
	select {
	case id := <-gone:
		if id != "c1" {
			t.Fatalf("gone %q", id)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("die event not reported")
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run = %v after cancel", err)
	}
}

// A range's proxies register one after another for the same container IP: after the first
// lookup, each costs one network inspect, and only while the network still lists the same
// endpoint at the IP; a new container that got the IP is looked up afresh.
func TestFindByIPRemembersWhileTheEndpointStays(t *testing.T) {
	e := engine()
	e.networks[1].Containers["c1"] = network.EndpointResource{Name: "web", EndpointID: "ep1", IPv4Address: "172.17.0.2/16"}
	f := &Finder{Engine: e, Timeout: time.Second}
	ip := netip.MustParseAddr("172.17.0.2")
	find := func() labels.Container {
		t.Helper()
		e.inspected, e.listed = nil, nil
		c, err := f.FindByIP(context.Background(), ip)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	if c := find(); c.ID != "c1" || len(e.listed) != 1 {
		t.Fatalf("first lookup: %+v, %d container lists", c, len(e.listed))
	}
	// Within trustFor of the lookup: no call at all.
	if c := find(); c.ID != "c1" || len(e.listed) != 0 || len(e.inspected) != 0 {
		t.Fatalf("trusted lookup: %+v, %d container lists, inspected %v; want c1 without a call", c, len(e.listed), e.inspected)
	}
	// Later: one inspect of its network.
	expire := func() {
		f.mu.Lock()
		for ip, r := range f.recent {
			r.checked = r.checked.Add(-trustFor)
			f.recent[ip] = r
		}
		f.mu.Unlock()
	}
	for range 3 {
		expire()
		if c := find(); c.ID != "c1" || len(e.listed) != 0 || !slices.Equal(e.inspected, []string{"b"}) {
			t.Fatalf("remembered lookup: %+v, %d container lists, inspected %v; want c1 from one inspect of b", c, len(e.listed), e.inspected)
		}
	}
	// web is removed and a new container gets its IP (another endpoint).
	expire()
	delete(e.networks[1].Containers, "c1")
	e.networks[1].Containers["c3"] = network.EndpointResource{Name: "api", EndpointID: "ep3", IPv4Address: "172.17.0.2/16"}
	e.containers = append(e.containers[1:], container.Summary{ID: "c3", Names: []string{"/api"}, Labels: map[string]string{"ServiceName": "api"}})
	if c := find(); c.ID != "c3" || c.Labels["ServiceName"] != "api" || len(e.listed) != 1 {
		t.Fatalf("after the IP changed hands: %+v, %d container lists; want c3 looked up afresh", c, len(e.listed))
	}
	// Same key, another attachment (disconnected and connected again): looked up afresh too.
	expire()
	e.networks[1].Containers["c3"] = network.EndpointResource{Name: "api", EndpointID: "ep4", IPv4Address: "172.17.0.2/16"}
	if c := find(); c.ID != "c3" || len(e.listed) != 1 {
		t.Fatalf("after a new endpoint: %+v, %d container lists", c, len(e.listed))
	}
	// Gone: not found, remembered or not.
	expire()
	delete(e.networks[1].Containers, "c3")
	if _, err := f.FindByIP(context.Background(), ip); !errors.Is(err, ErrNotFound) {
		t.Fatalf("after removal: %v, want ErrNotFound", err)
	}
}

// The Docker events say a container died or was destroyed: what was remembered of it goes, even
// within trustFor.
func TestFindByIPForgetsGoneContainers(t *testing.T) {
	e := engine()
	e.networks[1].Containers["c1"] = network.EndpointResource{Name: "web", EndpointID: "ep1", IPv4Address: "172.17.0.2/16"}
	f := &Finder{Engine: e, Timeout: time.Second}
	ip := netip.MustParseAddr("172.17.0.2")
	if c, err := f.FindByIP(context.Background(), ip); err != nil || c.ID != "c1" {
		t.Fatalf("%+v, %v", c, err)
	}
	f.Forget("c2") // another container: no effect
	e.listed = nil
	if c, _ := f.FindByIP(context.Background(), ip); c.ID != "c1" || len(e.listed) != 0 {
		t.Fatalf("after forgetting another container: %+v, %d lists", c, len(e.listed))
	}
	f.Forget("c1")
	delete(e.networks[1].Containers, "c1")
	e.networks[1].Containers["c3"] = network.EndpointResource{Name: "api", EndpointID: "ep3", IPv4Address: "172.17.0.2/16"}
	e.containers = append(e.containers, container.Summary{ID: "c3", Names: []string{"/api"}})
	if c, err := f.FindByIP(context.Background(), ip); err != nil || c.ID != "c3" {
		t.Fatalf("after c1 was gone: %+v, %v; want c3", c, err)
	}
}
