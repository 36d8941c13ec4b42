// Package registrar serves the registration API that shims call: it turns one open stream into one
// registry entry, answers Ready (or Failed with a reason fit for `docker run`), and removes the
// entry when the stream ends for any reason — a clean stop, a crash of the shim, or the shim giving
// up. A shim that serves its port itself until Envoy takes it over (Open.Serving: every TCP shim,
// and every re-registration) is answered as soon as its registration is valid; any other only
// once Envoy has acknowledged the resources that carry the port.
package registrar

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/envoy-docker-shim/envoy-docker-shim/internal/mapping"
	"github.com/envoy-docker-shim/envoy-docker-shim/internal/shimlink"
	"github.com/envoy-docker-shim/envoy-docker-shim/internal/wait"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/dockerapi"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/labels"
	pb "github.com/envoy-docker-shim/envoy-docker-shim/services/registration/registrationpb"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/registry"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/udpstats"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/xds"
)

// ContainerFinder finds the container behind a container IP (the Docker API, or a fake in tests).
type ContainerFinder interface {
	FindByIP(ctx context.Context, ip netip.Addr) (labels.Container, error)
}

// Confirmer waits until Envoy holds resources at their exact versions (package xds's Tracker).
type Confirmer interface {
	Wait(ctx context.Context, expected []registry.Expected) error
}

// Server implements the Registrar gRPC service.
type Server struct {
	pb.UnimplementedRegistrarServer

	Registry  *registry.Registry
	Finder    ContainerFinder
	Confirmer Confirmer
	// ReadyTimeout bounds the wait for Envoy; it must stay well inside the shim's own deadline,
	// itself well inside dockerd's 16 s, so the user gets our reason rather than a timeout.
	ReadyTimeout time.Duration
	Log          *slog.Logger
	Metrics      *Metrics
	// OnRestored is called after resync's Restore: the registry is as complete as it will get.
	OnRestored func()
	// UDP, if not nil, keeps the counters shims report for the ports they proxy themselves.
	UDP *udpstats.Store
	// ConnectRetryWindow is passed to shims in Ready: how long one that carries a TCP connection
	// itself keeps retrying a container that refuses, as Envoy does (EDS_CONNECT_RETRY_WINDOW).
	ConnectRetryWindow time.Duration

	linkMu  sync.Mutex
	live    map[*shimlink.Conn]bool
	closing bool

	// lastOpen is when the latest registration opened (Unix nanoseconds): Served waits for
	// registrations to pause (servedQuiet).
	lastOpen atomic.Int64
	// nextServed is the earliest time the next Served may go (servedEvery after the last).
	servedMu   sync.Mutex
	nextServed time.Time
}

// servedQuiet is how long registrations must pause before the server tells shims that Envoy has
// their ports (Served), as long as Envoy's own batches wait (package xds). Each Served wakes an
// idle shim, which runs in Go for 2-3 ms of CPU to steer its port to Envoy: during a port range
// that would be hundreds of Go starts on the CPUs dockerd needs to start the range's proxies one
// after another. A registration that came after a pause goes at once while no other has come
// (a lone docker run -p, whose port must be steered before docker run returns, as the e2e tests
// expect). Meanwhile the shim serves what reaches its own socket.
const servedQuiet = 20 * time.Millisecond

// servedEvery paces Served: one shim woken every 10 ms, each for 2-3 ms of CPU, keeps the
// wake-ups of a 1,000-port range (10 s of them) to about a quarter of one CPU, beside the
// container's own start, which dockerd does after the range's proxies.
const servedEvery = 10 * time.Millisecond

// Metrics are the registration API's Prometheus series.
type Metrics struct {
	results *prometheus.CounterVec
	toReady prometheus.Histogram
}

// NewMetrics registers the series with reg; live counts come from the registry itself.
func NewMetrics(reg prometheus.Registerer, r *registry.Registry) *Metrics {
	m := &Metrics{
		results: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "eds_registrations_total", Help: "Registrations by outcome (ready, failed).",
		}, []string{"result"}),
		toReady: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "eds_register_to_ready_seconds",
			Help:    "Time from a shim's registration to Envoy serving the port.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}),
	}
	// Both outcomes exist from the start, at zero (a failure is then a change, not a new series).
	m.results.WithLabelValues("ready")
	m.results.WithLabelValues("failed")
	live := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "eds_registrations", Help: "Live registrations (published ports).",
	}, func() float64 { return float64(r.Len()) })
	if reg != nil {
		reg.MustRegister(m.results, m.toReady, live, newServiceInfo(r))
	}
	return m
}

// session is one registration as a transport carries it: the shim link (package shimlink) or
// the gRPC Register stream that shims of earlier releases still speak after an upgrade.
type session interface {
	// Context ends when the shim goes away.
	Context() context.Context
	// Open reads the registration's first message; errShimGone when the shim left before it.
	Open() (shimlink.Open, error)
	Ready(registry.Entry) error
	// Served tells the shim Envoy has the port (shimlink.Served), once, after Ready.
	Served() error
	Fail(reason string) error
	// Next reads the shim's next message after Open (a *shimlink.Log or *shimlink.Stats); io.EOF
	// once the shim ended the registration.
	Next() (shimlink.Message, error)
}

