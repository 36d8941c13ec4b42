// Command envoy-docker-shim replaces Docker's docker-proxy (dockerd --userland-proxy-path). dockerd
// starts one per published port and address family; the shim registers the port with
// envoy-docker-server, which has Envoy serve it, and holds the registration until dockerd stops it.
//
// This file is the whole contract with dockerd (docs/docker-proxy-contract.md at the top of the
// repository):
//   - argv: -proto -host-ip -host-port -container-ip -container-port [-use-listen-fd], -version;
//     unknown flags are logged and ignored (package proxyargs);
//   - fd 3: "0\n" once traffic reaches the container, else "1\n<reason>", within EDS_SHIM_TIMEOUT
//     (package statuspipe);
//   - fd 4, only with -use-listen-fd: the host socket dockerd bound (packages handover, udpproxy);
//   - SIGINT and SIGTERM: deregister and exit 0 within a second.
//
// TCP goes to Envoy. UDP the shim proxies itself, as docker-proxy does, and registers only to be
// listed. SCTP is refused or handed to a stock docker-proxy (package sctp).
package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/shim/logging"

	"github.com/oklog/run"

	"github.com/envoy-docker-shim/envoy-docker-shim/internal/buildinfo"
	"github.com/envoy-docker-shim/envoy-docker-shim/internal/mapping"
	"github.com/envoy-docker-shim/envoy-docker-shim/internal/shimlink"
	"github.com/envoy-docker-shim/envoy-docker-shim/internal/wait"
	"github.com/envoy-docker-shim/envoy-docker-shim/shim/config"
	"github.com/envoy-docker-shim/envoy-docker-shim/shim/handover"
	"github.com/envoy-docker-shim/envoy-docker-shim/shim/idle"
	"github.com/envoy-docker-shim/envoy-docker-shim/shim/proxyargs"
	"github.com/envoy-docker-shim/envoy-docker-shim/shim/registration"
	"github.com/envoy-docker-shim/envoy-docker-shim/shim/sctp"
	"github.com/envoy-docker-shim/envoy-docker-shim/shim/statuspipe"
	"github.com/envoy-docker-shim/envoy-docker-shim/shim/udpproxy"
)

// listenFD is where dockerd 28+ passes the host socket with -use-listen-fd.
const listenFD = 4

// stopWithin bounds the exit after SIGINT/SIGTERM: dockerd waits for its proxy without a timeout.
const stopWithin = 900 * time.Millisecond

func main() {
	start := time.Now()
	if ns, err := strconv.ParseInt(os.Getenv(idle.StartedEnv), 10, 64); err == nil {
		start = time.Unix(0, ns)
	}
	// From the start, so that a stop signal at any moment means "exit 0" (and not death by signal).
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, os.Interrupt, syscall.SIGTERM)
	if idle.Supported() {
		stops = idle.WatchStops()
	}
	args, argsErr := proxyargs.Parse(os.Args[1:])
	// Run again by the idle program (package idle): fd 3 is the registration, not dockerd's pipe.
	if held, resumed, err := idle.Resumed(); resumed {
		os.Exit(resume(held, err, args, signals))
	}
	// A TCP shim that goes idle once ready sheds the Go runtime then; the others hold in Go, on
	// one P. SCTP may exec docker-proxy, which keeps its own default.
	if args.Mapping.Proto == mapping.UDP || (args.Mapping.Proto == mapping.TCP && !idle.Supported()) {
		oneProcessor(start)
	}
	status, pipeErr := statuspipe.Inherited() // before anything can open a file as fd 3
	os.Exit(shim(start, status, pipeErr, args, argsErr, signals))
}

// oneProcessor restarts the shim, in the same process, with GOMAXPROCS=1 unless the environment
// already sets it. It is for the shims that stay in Go once ready: UDP, and TCP where there is no
// idle program (package idle) to hold the registration. A TCP shim only holds its registration (Envoy carries the traffic; the shim
// proxies for some milliseconds during an fd-4 handover) and a UDP shim's proxy is one reading
// goroutine plus one per flow, I/O-bound: one P serves both (BenchmarkUDPVsDockerProxy measures
// UDP round trips at least as fast as docker-proxy's), and spares every idle shim the second P's
// threads and caches, about 200 KiB, what puts its memory at docker-proxy's. The runtime fixes its
// P count at start-up; runtime.GOMAXPROCS called later leaves the second P's memory behind about
// half the time (measured), hence the exec. It runs before the shim touches fd 3 or fd 4, keeps
// the PID dockerd waits for, and if it fails the shim simply goes on with every P.
func oneProcessor(start time.Time) {
	if _, set := os.LookupEnv("GOMAXPROCS"); set {
		return
	}
	_ = syscall.Exec("/proc/self/exe", os.Args, append(os.Environ(), "GOMAXPROCS=1", idle.StartedEnv+"="+strconv.FormatInt(start.UnixNano(), 10)))
}

