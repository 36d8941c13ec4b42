package xds

import (
	"net/netip"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/internal/mapping"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/envoyconfig"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/registry"
)

func entry(port uint16) registry.Entry {
	return registry.Entry{
		Mapping: mapping.Mapping{Key: mapping.Key{Proto: mapping.TCP, HostIP: netip.MustParseAddr("127.0.0.1"), HostPort: port},
			ContainerIP: netip.MustParseAddr("172.17.0.2"), ContainerPort: 80},
		Service: registry.Service{Name: "web-test", Operation: "web", Mode: registry.ModeHTTP},
	}
}

func newTestCache(t *testing.T) *Cache {
	t.Helper()
	metrics := NewMetrics(nil)
	c, err := NewCache("test", envoyconfig.Options{}, metrics, NewTracker(metrics))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// A port range publishes a port every few milliseconds: the caches (and so Envoy) get the first at
// once (it might have been a lone docker run's) and the rest in one batch once the burst pauses,
// not one push per port.
func TestBurstReachesTheCachesInOneBatch(t *testing.T) {
	c := newTestCache(t)
	c.quiet, c.maxAge = 50*time.Millisecond, 10*time.Second
	const n = 100
	for i := range n {
		if _, err := c.Publish(entry(uint16(20000 + i))); err != nil {
			t.Fatal(err)
		}
	}
	if got := c.listeners.NumResources(); got != 1 {
		t.Fatalf("%d listeners in the cache during the burst, want 1 (the first; the rest batched)", got)
	}
	deadline := time.Now().Add(5 * time.Second)
	for c.listeners.NumResources() < n || c.clusters.NumResources() < n {
		if time.Now().After(deadline) {
			t.Fatalf("after the burst: %d listeners, %d clusters in the cache, want %d each", c.listeners.NumResources(), c.clusters.NumResources(), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
	c.mu.Lock()
	batches := c.batches
	c.mu.Unlock()
	if batches != 2 {
		t.Errorf("%d updates of the caches for one burst, want 2 (its first port, then the rest)", batches)
	}
}

// A burst that never pauses still reaches the caches within maxAge of its first change.
func TestEndlessBurstFlushesWithinMaxAge(t *testing.T) {
	c := newTestCache(t)
	c.quiet, c.maxAge = 40*time.Millisecond, 200*time.Millisecond
	start := time.Now()
	for i := 0; c.listeners.NumResources() <= 1; i++ { // the first goes at once
		if time.Since(start) > 2*time.Second {
			t.Fatal("nothing reached the caches in 2 s of an endless burst")
		}
		if _, err := c.Publish(entry(uint16(20000 + i))); err != nil {
			t.Fatal(err)
		}
		time.Sleep(10 * time.Millisecond) // faster than quiet: never a pause
	}
	if took := time.Since(start); took < c.maxAge || took > c.maxAge+500*time.Millisecond {
		t.Errorf("first batch after %v, want about maxAge (%v)", took, c.maxAge)
	}
}

// A port published after a pause reaches the caches at once: a lone docker run waits for no batch.
func TestPortAfterAPauseGoesAtOnce(t *testing.T) {
	c := newTestCache(t)
	c.quiet, c.maxAge = 30*time.Millisecond, time.Hour
	for i := range 3 {
		if i > 0 {
			time.Sleep(2 * c.quiet)
		}
		if _, err := c.Publish(entry(uint16(20000 + i))); err != nil {
			t.Fatal(err)
		}
		if got := c.listeners.NumResources(); got != i+1 {
			t.Fatalf("port %d, published after a pause: %d listeners in the cache, want %d", i+1, got, i+1)
		}
	}
}

// A removal is never held back, and what was published before it goes first.
func TestWithdrawFlushesFirst(t *testing.T) {
	c := newTestCache(t)
	c.quiet, c.maxAge = time.Hour, time.Hour
	a, b := entry(20000), entry(20001)
	for _, e := range []registry.Entry{a, b} {
		if _, err := c.Publish(e); err != nil {
			t.Fatal(err)
		}
	}
	c.Withdraw(a)
	names := c.listeners.GetResources()
	if _, ok := names[envoyconfig.ListenerName(b.Key)]; !ok || len(names) != 1 {
		t.Fatalf("listeners after the removal: %v; want only %s", keys(names), envoyconfig.ListenerName(b.Key))
	}
	if got := c.clusters.NumResources(); got != 1 {
		t.Fatalf("%d clusters after the removal, want 1", got)
	}
}

func keys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}
