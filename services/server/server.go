package server

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/oklog/run"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/envoy-docker-shim/envoy-docker-shim/services/dockerapi"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/netfilter"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/registrar"
	pb "github.com/envoy-docker-shim/envoy-docker-shim/services/registration/registrationpb"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/registry"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/udpstats"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/xds"
)

var stderr = os.Stderr

// Server is one envoy-docker-server process.
type Server struct {
	cfg      Config
	log      *slog.Logger
	registry *registry.Registry
	cache    *xds.Cache
	tracker  *xds.Tracker
	metrics  *prometheus.Registry
	engine   dockerapi.Engine
	finder   *dockerapi.Finder
	udp      *udpstats.Store
	firewall *netfilter.Reconciler // nil without a table name or a Docker API
}

// New builds a server. engine is the Docker Engine API; nil connects to cfg.DockerHost, or to no
// Docker API at all when that is empty.
func New(cfg Config, log *slog.Logger, engine dockerapi.Engine) (*Server, error) {
	if engine == nil && cfg.DockerHost == "" {
		engine = dockerapi.Unavailable{}
	}
	if engine == nil {
		c, err := dockerapi.NewClient(cfg.DockerHost)
		if err != nil {
			return nil, err
		}
		engine = c
	}
	metrics := prometheus.NewRegistry()
	metrics.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	udp := udpstats.New()
	metrics.MustRegister(udp)
	xdsMetrics := xds.NewMetrics(metrics)
	tracker := xds.NewTracker(xdsMetrics)
	c, err := xds.NewCache(bootID(), cfg.EnvoyOptions(), xdsMetrics, tracker)
	if err != nil {
		return nil, fmt.Errorf("configuration: %s: %w", cfg.tracingVariables(), err)
	}
	var firewall *netfilter.Reconciler
	if _, noDocker := engine.(dockerapi.Unavailable); cfg.NftTable != "" && !noDocker {
		firewall = &netfilter.Reconciler{
			Docker:     engine,
			Table:      netfilter.Table{Name: cfg.NftTable},
			Sysctls:    netfilter.Sysctls{Dir: cfg.SysctlNet},
			Off:        !cfg.Netfilter,
			KeepOnStop: cfg.NftKeep,
			MarkDir:    filepath.Dir(cfg.Socket),
			Log:        log.With("component", "netfilter"),
			Metrics:    netfilter.NewMetrics(metrics),
		}
	}
	return &Server{
		firewall: firewall,
		cfg:      cfg,
		log:      log,
		registry: registry.New(c),
		cache:    c,
		tracker:  tracker,
		metrics:  metrics,
		engine:   engine,
		finder:   &dockerapi.Finder{Engine: engine, Timeout: cfg.DockerTimeout},
		udp:      udp,
	}, nil
}

// bootID makes every boot's cache versions unique.
func bootID() string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return fmt.Sprintf("%x-%s", time.Now().Unix(), hex.EncodeToString(b))
}

// Registry exposes the registry, for in-process tests and benchmarks.
func (s *Server) Registry() *registry.Registry { return s.registry }

