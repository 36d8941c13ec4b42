// Package shimtest provides real fakes for testing envoy-docker-shim: a registration server
// (Registrar) that speaks the real shim link (package shimlink) on a real Unix socket, and a
// Daemon that starts the shim exactly as dockerd starts its userland proxy (argv, fd 3 status
// pipe, fd 4 socket, empty environment, /dev/null stdio) and reads its status the way dockerd does.
//
// It is for tests only and never talks to a real dockerd or server.
package shimtest

import (
	"context"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/internal/shimlink"
)

// Answer decides the server's response to an Open: a *shimlink.Ready or a *shimlink.Failed.
// Returning nil leaves the shim waiting until the connection ends (a server that never answers).
// ctx ends when the shim goes away.
type Answer func(ctx context.Context, open *shimlink.Open) shimlink.Message

// ReadyAnswer answers every Open with Ready.
func ReadyAnswer(_ context.Context, open *shimlink.Open) shimlink.Message { return Ready(open) }

// Ready builds the Ready a server would send for open.
func Ready(open *shimlink.Open) *shimlink.Ready {
	mode := "http"
	if open.ProxiesItself {
		mode = "shim"
	}
	return &shimlink.Ready{Service: "fake-test", Mode: mode, WantsStats: open.ProxiesItself}
}

// Failed builds a Failed answer.
func Failed(reason string) *shimlink.Failed { return &shimlink.Failed{Reason: reason} }

// Registrar is a fake envoy-docker-server for shims.
type Registrar struct {
	Socket string
	answer Answer

	mu       sync.Mutex
	listener *net.UnixListener
	conns    map[*shimlink.Conn]bool
	opens    []*shimlink.Open
	live     map[int]*shimlink.Open
	answered map[int]*shimlink.Conn // live registrations that heard Ready
	nextID   int
	logs     []*shimlink.Log
	stats    []*shimlink.Stats
	change   chan struct{} // closed and replaced on every change
}

// StartRegistrar serves on socket until the test ends. answer may be nil (always Ready).
func StartRegistrar(t testing.TB, socket string, answer Answer) *Registrar {
	t.Helper()
	if answer == nil {
		answer = ReadyAnswer
	}
	r := &Registrar{Socket: socket, answer: answer, conns: map[*shimlink.Conn]bool{}, live: map[int]*shimlink.Open{},
		answered: map[int]*shimlink.Conn{}, change: make(chan struct{})}
	if err := r.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Stop)
	return r
}

// Start serves (again) on r.Socket.
func (r *Registrar) Start() error {
	os.Remove(r.Socket)
	l, err := shimlink.Listen(r.Socket)
	if err != nil {
		return err
	}
	r.mu.Lock()
	r.listener = l
	r.mu.Unlock()
	go func() {
		for {
			uc, err := l.AcceptUnix()
			if err != nil {
				return
			}
			conn := shimlink.NewConn(uc)
			r.mu.Lock()
			r.conns[conn] = true
			r.mu.Unlock()
			go r.serve(conn)
		}
	}()
	return nil
}

// Stop kills the server as a crash would: every connection ends at once and the socket is removed.
func (r *Registrar) Stop() {
	r.mu.Lock()
	l := r.listener
	r.listener = nil
	conns := r.conns
	r.conns = map[*shimlink.Conn]bool{}
	r.mu.Unlock()
	if l != nil {
		l.Close()
	}
	for c := range conns {
		c.Close()
	}
	os.Remove(r.Socket)
}

func (r *Registrar) serve(conn *shimlink.Conn) {
	defer func() {
		r.mu.Lock()
		delete(r.conns, conn)
		r.mu.Unlock()
		conn.Close()
	}()
	msg, err := conn.Recv()
	if err != nil {
		return
	}
	open, ok := msg.(*shimlink.Open)
	if !ok {
		_ = conn.Send(Failed("the first message must be Open"))
		return
	}
	r.mu.Lock()
	r.opens = append(r.opens, open)
	r.notifyLocked()
	r.mu.Unlock()

	// What the shim sends from now on, read in the background: its end cancels ctx.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	msgs := make(chan shimlink.Message)
	go func() {
		defer cancel()
		defer close(msgs)
		for {
			m, err := conn.Recv()
			if err != nil {
				return
			}
			msgs <- m
		}
	}()
	answer := r.answer(ctx, open)
	if answer == nil {
		for range msgs {
		}
		return
	}
	if _, failed := answer.(*shimlink.Failed); failed {
		_ = conn.Send(answer)
		return
	}
	// Live before the shim hears Ready, as the real server's registry holds the port before it
	// answers: a test that looks once the shim reported ready must find it.
	r.mu.Lock()
	id := r.nextID
	r.nextID++
	r.live[id] = open
	r.notifyLocked()
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		delete(r.live, id)
		delete(r.answered, id)
		r.notifyLocked()
		r.mu.Unlock()
	}()
	r.mu.Lock() // held while sending, so that TellServed cannot come first
	err = conn.Send(answer)
	if err == nil {
		r.answered[id] = conn
	}
	r.mu.Unlock()
	if err != nil {
		return
	}
	for m := range msgs {
		r.mu.Lock()
		switch m := m.(type) {
		case *shimlink.Log:
			r.logs = append(r.logs, m)
		case *shimlink.Stats:
			r.stats = append(r.stats, m)
		}
		r.notifyLocked()
		r.mu.Unlock()
	}
	// The shim ended its side (deregistration) or went away: the connection closes on return.
}

// TellServed sends Served, as the server does once Envoy has a port, on every live registration
// that heard Ready and asked for it (Open.WantsServed), and returns how many.
func (r *Registrar) TellServed() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for id, conn := range r.answered {
		if r.live[id].WantsServed && conn.Send(&shimlink.Served{}) == nil {
			n++
		}
	}
	return n
}

func (r *Registrar) notifyLocked() {
	close(r.change)
	r.change = make(chan struct{})
}

// Opens returns every Open received so far.
func (r *Registrar) Opens() []*shimlink.Open {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]*shimlink.Open(nil), r.opens...)
}

// Live returns the registrations currently held open.
func (r *Registrar) Live() []*shimlink.Open {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []*shimlink.Open
	for _, o := range r.live {
		out = append(out, o)
	}
	return out
}

// Logs returns the log lines shims sent.
func (r *Registrar) Logs() []*shimlink.Log {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]*shimlink.Log(nil), r.logs...)
}

// Stats returns the counters shims sent, in order.
func (r *Registrar) Stats() []*shimlink.Stats {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]*shimlink.Stats(nil), r.stats...)
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
