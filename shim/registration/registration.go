// Package registration is the shim's side of its registration with envoy-docker-server, over the
// link of package shimlink: the shim sends Open with its mapping, the server answers Ready once
// the registration is valid (and, unless the shim serves the port itself, once Envoy serves it) or
// Failed with a reason for the user, and the connection stays open for the shim's whole life; its
// end is the deregistration.
//
// The client owns that connection: it registers (bounded by the caller's deadline), holds the
// registration, and when the server goes away it re-registers with backoff until the server is
// back, without touching the port (Envoy keeps serving it meanwhile). It forwards the shim's log
// lines on the stream, and the counters of a port the shim proxies itself. It never writes to fd 3 and never decides what the shim tells dockerd:
// its errors are messages the caller can show.
package registration

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/internal/buildinfo"
	"github.com/envoy-docker-shim/envoy-docker-shim/internal/mapping"
	"github.com/envoy-docker-shim/envoy-docker-shim/internal/shimlink"
	"github.com/envoy-docker-shim/envoy-docker-shim/shim/logging"
)

// Timings. Each is a bound, not a delay: the happy path never waits for them.
const (
	// unavailableRetry is how long the first registration retries a server that is not there,
	// to ride out a server restart. Beyond it the shim reports the server as not running.
	unavailableRetry = time.Second
	// deregisterWait bounds waiting for the server to confirm a deregistration on shutdown; the
	// shim must exit within 1 s of SIGINT even when the server is gone.
	deregisterWait = 400 * time.Millisecond
	// reregisterTimeout bounds one re-registration attempt after the server went away.
	reregisterTimeout = 10 * time.Second
	backoffMin        = 100 * time.Millisecond
	backoffMax        = 5 * time.Second
	// DefaultStatsEvery is how often a shim reports its counters, while they change.
	DefaultStatsEvery = 5 * time.Second
)

// Options configure a Client.
type Options struct {
	// Socket is the server's Unix socket.
	Socket string
	// Open is what the shim registers.
	Open shimlink.Open
	// Log receives the client's own records.
	Log *logging.Logger
	// Relay, if not nil, holds log lines to forward to the server.
	Relay *logging.Relay
	// Idle, if not nil, is offered the live registration each time IdleReady delivers (the
	// caller's word that the shim has nothing else to do) while Hold holds it: it may take the
	// process over with the registration's connection (package idle), and returns only when it
	// could not. The shim then goes on holding the registration in Go.
	Idle      func(ctx context.Context, conn *net.UnixConn) error
	IdleReady <-chan struct{}
	// Stats, if not nil, are the counters of the traffic the shim carries itself (UDP). They are
	// sent when a registration opens, every StatsEvery while they change, and when it ends, to a
	// server that asks for them in its Ready.
	Stats func() shimlink.Stats
	// StatsEvery defaults to DefaultStatsEvery.
	StatsEvery time.Duration
	// Served, if not nil, is called when the server says Envoy has taken the port over (the
	// Served a shim gets when its Open asked for it): from the goroutine reading the
	// registration, so it must not block.
	Served func()
}

// Client holds one registration. Register, then Hold, from one goroutine.
type Client struct {
	opts Options
	cur  *session
}

// New returns a client; it does not connect.
func New(opts Options) *Client { return &Client{opts: opts} }

// Register opens the registration and waits for the server's answer until ctx ends. On Ready it
// returns what the server said of the port; the registration stays open for Hold. Errors are fit
// for the user: a *shimlink.Failed with the server's reason, or a message naming the socket when
// the server cannot be reached.
func (c *Client) Register(ctx context.Context) (*shimlink.Ready, error) {
	start := time.Now()
	for wait := backoffMin; ; wait = min(2*wait, 400*time.Millisecond) {
		var s *session
		var err error
		if _, serr := os.Stat(c.opts.Socket); serr != nil {
			err = serr // no socket (yet): no point in dialling
		} else {
			s, err = c.open(ctx, c.opts.Open)
		}
		if err == nil {
			c.cur = s
			return s.ready, nil
		}
		var failed *shimlink.Failed
		if errors.As(err, &failed) || ctx.Err() != nil || time.Since(start)+wait > unavailableRetry {
			return nil, c.explain(ctx, err)
		}
		c.opts.Log.Debug("registration attempt failed; retrying", "err", err)
		select {
		case <-ctx.Done():
			return nil, c.explain(ctx, err)
		case <-time.After(wait):
		}
	}
}