// Run serves until ctx ends or one actor fails, then stops every actor.
func (s *Server) Run(ctx context.Context) error {
	registrationListener, err := listenUnix("unix", s.cfg.Socket)
	if err != nil {
		return err
	}
	shimSocket, err := listenUnix("unixpacket", s.cfg.ShimSocket)
	if err != nil {
		registrationListener.Close()
		return err
	}
	shimListener := shimSocket.(*net.UnixListener)
	xdsListener, err := net.Listen("tcp", s.cfg.XDSAddr)
	if err != nil {
		registrationListener.Close()
		shimListener.Close()
		return fmt.Errorf("xDS server on %s: %w", s.cfg.XDSAddr, err)
	}
	httpListener, err := net.Listen("tcp", s.cfg.HTTPAddr)
	if err != nil {
		registrationListener.Close()
		shimListener.Close()
		xdsListener.Close()
		return fmt.Errorf("HTTP server on %s: %w", s.cfg.HTTPAddr, err)
	}

	var g run.Group
	parent := ctx
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	xdsServer := grpc.NewServer(
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 5 * time.Second, PermitWithoutStream: true}),
		grpc.MaxConcurrentStreams(1000),
	)
	xds.Register(ctx, xdsServer, s.cache, s.tracker)
	g.Add(func() error {
		s.log.Info("xDS server listening", "addr", xdsListener.Addr().String())
		return xdsServer.Serve(xdsListener)
	}, func(error) { xdsServer.Stop() })

	registrations := grpc.NewServer()
	shims := &registrar.Server{
		Registry:           s.registry,
		Finder:             s.finder,
		Confirmer:          s.tracker,
		ReadyTimeout:       s.cfg.ReadyTimeout,
		Log:                s.log.With("component", "registrar"),
		Metrics:            registrar.NewMetrics(s.metrics, s.registry),
		UDP:                s.udp,
		ConnectRetryWindow: s.cfg.ConnectRetryWindow,
		OnRestored: func() {
			if !s.cache.IsOpen() {
				s.log.Info("resync done: answering envoy", "registrations", s.registry.Len())
				s.cache.Open()
			}
		},
	}
	pb.RegisterRegistrarServer(registrations, shims)
	g.Add(func() error {
		s.log.Info("shim socket listening", "socket", s.cfg.ShimSocket)
		return shims.ServeShims(shimListener)
	}, func(error) {
		xdsServer.Stop() // first: see below
		shimListener.Close()
		shims.CloseShims()
	})
	g.Add(func() error {
		s.log.Info("registration API listening", "socket", s.cfg.Socket)
		return registrations.Serve(registrationListener)
	}, func(error) {
		// Envoy must be cut off before the registration streams end: each ending stream
		// deregisters its port, and a stopping server must not tell Envoy to drop every port
		// it serves. Envoy keeps its configuration until the next server answers.
		xdsServer.Stop()
		registrations.Stop()
		os.Remove(s.cfg.Socket)
	})

	httpServer := &http.Server{Handler: s.httpHandler(), ReadHeaderTimeout: 5 * time.Second}
	g.Add(func() error {
		s.log.Info("HTTP endpoint listening", "addr", httpListener.Addr().String())
		if err := httpServer.Serve(httpListener); !errors.Is(err, http.ErrServerClosed) {
			return err
		}
		return nil
	}, func(error) {
		shutdownCtx, done := context.WithTimeout(context.Background(), 2*time.Second)
		defer done()
		_ = httpServer.Shutdown(shutdownCtx)
	})

	watcher := &dockerapi.Watcher{
		Engine: s.engine,
		Gone: func(id string) {
			s.finder.Forget(id)
			for _, e := range s.registry.RemoveContainer(id) {
				s.log.Info("container gone; mapping removed", "mapping", e.Key.String(), "container", id)
			}
		},
		OnError: func(err error) { s.log.Warn("docker event stream interrupted; reconnecting", "err", err) },
	}
	watchCtx, stopWatch := context.WithCancel(ctx)
	g.Add(func() error { return watcher.Run(watchCtx) }, func(error) { stopWatch() })

	if s.firewall != nil {
		fwCtx, stopFirewall := context.WithCancel(ctx)
		g.Add(func() error { return s.firewall.Run(fwCtx) }, func(error) { stopFirewall() })
	}

	// A restarted server must not tell Envoy to drop what it serves before the registry is
	// rebuilt: Envoy is answered once resync has run, or when the grace period ends.
	graceCtx, stopGrace := context.WithCancel(ctx)
	g.Add(func() error {
		select {
		case <-time.After(s.cfg.RestartGrace):
			if !s.cache.IsOpen() {
				s.log.Info("grace period over: answering envoy", "registrations", s.registry.Len())
				s.cache.Open()
			}
		case <-graceCtx.Done():
		}
		<-graceCtx.Done()
		return nil
	}, func(error) { stopGrace() })

	if s.cfg.TCPMigrateReq {
		if changed, err := (netfilter.Sysctls{Dir: s.cfg.SysctlNet}).EnableTCPMigrateReq(); err != nil {
			s.log.Warn("connections queued on a stopping Envoy may be reset", "err", err)
		} else if changed {
			s.log.Info("set net.ipv4.tcp_migrate_req=1: what a stopping Envoy had queued goes to the shims' sockets")
		}
	}

	// Ends the group on SIGINT or SIGTERM (docker stop, compose down), or when ctx is cancelled.
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(signals)
	g.Add(func() error {
		select {
		case sig := <-signals:
			s.log.Info("stopping", "signal", sig.String())
			return nil
		case <-ctx.Done():
			if parent.Err() != nil {
				s.log.Info("stopping", "reason", "context cancelled")
				return nil
			}
			return ctx.Err()
		}
	}, func(error) { cancel() })
	err = g.Run()
	if err == nil {
		s.log.Info("stopped")
	}
	return err
}

func (s *Server) httpHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		if !s.tracker.Connected() {
			http.Error(w, "envoy not connected", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(s.metrics, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /registrations", func(w http.ResponseWriter, r *http.Request) {
		list, _ := (&registrar.Server{Registry: s.registry}).List(r.Context(), nil)
		b, err := protojson.MarshalOptions{Multiline: true, EmitUnpopulated: true}.Marshal(list)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(b)
	})
	mux.HandleFunc("GET /ports", s.ports)
	return mux
}

// listenUnix listens on a root-only socket, replacing a stale socket file but never one a live
// server still answers on.
func listenUnix(network, path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("socket directory: %w", err)
	}
	if _, err := os.Stat(path); err == nil {
		if c, err := net.DialTimeout(network, path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("another envoy-docker-server is already serving %s: stop it first", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("remove stale socket %s: %w", path, err)
		}
	}
	l, err := net.Listen(network, path)
	if err != nil {
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("restrict socket %s: %w", path, err)
	}
	return l, nil
}
