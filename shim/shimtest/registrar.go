// Package shimtest provides real fakes for testing envoy-docker-shim: a registration server
// (Registrar) that speaks the real gRPC API on a real Unix socket, and a Daemon that starts the
// shim exactly as dockerd starts its userland proxy (argv, fd 3 status pipe, fd 4 socket, empty
// environment, /dev/null stdio) and reads its status the way dockerd does.
//
// It is for tests only and never talks to a real dockerd or server.
package shimtest

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"

	"github.com/envoy-docker-shim/envoy-docker-shim/services/registration/registrationpb"
)

// Answer decides the server's response to an Open. Returning nil leaves the shim waiting until
// the stream ends (a server that never answers).
type Answer func(ctx context.Context, open *registrationpb.Open) *registrationpb.RegisterResponse

// ReadyAnswer answers every Open with Ready.
func ReadyAnswer(_ context.Context, open *registrationpb.Open) *registrationpb.RegisterResponse {
	return Ready(open)
}

// Ready builds the Ready response a server would send for open.
func Ready(open *registrationpb.Open) *registrationpb.RegisterResponse {
	mode := registrationpb.Mode_MODE_HTTP
	if open.GetShim().GetProxiesItself() {
		mode = registrationpb.Mode_MODE_SHIM
	}
	return &registrationpb.RegisterResponse{Response: &registrationpb.RegisterResponse_Ready{Ready: &registrationpb.Ready{
		Registration: &registrationpb.Registration{
			Mapping: open.GetMapping(), Shim: open.GetShim(), Service: "fake-test", Mode: mode,
			ReadyUnixMs: time.Now().UnixMilli(),
		},
	}}}
}

// Failed builds a Failed response.
func Failed(reason string) *registrationpb.RegisterResponse {
	return &registrationpb.RegisterResponse{Response: &registrationpb.RegisterResponse_Failed{Failed: &registrationpb.Failed{Reason: reason}}}
}

// Registrar is a fake envoy-docker-server registration API.
type Registrar struct {
	registrationpb.UnimplementedRegistrarServer
	Socket string
	answer Answer

	mu     sync.Mutex
	srv    *grpc.Server
	opens  []*registrationpb.Open
	live   map[int]*registrationpb.Open
	nextID int
	logs   []*registrationpb.ShimLog
	change chan struct{} // closed and replaced on every change
}

// StartRegistrar serves on socket until the test ends. answer may be nil (always Ready).
func StartRegistrar(t testing.TB, socket string, answer Answer) *Registrar {
	t.Helper()
	if answer == nil {
		answer = ReadyAnswer
	}
	r := &Registrar{Socket: socket, answer: answer, live: map[int]*registrationpb.Open{}, change: make(chan struct{})}
	if err := r.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Stop)
	return r
}

// Start serves (again) on r.Socket.
func (r *Registrar) Start() error {
	os.Remove(r.Socket)
	lis, err := net.Listen("unix", r.Socket)
	if err != nil {
		return err
	}
	srv := grpc.NewServer()
	registrationpb.RegisterRegistrarServer(srv, r)
	r.mu.Lock()
	r.srv = srv
	r.mu.Unlock()
	go srv.Serve(lis)
	return nil
}

// Stop kills the server as a crash would: every stream ends at once and the socket is removed.
func (r *Registrar) Stop() {
	r.mu.Lock()
	srv := r.srv
	r.srv = nil
	r.mu.Unlock()
	if srv != nil {
		srv.Stop()
	}
	os.Remove(r.Socket)
}

// Register implements the server side of a registration.
func (r *Registrar) Register(stream grpc.BidiStreamingServer[registrationpb.RegisterRequest, registrationpb.RegisterResponse]) error {
	req, err := stream.Recv()
	if err != nil {
		return err
	}
	open := req.GetOpen()
	if open == nil {
		return errors.New("first message must be Open")
	}
	r.mu.Lock()
	r.opens = append(r.opens, open)
	r.notifyLocked()
	r.mu.Unlock()

	resp := r.answer(stream.Context(), open)
	if resp == nil {
		<-stream.Context().Done()
		return stream.Context().Err()
	}
	if err := stream.Send(resp); err != nil {
		return err
	}
	if resp.GetFailed() != nil {
		return nil
	}
	r.mu.Lock()
	id := r.nextID
	r.nextID++
	r.live[id] = open
	r.notifyLocked()
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		delete(r.live, id)
		r.notifyLocked()
		r.mu.Unlock()
	}()
	for {
		req, err := stream.Recv()
		if err == io.EOF {
			return nil // deregistered
		}
		if err != nil {
			return err
		}
		if l := req.GetLog(); l != nil {
			r.mu.Lock()
			r.logs = append(r.logs, l)
			r.notifyLocked()
			r.mu.Unlock()
		}
	}
}

// List implements the unary List.
func (r *Registrar) List(context.Context, *registrationpb.ListRequest) (*registrationpb.ListResponse, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out registrationpb.ListResponse
	for _, o := range r.live {
		out.Registrations = append(out.Registrations, Ready(o).GetReady().GetRegistration())
	}
	return &out, nil
}

func (r *Registrar) notifyLocked() {
	close(r.change)
	r.change = make(chan struct{})
}

// Opens returns every Open received so far.
func (r *Registrar) Opens() []*registrationpb.Open {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]*registrationpb.Open(nil), r.opens...)
}

// Live returns the registrations currently held open.
func (r *Registrar) Live() []*registrationpb.Open {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []*registrationpb.Open
	for _, o := range r.live {
		out = append(out, o)
	}
	return out
}

// Logs returns the log lines shims sent.
func (r *Registrar) Logs() []*registrationpb.ShimLog {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]*registrationpb.ShimLog(nil), r.logs...)
}

// WaitFor waits until cond (called under no lock, after every change) holds, or timeout.
func (r *Registrar) WaitFor(timeout time.Duration, cond func(r *Registrar) bool) bool {
	deadline := time.After(timeout)
	for {
		r.mu.Lock()
		ch := r.change
		r.mu.Unlock()
		if cond(r) {
			return true
		}
		select {
		case <-ch:
		case <-deadline:
			return cond(r)
		}
	}
}