// Hold keeps the registration until ctx ends, then deregisters (waiting a bounded time for the
// server to confirm) and returns nil. Without a live registration (after a failed Register, or
// never registered, as for UDP) it keeps trying. When the server goes away it re-registers with
// backoff; Failed answers are logged and retried, since dockerd will not restart the shim.
func (c *Client) Hold(ctx context.Context) error {
	attempt := 0
	var idle <-chan struct{}
	if c.opts.Idle != nil {
		idle = c.opts.IdleReady
	}
	for {
		if c.cur == nil {
			s, err := c.reopen(ctx, &attempt)
			if err != nil {
				return nil // ctx ended
			}
			c.cur = s
		}
		select {
		case <-ctx.Done():
			c.cur.deregister()
			c.cur = nil
			return nil
		case <-c.cur.done:
			c.opts.Log.Warn("registration lost; re-registering", "err", c.cur.endErr)
			c.cur.close()
			c.cur = nil
		case <-idle:
			c.flushLogs()
			if err := c.opts.Idle(ctx, c.cur.conn.Unix()); err != nil && ctx.Err() == nil {
				c.opts.Log.Info("holding the registration in Go", "why", err)
			}
		}
	}
}

// flushLogs gives the log lines still queued a moment to reach the server before Idle.
func (c *Client) flushLogs() {
	if c.opts.Relay == nil {
		return
	}
	for deadline := time.Now().Add(20 * time.Millisecond); c.opts.Relay.Pending() > 0 && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
	}
}

// Adopt takes conn as a live registration (the one the idle shim held, package idle) for Hold.
func (c *Client) Adopt(conn *shimlink.Conn) {
	c.cur = c.newSession(conn, &shimlink.Ready{})
}

// reopen tries until a registration is Ready or ctx ends.
func (c *Client) reopen(ctx context.Context, attempt *int) (*session, error) {
	for {
		if *attempt > 0 {
			wait := min(backoffMin<<min(*attempt-1, 10), backoffMax)
			wait = time.Duration(float64(wait) * (0.8 + 0.4*rand.Float64()))
			select {
			case <-ctx.Done():
				return nil, ctx.Err()
			case <-time.After(wait):
			}
		}
		*attempt++
		actx, cancel := context.WithTimeout(ctx, reregisterTimeout)
		open := c.opts.Open
		open.Serving = true // Hold only runs once the port is served (TCP: ready; UDP: the shim's own)
		s, err := c.open(actx, open)
		cancel()
		if err == nil {
			c.opts.Log.Info("registered", "attempt", *attempt, "service", s.ready.Service, "listener", s.ready.Listener)
			*attempt = 0
			return s, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		// While the server is away this repeats every few seconds: warn now and then, not each time.
		level := logging.LevelDebug
		if *attempt == 1 || *attempt%12 == 0 {
			level = logging.LevelWarn
		}
		c.opts.Log.Log(level, "registration attempt failed", "attempt", *attempt, "err", c.explain(actx, err))
	}
}

// explain turns a connection error into a message for the user, naming the socket.
func (c *Client) explain(ctx context.Context, err error) error {
	var failed *shimlink.Failed
	if errors.As(err, &failed) {
		return err
	}
	sock := c.opts.Socket
	if _, serr := os.Stat(sock); errors.Is(serr, os.ErrNotExist) {
		return fmt.Errorf("envoy-docker-server is not running: its socket %s does not exist (start the server, or set EDS_SHIM_SOCKET in dockerd's environment if it listens elsewhere)", sock)
	}
	switch {
	case errors.Is(err, context.DeadlineExceeded) || errors.Is(ctx.Err(), context.DeadlineExceeded):
		return fmt.Errorf("envoy-docker-server (socket %s) did not answer within the shim's start-up time (EDS_SHIM_TIMEOUT)", sock)
	case errors.Is(err, context.Canceled):
		return errors.New("registration cancelled: the shim is stopping")
	case errors.Is(err, syscall.ECONNREFUSED):
		return fmt.Errorf("envoy-docker-server is not running: nothing accepts connections on its socket %s", sock)
	case errors.Is(err, syscall.EACCES):
		return fmt.Errorf("cannot connect to envoy-docker-server: permission denied on its socket %s", sock)
	case errors.Is(err, syscall.EPROTOTYPE):
		return fmt.Errorf("%s is not envoy-docker-server's shim socket (it is another kind of socket): check EDS_SHIM_SOCKET in dockerd's environment", sock)
	case errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE):
		return fmt.Errorf("envoy-docker-server (socket %s) ended the registration without an answer", sock)
	}
	return fmt.Errorf("cannot register with envoy-docker-server (socket %s): %v", sock, err)
}

// session is one registration's connection.
type session struct {
	conn  *shimlink.Conn
	ready *shimlink.Ready
	// done is closed once the server ended the connection; endErr then says why.
	done   chan struct{}
	endErr error
	served func()

	stopLogs chan struct{}
	logsDone chan struct{}
	once     sync.Once
}

