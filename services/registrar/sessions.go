package registrar

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync/atomic"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/internal/shimlink"
	pb "github.com/envoy-docker-shim/envoy-docker-shim/services/registration/registrationpb"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/registry"
)

// ServeShim holds the registration a shim opens on conn, and closes conn when it ends.
func (s *Server) ServeShim(ctx context.Context, conn *shimlink.Conn) {
	sess := &linkSession{conn: conn, msgs: make(chan shimlink.Message), retryWindow: s.ConnectRetryWindow}
	sess.ctx, sess.cancel = context.WithCancel(ctx)
	defer func() {
		sess.cancel()
		conn.Close()
	}()
	s.serve(sess)
}

// linkSession is a registration on the shim link. After Open, a reader follows the connection,
// so that the session's context ends as soon as the shim goes away, even while nobody waits for
// its log lines.
type linkSession struct {
	conn   *shimlink.Conn
	ctx    context.Context
	cancel context.CancelFunc
	msgs   chan shimlink.Message // what the shim sends after Open: log lines and counters
	end    error                 // why the reader stopped; read after msgs is closed
	ready  atomic.Bool
	// retryWindow is the Server's ConnectRetryWindow, told the shim in Ready.
	retryWindow time.Duration
}

func (l *linkSession) Context() context.Context { return l.ctx }

func (l *linkSession) Open() (shimlink.Open, error) {
	msg, err := l.conn.Recv()
	if errors.Is(err, io.EOF) || (err != nil && l.ctx.Err() != nil) {
		return shimlink.Open{}, errShimGone
	}
	if err != nil {
		return shimlink.Open{}, fmt.Errorf("invalid registration: %w", err)
	}
	open, ok := msg.(*shimlink.Open)
	if !ok {
		return shimlink.Open{}, errors.New("the first message on a registration must be Open")
	}
	go l.read()
	return *open, nil
}

func (l *linkSession) read() {
	defer close(l.msgs)
	for {
		msg, err := l.conn.Recv()
		if err != nil {
			l.end = err
			// The end of the shim's side before Ready means it gave up: stop waiting for Envoy.
			// After Ready it is the deregistration, and the server still waits for Envoy to let
			// go of the port before it closes.
			if !errors.Is(err, io.EOF) || !l.ready.Load() {
				l.cancel()
			}
			return
		}
		switch msg.(type) {
		case *shimlink.Log, *shimlink.Stats:
			select {
			case l.msgs <- msg:
			case <-l.ctx.Done():
				l.end = l.ctx.Err()
				return
			}
		}
	}
}

func (l *linkSession) Ready(e registry.Entry) error {
	l.ready.Store(true)
	return l.conn.Send(&shimlink.Ready{
		Service: e.Service.Name, Mode: string(e.Mode), ContainerID: e.ContainerID,
		ContainerName: e.ContainerName, Listener: ToProto(e).GetListener(),
		WantsStats: e.Mode == registry.ModeProxiedByShim, ConnectRetryWindow: l.retryWindow,
	})
}

func (l *linkSession) Fail(reason string) error { return l.conn.Send(&shimlink.Failed{Reason: reason}) }

func (l *linkSession) Served() error { return l.conn.Send(&shimlink.Served{}) }

func (l *linkSession) Next() (shimlink.Message, error) {
	if msg, ok := <-l.msgs; ok {
		return msg, nil
	}
	return nil, l.end
}

// Register serves the gRPC registration of shims of earlier releases, which reconnect to an
// upgraded server until their containers restart with the new shim.
func (s *Server) Register(stream pb.Registrar_RegisterServer) error {
	s.serve(grpcSession{stream})
	return nil
}

type grpcSession struct{ stream pb.Registrar_RegisterServer }

func (g grpcSession) Context() context.Context { return g.stream.Context() }

func (g grpcSession) Open() (shimlink.Open, error) {
	first, err := g.stream.Recv()
	if err != nil {
		return shimlink.Open{}, errShimGone
	}
	open := first.GetOpen()
	if open == nil {
		return shimlink.Open{}, errors.New("the first message on a registration must be Open")
	}
	m, err := open.GetMapping().Parse()
	if err != nil {
		return shimlink.Open{}, fmt.Errorf("invalid mapping: %w", err)
	}
	shim := open.GetShim()
	return shimlink.Open{Mapping: m, PID: int(shim.GetPid()), Version: shim.GetVersion(),
		ProxiesItself: shim.GetProxiesItself(), Serving: shim.GetServing()}, nil
}

func (g grpcSession) Ready(e registry.Entry) error {
	return g.stream.Send(&pb.RegisterResponse{Response: &pb.RegisterResponse_Ready{Ready: &pb.Ready{Registration: ToProto(e)}}})
}

// Fail sends the reason in a message: the stream's end carries no status, so the user gets it.
// Served says nothing: shims that speak gRPC never ask for it.
func (g grpcSession) Served() error { return nil }

func (g grpcSession) Fail(reason string) error {
	return g.stream.Send(&pb.RegisterResponse{Response: &pb.RegisterResponse_Failed{Failed: &pb.Failed{Reason: reason}}})
}

// Next reads log lines only: shims of earlier releases report no counters.
func (g grpcSession) Next() (shimlink.Message, error) {
	for {
		msg, err := g.stream.Recv()
		if err != nil {
			return nil, err
		}
		if l := msg.GetLog(); l != nil {
			return &shimlink.Log{Level: l.GetLevel(), Message: l.GetMessage()}, nil
		}
	}
}

// ServeShims accepts shims on l, each on a goroutine of its own, until l is closed.
func (s *Server) ServeShims(l *net.UnixListener) error {
	for {
		uc, err := l.AcceptUnix()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("accept on the shim socket: %w", err)
		}
		conn := shimlink.NewConn(uc)
		s.linkMu.Lock()
		closing := s.closing
		if !closing {
			if s.live == nil {
				s.live = make(map[*shimlink.Conn]bool)
			}
			s.live[conn] = true
		}
		s.linkMu.Unlock()
		if closing {
			conn.Close()
			continue
		}
		go func() {
			s.ServeShim(context.Background(), conn)
			s.linkMu.Lock()
			delete(s.live, conn)
			s.linkMu.Unlock()
		}()
	}
}

// CloseShims ends every registration on the link, now and from now on, as a server that stops
// must: call it only once Envoy no longer listens to this server, or every port would be withdrawn.
func (s *Server) CloseShims() {
	s.linkMu.Lock()
	live := s.live
	s.live, s.closing = nil, true
	s.linkMu.Unlock()
	for conn := range live {
		conn.Close()
	}
}