// errShimGone says the shim went away before saying anything: there is nobody to answer.
var errShimGone = errors.New("the shim went away")

// serve holds one mapping for the life of the session.
func (s *Server) serve(sess session) {
	started := time.Now()
	open, err := sess.Open()
	if errors.Is(err, errShimGone) {
		return
	}
	if err != nil {
		s.fail(sess, err.Error())
		return
	}
	opened := time.Now().UnixNano()
	lone := time.Duration(opened-s.lastOpen.Swap(opened)) >= servedQuiet
	m := open.Mapping
	log := s.Log.With("mapping", m.Key.String(), "container_ip", m.ContainerIP.String(), "shim_pid", open.PID)

	service, err := s.describe(sess.Context(), m, open.ProxiesItself, log)
	described := time.Now()
	if err != nil {
		s.fail(sess, err.Error())
		return
	}
	owner := s.Registry.NewOwner()
	s.Registry.Hold(owner)
	defer s.Registry.Unhold(owner)
	entry := registry.Entry{
		Mapping: m,
		Service: service,
		Shim:    registry.Shim{PID: int32(open.PID), Version: open.Version},
		Owner:   owner,
	}
	// A shim that serves the port itself until Envoy takes it (every TCP shim), or has served it
	// for long (a re-registration after a server restart), needs no wait for Envoy: the port
	// carries traffic to the container already. It hears Ready as soon as the registration is
	// valid (dockerd waits for that, one port after another), and the port goes to Envoy after.
	// A failed wait must not make Envoy drop the port either: it is only logged, and the shim
	// keeps serving.
	var expected []registry.Expected
	if open.Serving {
		err = s.Registry.Reserve(entry)
	} else {
		expected, err = s.Registry.Claim(entry)
	}
	if err != nil {
		s.fail(sess, err.Error())
		return
	}
	closedByShim := false
	if s.UDP != nil {
		defer s.UDP.End(owner)
	}
	defer func() {
		withdrawn, released := s.Registry.Release(m.Key, owner)
		if !released {
			return
		}
		log.Info("deregistered")
		if closedByShim {
			// The shim is waiting (briefly) for the session to end: end it once Envoy has let
			// go of the port, so that dockerd 28+, which binds the port itself, can bind it
			// again at once when the container restarts.
			s.confirmRemoved(sess.Context(), withdrawn, log)
		}
	}()

	if !open.Serving {
		if err := s.confirm(sess.Context(), expected); err != nil {
			log.Warn("registration failed", "err", err)
			s.fail(sess, Reason(m, err))
			return
		}
	}
	readyAt := time.Now()
	s.Registry.MarkReady(m.Key, owner, readyAt)
	entry.ReadyAt = readyAt
	if err := sess.Ready(entry); err != nil {
		return
	}
	if open.Serving {
		expected, err := s.Registry.Publish(m.Key, owner)
		if err != nil {
			log.Error("the port cannot be given to Envoy; its shim keeps serving it without Envoy's metrics, logs and traces", "err", err)
		} else {
			go s.confirmInBackground(sess, expected, open.WantsServed, turn{opened: opened, lone: lone}, log)
		}
	}
	s.Metrics.results.WithLabelValues("ready").Inc()
	s.Metrics.toReady.Observe(readyAt.Sub(started).Seconds())
	// Where the time went: the Docker API, then Envoy's acknowledgement (dockerd waits for it all).
	log.Info("ready", "service", service.Name, "mode", service.Mode, "ms", readyAt.Sub(started).Milliseconds(),
		"docker_us", described.Sub(started).Microseconds(), "envoy_us", readyAt.Sub(described).Microseconds())

	// Hold the mapping until the session ends, relaying what the shim logs (under dockerd its
	// stdout and stderr go nowhere, and this is where an operator looks) and keeping the
	// counters of the traffic it carries itself.
	udpKey := udpstats.Key{Service: service.Name, Address: m.Host()}
	for {
		msg, err := sess.Next()
		if err != nil {
			closedByShim = errors.Is(err, io.EOF)
			return
		}
		switch msg := msg.(type) {
		case *shimlink.Log:
			log.Log(sess.Context(), shimLevel(msg.Level), msg.Message, "source", "shim")
		case *shimlink.Stats:
			if s.UDP != nil && service.Mode == registry.ModeProxiedByShim {
				s.UDP.Report(owner, udpKey, *msg)
			}
		}
	}
}

