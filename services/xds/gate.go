package xds

import (
	"context"
	"sync"

	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
)

// gate holds every watch back until the registry is complete. A restarted server starts empty;
// answering Envoy then would tell it to remove every listener it still serves. Until Open, Envoy
// gets no answer at all and keeps its last configuration.
type gate struct {
	inner cache.Cache

	mu      sync.Mutex
	open    bool
	nextID  uint64
	waiting map[uint64]func() // creates the real watch
	cancels map[uint64]func() // of real watches created at Open, for the deferred cancel funcs
}

var _ cache.Cache = (*gate)(nil)

func newGate(inner cache.Cache) *gate {
	return &gate{inner: inner, waiting: make(map[uint64]func()), cancels: make(map[uint64]func())}
}

func (g *gate) CreateWatch(req *cache.Request, sub cache.Subscription, out chan cache.Response) (func(), error) {
	return g.defer_(func() (func(), error) { return g.inner.CreateWatch(req, sub, out) })
}

func (g *gate) CreateDeltaWatch(req *cache.DeltaRequest, sub cache.Subscription, out chan cache.DeltaResponse) (func(), error) {
	return g.defer_(func() (func(), error) { return g.inner.CreateDeltaWatch(req, sub, out) })
}

func (g *gate) Fetch(ctx context.Context, req *cache.Request) (cache.Response, error) {
	return g.inner.Fetch(ctx, req)
}

func (g *gate) defer_(create func() (func(), error)) (func(), error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.open {
		return create()
	}
	g.nextID++
	id := g.nextID
	g.waiting[id] = func() {
		// A watch that fails to be created now has no caller to report to; the stream's next
		// request creates it again.
		if cancel, err := create(); err == nil && cancel != nil {
			g.cancels[id] = cancel
		}
	}
	return func() {
		g.mu.Lock()
		defer g.mu.Unlock()
		delete(g.waiting, id)
		if cancel, ok := g.cancels[id]; ok {
			delete(g.cancels, id)
			cancel()
		}
	}, nil
}

// Open lets every held and future watch through; it is idempotent.
func (g *gate) Open() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.open {
		return
	}
	g.open = true
	for id, create := range g.waiting {
		delete(g.waiting, id)
		create()
	}
}

func (g *gate) isOpen() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.open
}
