// Package registry owns the set of published ports that envoy-docker-server serves: the one source
// of truth from which everything Envoy sees is derived. It does no I/O. Its Publisher (the xDS
// cache) is given every change in order, and says what Envoy must then hold; Claim and Release
// return that, so the caller can wait for Envoy without building anything again.
package registry

import (
	"cmp"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/internal/mapping"
)

// Mode says who carries a mapping's traffic and how.
type Mode string

const (
	// ModeHTTP: Envoy's HTTP connection manager, per-request stats, tracing and access logs.
	ModeHTTP Mode = "http"
	// ModeTCP: Envoy's TCP proxy, per-connection stats.
	ModeTCP Mode = "tcp"
	// ModeProxiedByShim: the shim proxies the port itself (UDP); listed here, never configured in Envoy.
	ModeProxiedByShim Mode = "shim"
)

// Choice is a container's own answer to a yes/no setting, or ChoiceDefault to follow the server's.
type Choice string

const (
	ChoiceDefault Choice = ""
	ChoiceOn      Choice = "on"
	ChoiceOff     Choice = "off"
)

// Or is the choice as a bool, def when the container made none.
func (c Choice) Or(def bool) bool {
	switch c {
	case ChoiceOn:
		return true
	case ChoiceOff:
		return false
	}
	return def
}

// ProxyProtocol is the version of the PROXY protocol header Envoy sends the container in front
// of each TCP-mode connection, so that it learns the client's address; "" sends none.
type ProxyProtocol string

const (
	ProxyProtocolNone ProxyProtocol = ""
	ProxyProtocolV1   ProxyProtocol = "v1"
	ProxyProtocolV2   ProxyProtocol = "v2"
)

// Service is what the container's labels say about the mapping.
type Service struct {
	// Name is ServiceName-EnvironmentName (or the container's name), sanitised for Envoy stat names
	// and kept distinct from every other service's (see labels.StatName).
	Name string
	// Operation is the ServiceName label, named the same way, for tracing decorators.
	Operation     string
	ContainerID   string
	ContainerName string
	Mode          Mode
	// AccessLog is the container's AccessLog label: whether Envoy logs its requests (HTTP) or
	// connections (TCP), or the server's EDS_ACCESS_LOG when the container does not say.
	AccessLog Choice
	// ProxyProtocol is the container's ProxyProtocol label (TCP mode only).
	ProxyProtocol ProxyProtocol
	// ServiceLabel, EnvironmentLabel and Image are the container's ServiceName and
	// EnvironmentName labels and its image as written (valid UTF-8, long ones cut), for operators
	// to see beside Name; Envoy is never told them.
	ServiceLabel     string
	EnvironmentLabel string
	Image            string
}

// Shim describes the process holding the registration.
type Shim struct {
	PID     int32
	Version string
}

// Entry is one live registration.
type Entry struct {
	mapping.Mapping
	Service
	Shim    Shim
	Owner   Owner
	ReadyAt time.Time
}

// Owner identifies the registration stream that holds an entry; only the owner can release it.
type Owner uint64

// Expected is one Envoy resource at the exact content Envoy must hold after a change ("" Version:
// Envoy must hold it no longer).
type Expected struct {
	TypeURL string
	Name    string
	Version string
}

// Publisher turns every change of the registry, in order, into what Envoy is told, and says what
// Envoy must hold once it applied the change (nothing for an entry Envoy does not carry). It must
// not call back into the registry. A Publish that fails leaves the registry as it was.
type Publisher interface {
	Publish(Entry) ([]Expected, error)
	Withdraw(Entry) []Expected
}

// ConflictError says the host socket is already published for another container.
type ConflictError struct{ Existing Entry }

func (e *ConflictError) Error() string {
	return fmt.Sprintf("host port %s is already published for container %s (%s) by shim pid %d",
		e.Existing.Key, shortID(e.Existing.ContainerID), e.Existing.ContainerName, e.Existing.Shim.PID)
}

func shortID(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

// Registry is safe for concurrent use.
type Registry struct {
	mu        sync.Mutex
	entries   map[mapping.Key]Entry
	publisher Publisher
	lastOwner Owner
	// live are the owners whose shim holds its registration open (Hold).
	live map[Owner]bool
}

// New returns an empty registry that publishes its changes with publisher (which may be nil).
func New(publisher Publisher) *Registry {
	return &Registry{entries: make(map[mapping.Key]Entry), publisher: publisher, live: make(map[Owner]bool)}
}

// Hold says owner's shim holds its registration open, until Unhold: RemoveContainer leaves its
// entries to the shim's own deregistration.
func (r *Registry) Hold(owner Owner) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.live[owner] = true
}