func (c *Client) open(ctx context.Context, open shimlink.Open) (*session, error) {
	conn, err := shimlink.Dial(c.opts.Socket)
	if err != nil {
		return nil, err
	}
	// Until Ready, the caller's ctx bounds everything; afterwards the connection lives on its own.
	detach := context.AfterFunc(ctx, func() { conn.Close() })
	ready, err := start(conn, open)
	if !detach() {
		err = ctx.Err() // ctx ended while waiting, or just as Ready arrived: the connection is closed
	}
	if err != nil {
		conn.Close()
		return nil, err
	}
	return c.newSession(conn, ready), nil
}

func (c *Client) newSession(conn *shimlink.Conn, ready *shimlink.Ready) *session {
	s := &session{conn: conn, ready: ready, done: make(chan struct{}), served: c.opts.Served, stopLogs: make(chan struct{}), logsDone: make(chan struct{})}
	go s.watch()
	stats := c.opts.Stats
	if !ready.WantsStats {
		stats = nil // a server of an earlier release, which would end the registration
	}
	go s.send(c.opts.Relay, stats, cmp.Or(c.opts.StatsEvery, DefaultStatsEvery))
	return s
}

// start sends Open and reads the answer.
func start(conn *shimlink.Conn, open shimlink.Open) (*shimlink.Ready, error) {
	if err := conn.Send(&open); err != nil {
		return nil, err
	}
	msg, err := conn.Recv()
	if err != nil {
		return nil, err
	}
	switch m := msg.(type) {
	case *shimlink.Ready:
		return m, nil
	case *shimlink.Failed:
		return nil, m
	}
	return nil, fmt.Errorf("envoy-docker-server answered Open with %T", msg)
}

// watch reads until the server ends the connection: after Ready it sends nothing until then but
// perhaps Served, and perhaps a Failed saying why it ends it.
func (s *session) watch() {
	defer close(s.done)
	for {
		msg, err := s.conn.Recv()
		if err != nil {
			if s.endErr == nil {
				s.endErr = err
			}
			return
		}
		switch m := msg.(type) {
		case *shimlink.Failed:
			s.endErr = m
		case *shimlink.Served:
			if s.served != nil {
				s.served()
			}
		}
	}
}

// send forwards log lines and counters; it is the only sender after Open. Counters go out at
// once (a re-registration tells a restarted server everything so far), then every period while
// they change, and a last time when the registration ends.
func (s *session) send(out *logging.Relay, stats func() shimlink.Stats, period time.Duration) {
	defer close(s.logsDone)
	var lines <-chan logging.Line
	if out != nil {
		lines = out.Lines()
	}
	var tick <-chan time.Time
	var sent shimlink.Stats
	sendStats := func(always bool) error {
		if stats == nil {
			return nil
		}
		now := stats()
		if now == sent && !always {
			return nil
		}
		sent = now
		return s.conn.Send(&now)
	}
	if stats != nil {
		t := time.NewTicker(period)
		defer t.Stop()
		tick = t.C
		if sendStats(true) != nil {
			<-s.stopLogs
			return
		}
	}
	send := func(l logging.Line) error {
		return s.conn.Send(&shimlink.Log{Level: l.Level.String(), Message: l.Message})
	}
	for {
		var err error
		select {
		case l := <-lines:
			err = send(l)
		case <-tick:
			err = sendStats(false)
		case <-s.done:
			<-s.stopLogs
			return
		case <-s.stopLogs:
			for { // flush what is queued, without waiting for more, then the last counters
				select {
				case l := <-lines:
					if send(l) != nil {
						return
					}
				default:
					_ = sendStats(false)
					return
				}
			}
		}
		if err != nil {
			<-s.stopLogs
			return
		}
	}
}

// deregister ends the registration: end our side, wait (bounded) for the server to close once
// Envoy let go of the port, then tear down.
func (s *session) deregister() {
	deadline := time.After(deregisterWait)
	s.once.Do(func() { close(s.stopLogs) })
	select {
	case <-s.logsDone:
		_ = s.conn.CloseWrite()
		select {
		case <-s.done:
		case <-deadline:
		}
	case <-deadline:
	}
	s.close()
}

func (s *session) close() {
	s.once.Do(func() { close(s.stopLogs) })
	s.conn.Close()
}

// NewOpen is the Open message for m from this process.
func NewOpen(m mapping.Mapping, proxiesItself bool) shimlink.Open {
	return shimlink.Open{Mapping: m, PID: os.Getpid(), Version: buildinfo.String(), ProxiesItself: proxiesItself}
}