func (s *Server) describe(ctx context.Context, m mapping.Mapping, proxiesItself bool, log *slog.Logger) (registry.Service, error) {
	var found *labels.Container
	c, err := s.Finder.FindByIP(ctx, m.ContainerIP)
	switch {
	case err == nil:
		found = &c
	case errors.Is(err, dockerapi.ErrNotFound):
		log.Warn("no container found for the container IP; naming the service after the IP", "err", err)
	default:
		log.Warn("docker API unavailable; naming the service after the container IP", "err", err)
	}
	service, err := labels.Describe(found, m.ContainerIP)
	if err != nil {
		return registry.Service{}, fmt.Errorf("container %s: %w", c.Name, err)
	}
	if m.Proto != mapping.TCP || proxiesItself {
		service.Mode = registry.ModeProxiedByShim
	}
	return service, nil
}

func (s *Server) confirm(ctx context.Context, expected []registry.Expected) error {
	if len(expected) == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, s.ReadyTimeout)
	defer cancel()
	return s.Confirmer.Wait(ctx, expected)
}

// confirmInBackground waits for Envoy to take a port its shim serves meanwhile, says so in the
// log, and tells the shim if it asked (Open.WantsServed).
func (s *Server) confirmInBackground(sess session, expected []registry.Expected, tell bool, tn turn, log *slog.Logger) {
	ctx := sess.Context()
	start := time.Now()
	if err := s.confirm(ctx, expected); err != nil {
		if ctx.Err() == nil {
			log.Warn("Envoy has not taken the port; its shim keeps serving it without Envoy's metrics, logs and traces", "err", err)
		}
		return
	}
	log.Debug("Envoy serves the port", "envoy_us", time.Since(start).Microseconds())
	if tell && s.servedTurn(ctx, tn) {
		if err := sess.Served(); err != nil && ctx.Err() == nil {
			log.Debug("telling the shim Envoy serves the port", "err", err)
		}
	}
}

// turn is what servedTurn needs to know of a registration: when it opened, and whether it came
// after a pause (servedQuiet without one).
type turn struct {
	opened int64 // Unix nanoseconds
	lone   bool
}

// alone reports whether the registration came after a pause and none has come since: a lone
// docker run's, or the first of a range that has not gone on yet. It need not wait for a pause,
// and so its port is steered to Envoy before the first requests after docker run.
func (s *Server) alone(tn turn) bool { return tn.lone && s.lastOpen.Load() == tn.opened }

// servedTurn waits until a Served may go: registrations have paused for servedQuiet (unless this
// one is alone), and this is the next of the Served paced servedEvery apart; false if ctx ended.
func (s *Server) servedTurn(ctx context.Context, tn turn) bool {
	for {
		if left := servedQuiet - s.sinceLastOpen(); left > 0 && !s.alone(tn) {
			if !wait.Sleep(ctx, left) {
				return false
			}
			continue
		}
		s.servedMu.Lock()
		at := time.Now()
		if s.nextServed.After(at) {
			at = s.nextServed
		}
		s.nextServed = at.Add(servedEvery)
		s.servedMu.Unlock()
		if !wait.Sleep(ctx, time.Until(at)) {
			return false
		}
		if s.sinceLastOpen() >= servedQuiet || s.alone(tn) {
			return true // still paused: a new burst of registrations puts the rest back
		}
	}
}

// sinceLastOpen is how long ago the latest registration opened.
func (s *Server) sinceLastOpen() time.Duration { return time.Since(time.Unix(0, s.lastOpen.Load())) }

// removalWait bounds how long a deregistering shim is kept waiting for Envoy.
const removalWait = 300 * time.Millisecond

func (s *Server) confirmRemoved(ctx context.Context, withdrawn []registry.Expected, log *slog.Logger) {
	if len(withdrawn) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, removalWait)
	defer cancel()
	if err := s.Confirmer.Wait(ctx, withdrawn); err != nil {
		log.Debug("envoy did not confirm the removal in time", "err", err)
	}
}

func (s *Server) fail(sess session, reason string) {
	s.Metrics.results.WithLabelValues("failed").Inc()
	_ = sess.Fail(reason)
}

// Reason turns a failure into what `docker run` should print. A port Envoy cannot bind reads
// exactly as docker-proxy's own error, so scripts and people that know it keep working.
func Reason(m mapping.Mapping, err error) string {
	var rejected *xds.RejectedError
	if errors.As(err, &rejected) {
		if strings.Contains(strings.ToLower(rejected.Reason), "address already in use") {
			family := "tcp4"
			if m.HostIP.Is6() && !m.HostIP.Is4In6() {
				family = "tcp6"
			}
			return fmt.Sprintf("listen %s %s: bind: address already in use (envoy: %s)",
				family, netip.AddrPortFrom(m.HostIP.Unmap(), m.HostPort), rejected.Reason)
		}
		return rejected.Error()
	}
	return err.Error()
}

// List returns every live registration.
func (s *Server) List(context.Context, *pb.ListRequest) (*pb.ListResponse, error) {
	entries := s.Registry.List()
	out := &pb.ListResponse{Registrations: make([]*pb.Registration, 0, len(entries))}
	for _, e := range entries {
		out.Registrations = append(out.Registrations, ToProto(e))
	}
	return out, nil
}

func shimLevel(level string) slog.Level {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return slog.LevelInfo
	}
	return l
}