func shim(start time.Time, status *statuspipe.Pipe, pipeErr error, args proxyargs.Result, err error, signals chan os.Signal) int {
	switch {
	case args.Help:
		fmt.Print(proxyargs.Usage)
		return 0
	case args.Version:
		fmt.Printf("envoy-docker-shim version %s\n", buildinfo.String())
		return 0
	case err != nil:
		return fail(status, nil, 2, err)
	}
	m := args.Mapping
	cfg, err := config.Load()
	if err != nil {
		return fail(status, nil, 1, err)
	}
	if m.Proto == mapping.SCTP {
		if cfg.SCTPProxy == "" {
			return fail(status, nil, 1, errors.New(sctp.Refusal))
		}
		fds := []int{statuspipe.FD}
		if args.UseListenFD {
			fds = append(fds, listenFD)
		}
		return fail(status, nil, 1, sctp.Delegate(cfg.SCTPProxy, os.Args[1:], fds...))
	}

	relay := logging.NewRelay(64)
	log := logging.New(relay, "mapping", m.String(), "pid", os.Getpid())
	defer log.Close(100 * time.Millisecond)
	if pipeErr != nil {
		log.Warn("no status pipe on fd 3; was the shim started by dockerd?")
	}
	for _, a := range args.Ignored {
		log.Warn("ignoring an argument this version does not know", "arg", a)
	}
	// While Envoy serves the port and no connection runs through the shim, a TCP shim only holds
	// its registration and the port's socket: it goes idle (package idle). idleReady says when.
	idleReady := make(chan struct{})
	var lis *handover.Listener
	open := registration.NewOpen(m, m.Proto == mapping.UDP)
	// A TCP shim serves the port's socket itself from the start: the server answers once the
	// registration is valid, and Envoy takes the port over in the background (package handover).
	open.Serving = m.Proto == mapping.TCP
	// It asks to hear when Envoy has the port (Served): still in Go, it then steers at once; gone
	// idle unsteered (Envoy took longer than unsteeredIdleAfter), it is woken to steer, rather
	// than leaving the port's first connection to the shim, outside Envoy's stats.
	open.WantsServed = open.Serving
	regOpts := registration.Options{
		Socket: cfg.ShimSocket, Open: open, Log: log, Relay: relay,
		Idle: idler(m.Proto, func() *handover.Listener { return lis }, log), IdleReady: idleReady,
	}
	if m.Proto == mapping.TCP {
		regOpts.Served = func() { lis.Acknowledged() } // lis is set before Register starts reading
	}
	reg := registration.New(regOpts)
	deadline := start.Add(cfg.Timeout - 250*time.Millisecond) // leaves time to write the reason, even on a loaded host

	var g run.Group
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	g.Add(func() error {
		select {
		case sig := <-signals:
			log.Info("stopping", "signal", sig.String())
			time.AfterFunc(stopWithin, func() { os.Exit(0) }) // whatever else is stuck, exit 0 soon
			return run.SignalError{Signal: sig}
		case <-ctx.Done():
			return nil
		}
	}, func(error) { cancel() })

	switch m.Proto {
	case mapping.TCP:
		// The port's host socket stays with the shim for the port's life: it serves what reaches it
		// while Envoy gets ready and whenever Envoy is away (package handover).
		ready := make(chan struct{})
		if args.UseListenFD {
			lis, err = handover.Adopt(os.NewFile(listenFD, "listen-sock"), m.Host(), m.Container(), log)
		} else {
			lis, err = handover.Listen(m.Host(), m.Container(), log)
		}
		if err != nil {
			return fail(status, log, 1, err)
		}
		servePort(ctx, cancel, &g, lis, ready, idleReady, log)
		g.Add(func() error {
			rctx, rcancel := context.WithDeadline(ctx, deadline)
			answer, err := reg.Register(rctx)
			rcancel()
			if err != nil {
				if ctx.Err() != nil {
					status.Fail(idle.StoppedBeforeReady)
					return nil
				}
				return registrationFailed{err}
			}
			lis.SetRetryWindow(answer.ConnectRetryWindow)
			status.Ready()
			log.Info("port ready: the shim serves it until Envoy takes it over", "took", time.Since(start).Round(time.Millisecond))
			close(ready)
			return reg.Hold(ctx)
		}, func(error) { cancel() })

	case mapping.UDP:
		// docker-proxy's semantics, with or without the server: bind (or take fd 4), then ready.
		var conn *net.UDPConn
		if args.UseListenFD {
			conn, err = udpproxy.File(os.NewFile(listenFD, "listen-sock"), m.Host())
		} else {
			conn, err = udpproxy.Listen(m.Host())
		}
		if err != nil {
			return fail(status, log, 1, err)
		}
		p, err := udpproxy.New(conn, m.Container(), log)
		if err != nil {
			conn.Close()
			return fail(status, log, 1, err)
		}
		// The server learns the port's traffic from the shim alone: Envoy never sees it.
		regOpts.Stats = func() shimlink.Stats { return linkStats(p.Stats()) }
		reg = registration.New(regOpts)
		status.Ready()
		log.Info("port ready: the shim proxies UDP", "took", time.Since(start).Round(time.Millisecond))
		g.Add(p.Run, func(error) { p.Close() })
		g.Add(func() error { return reg.Hold(ctx) }, func(error) { cancel() })
	}

	err = g.Run()
	var rf registrationFailed
	var sig run.SignalError
	switch {
	case errors.As(err, &rf):
		return fail(status, log, 1, rf.err)
	case err == nil || errors.As(err, &sig):
		log.Info("stopped", "reason", err)
		return 0
	}
	log.Error("stopped", "err", err)
	return 1
}

