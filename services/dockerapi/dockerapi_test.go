package dockerapi

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/events"
	"github.com/docker/docker/api/types/network"
)

type fakeEngine struct {
	networks   []network.Inspect
	containers []container.Summary
	inspected  []string
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

func (f *fakeEngine) ContainerList(_ context.Context, o container.ListOptions) ([]container.Summary, error) {
	var out []container.Summary
	for _, c := range f.containers {
		if o.Filters.ExactMatch("id", c.ID) || len(o.Filters.Get("id")) == 0 {
			out = append(out, c)
		}
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
			{ID: "c2", Names: []string{"/db"}, Labels: map[string]string{"ProxyMode": "tcp"}},
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
	if c.Name != "db" || c.Labels["ProxyMode"] != "tcp" {
		t.Errorf("container %+v", c)
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