// Unhold ends Hold.
func (r *Registry) Unhold(owner Owner) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.live, owner)
}

// NewOwner hands out a token for one registration stream.
func (r *Registry) NewOwner() Owner {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lastOwner++
	return r.lastOwner
}

// Claim adds or takes over the entry for e's key, and returns what Envoy must hold to serve it.
// The same mapping claimed again (a shim that reconnected) changes owner without changing what
// Envoy holds; a different mapping on a held key is a conflict.
func (r *Registry) Claim(e Entry) ([]Expected, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.check(&e); err != nil {
		return nil, err
	}
	var expected []Expected
	if r.publisher != nil {
		var err error
		if expected, err = r.publisher.Publish(e); err != nil {
			return nil, err
		}
	}
	r.entries[e.Key] = e
	return expected, nil
}

// Reserve records e as Claim does, conflicts included, but leaves it unpublished: the caller
// answers a shim that serves the port itself first, and then Publishes it.
func (r *Registry) Reserve(e Entry) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.check(&e); err != nil {
		return err
	}
	r.entries[e.Key] = e
	return nil
}

// Publish hands the entry of key to the publisher if owner still holds it, and returns what
// Envoy must then hold (nothing if owner let go of key meanwhile).
func (r *Registry) Publish(key mapping.Key, owner Owner) ([]Expected, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e, ok := r.entries[key]
	if !ok || e.Owner != owner || r.publisher == nil {
		return nil, nil
	}
	return r.publisher.Publish(e)
}

// check validates e against the entry that holds its key, if any, and takes that entry's ready
// time when e is the same mapping of the same container (a re-registration).
func (r *Registry) check(e *Entry) error {
	if err := e.Mapping.Validate(); err != nil {
		return err
	}
	if old, ok := r.entries[e.Key]; ok && old.Owner != e.Owner {
		if old.Mapping != e.Mapping || old.ContainerID != e.ContainerID {
			return &ConflictError{Existing: old}
		}
		if e.ReadyAt.IsZero() {
			e.ReadyAt = old.ReadyAt
		}
	}
	return nil
}

// MarkReady records when Envoy confirmed the entry; it is a no-op for a key the owner no longer holds.
func (r *Registry) MarkReady(key mapping.Key, owner Owner, at time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if e, ok := r.entries[key]; ok && e.Owner == owner {
		e.ReadyAt = at
		r.entries[key] = e
	}
}

// Release removes the entry if owner still holds it, reports whether it did, and returns what
// Envoy must no longer hold.
func (r *Registry) Release(key mapping.Key, owner Owner) ([]Expected, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e, ok := r.entries[key]
	if !ok || e.Owner != owner {
		return nil, false
	}
	return r.remove(e), true
}

// RemoveContainer drops every entry of a container that is gone and returns them, except those
// whose shim still holds its registration (Hold): dockerd stops that shim as it removes the
// container, and the shim deregisters. Withdrawing its port from Envoy before then would send the
// port's last connections to the shim's own socket and wake an idle shim just as dockerd stops it.
func (r *Registry) RemoveContainer(containerID string) []Entry {
	r.mu.Lock()
	defer r.mu.Unlock()
	var removed []Entry
	for _, e := range r.entries {
		if e.ContainerID == containerID && !r.live[e.Owner] {
			removed = append(removed, e)
		}
	}
	sortEntries(removed)
	for _, e := range removed {
		r.remove(e)
	}
	return removed
}

func (r *Registry) remove(e Entry) []Expected {
	delete(r.entries, e.Key)
	if r.publisher == nil {
		return nil
	}
	return r.publisher.Withdraw(e)
}

// Get returns the entry for key.
func (r *Registry) Get(key mapping.Key) (Entry, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e, ok := r.entries[key]
	return e, ok
}

// List returns every entry ordered by protocol, host address and port.
func (r *Registry) List() []Entry {
	r.mu.Lock()
	out := make([]Entry, 0, len(r.entries))
	for _, e := range r.entries {
		out = append(out, e)
	}
	r.mu.Unlock()
	sortEntries(out)
	return out
}

// Len is the number of live entries.
func (r *Registry) Len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.entries)
}

func sortEntries(es []Entry) {
	slices.SortFunc(es, func(a, b Entry) int {
		return cmp.Or(
			cmp.Compare(a.Proto, b.Proto),
			a.HostIP.Compare(b.HostIP),
			cmp.Compare(a.HostPort, b.HostPort),
		)
	})
}