// servePort adds to g what a TCP shim does with the port's host socket: serve what reaches it,
// steer the port's new connections to Envoy once registered (ready closed), and, while Envoy
// serves the port and no connection runs through the shim, offer the process to the idle
// program (on idleReady).
func servePort(ctx context.Context, cancel func(), g *run.Group, lis *handover.Listener, ready <-chan struct{}, idleReady chan<- struct{}, log *logging.Logger) {
	g.Add(func() error {
		if err := lis.Serve(); err != nil {
			return err
		}
		<-ctx.Done()
		return nil
	}, func(error) { cancel(); lis.Close() })
	g.Add(func() error {
		select {
		case <-ready:
			if err := lis.Steer(ctx); err != nil && ctx.Err() == nil {
				log.Warn("steering the port to Envoy stopped; the shim keeps serving it", "err", err)
			}
		case <-ctx.Done():
		}
		<-ctx.Done()
		return nil
	}, func(error) { cancel() })
	if !idle.Supported() {
		return
	}
	g.Add(func() error {
		offerIdle(ctx, lis, idleReady)
		return nil
	}, func(error) { cancel() })
}

// Pauses of offerIdle: between looks at the port, and after an offer the process survived (the
// idle program could not take it, or something woke it at once).
const (
	idleLookMin, idleLookMax   = 10 * time.Millisecond, time.Second
	idleRetryMin, idleRetryMax = time.Second, 30 * time.Second
)

// unsteeredIdleAfter is how long a shim whose port Envoy does not serve (yet, or any more) waits
// with no connection before it goes idle all the same: the idle program wakes it for the next
// connection that reaches its socket, and the shim, running again, serves it and steers the port
// to Envoy if Envoy's sockets are there by then. A port range's shims, which dockerd starts one
// after another while Envoy takes the ports over in batches, so never pile up as hundreds of live
// Go processes competing with dockerd for the CPUs.
const unsteeredIdleAfter = 250 * time.Millisecond

// offerIdle offers the process to the idle program whenever no connection runs through the shim
// and either Envoy's sockets take the port's new connections or none has reached the shim for
// unsteeredIdleAfter (and the server's Served is not being acted on), until ctx ends or the idle
// program cannot run here.
func offerIdle(ctx context.Context, lis *handover.Listener, idleReady chan<- struct{}) {
	retry := idleRetryMin
	for look := idleLookMin; ; {
		if lis.Active() > 0 || lis.Acknowledging() || (lis.Steered() == 0 && lis.Quiet() < unsteeredIdleAfter) {
			if !wait.Sleep(ctx, look) {
				return
			}
			look = min(2*look, idleLookMax)
			continue
		}
		select {
		case idleReady <- struct{}{}:
		case <-ctx.Done():
			return
		}
		// Still here: the idle program did not take the process.
		if idleBroken.Load() || !wait.Sleep(ctx, retry) {
			return
		}
		retry = min(2*retry, idleRetryMax)
		look = idleLookMin
	}
}

// stops is what the idle program's Enter learns stop signals from.
var stops idle.Stops

// idleBroken says the idle program cannot run here (no memfd exec, say): stop offering.
var idleBroken atomic.Bool

// idler is the registration's Idle hook: TCP shims hand their process, with the port's socket,
// over to the idle program, with the environment they are to resume with (one P).
func idler(proto mapping.Protocol, port func() *handover.Listener, log *logging.Logger) func(context.Context, *net.UnixConn) error {
	if proto != mapping.TCP || !idle.Supported() {
		return nil
	}
	return func(ctx context.Context, conn *net.UnixConn) error {
		log.Debug("going idle: the registration and the port's socket are held without the Go runtime")
		env := os.Environ()
		if _, set := os.LookupEnv("GOMAXPROCS"); !set {
			env = append(env, "GOMAXPROCS=1")
		}
		var err error
		if l := port(); l != nil {
			env = append(env, idle.RetryWindowEnv+"="+l.RetryWindow().String())
			// Nothing may be accepted from here to the exec: it would be cut.
			err = l.Quiesce(ctx, func() error { return idle.Enter(ctx, conn, l.Socket(), env, stops) })
		} else {
			err = idle.Enter(ctx, conn, nil, env, stops)
		}
		if err != nil && !errors.Is(err, idle.ErrBusy) && !errors.Is(err, idle.ErrStopping) &&
			!errors.Is(err, handover.ErrActive) && ctx.Err() == nil {
			idleBroken.Store(true)
		}
		return err
	}
}

// resume takes back what the idle program held, after it ran the shim again because something
// happened: the registration (Hold re-registers if the server went away) and the port's socket
// (a connection reached it: Envoy went away; the shim serves the port until Envoy is back). It
// goes idle again as soon as it can. Stop signals are handled as ever.
func resume(held idle.Held, err error, args proxyargs.Result, signals chan os.Signal) int {
	relay := logging.NewRelay(64)
	m := args.Mapping
	log := logging.New(relay, "mapping", m.String(), "pid", os.Getpid())
	defer log.Close(100 * time.Millisecond)
	if err != nil {
		log.Error("resuming after idle", "err", err)
		return 1
	}
	cfg, err := config.Load()
	if err != nil {
		log.Error("resuming after idle", "err", err)
		return 1
	}
	var lis *handover.Listener
	if held.Listener != nil {
		if lis, err = handover.Adopt(held.Listener, m.Host(), m.Container(), log); err != nil {
			log.Error("resuming after idle: the port's socket", "err", err)
			return 1
		}
		if d, err := time.ParseDuration(os.Getenv(idle.RetryWindowEnv)); err == nil {
			lis.SetRetryWindow(d)
		}
		os.Unsetenv(idle.RetryWindowEnv)
	}
	idleReady := make(chan struct{})
	opts := registration.Options{
		Socket: cfg.ShimSocket, Open: registration.NewOpen(m, false), Log: log, Relay: relay,
		Idle: idler(m.Proto, func() *handover.Listener { return lis }, log), IdleReady: idleReady,
	}
	if lis != nil {
		// Most often the server's Served is what woke the idle program: Envoy listens on the
		// port, and the shim steers to it at once (handover.Listener.Acknowledged).
		opts.Served = lis.Acknowledged
	}
	reg := registration.New(opts)
	reg.Adopt(shimlink.NewConn(held.Registration))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var g run.Group
	g.Add(func() error {
		select {
		case sig := <-signals:
			log.Info("stopping", "signal", sig.String())
			time.AfterFunc(stopWithin, func() { os.Exit(0) })
			return nil
		case <-ctx.Done():
			return nil
		}
	}, func(error) { cancel() })
	if lis != nil {
		registered := make(chan struct{})
		close(registered)
		servePort(ctx, cancel, &g, lis, registered, idleReady, log)
	}
	g.Add(func() error { return reg.Hold(ctx) }, func(error) { cancel() })
	_ = g.Run()
	log.Info("stopped")
	return 0
}

func linkStats(s udpproxy.Stats) shimlink.Stats {
	return shimlink.Stats{InDatagrams: s.InDatagrams, InBytes: s.InBytes, OutDatagrams: s.OutDatagrams,
		OutBytes: s.OutBytes, Flows: uint64(s.Flows), FlowsTotal: s.FlowsTotal}
}

type registrationFailed struct{ err error }

func (e registrationFailed) Error() string { return e.err.Error() }

// fail reports err to dockerd (if it still waits for a status) and to the logs, and returns code.
func fail(status *statuspipe.Pipe, log *logging.Logger, code int, err error) int {
	if status.Sent() == "" {
		status.Fail(err.Error())
	}
	if log != nil {
		log.Error("failed", "err", err)
	} else {
		fmt.Fprintln(os.Stderr, "envoy-docker-shim:", err)
	}
	return code
}
