package grpcstream

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// rawCodec lets the test server see the bytes the client sent, as they are.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v any) error {
	*(v.(*[]byte)) = bytes.Clone(data)
	return nil
}
func (rawCodec) Name() string { return "proto" }

// serve runs a real grpc-go server whose every method is handler.
func serve(t *testing.T, handler grpc.StreamHandler) (string, *grpc.Server) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "s.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.ForceServerCodec(rawCodec{}), grpc.UnknownServiceHandler(handler))
	go srv.Serve(l)
	t.Cleanup(srv.Stop)
	return sock, srv
}

func open(t *testing.T, sock string, header map[string]string) *Stream {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := Open(ctx, sock, "/test.Echo/Chat", header)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// echo answers each message with itself, then ends the call with OK when the client half-closes.
func echo(_ any, ss grpc.ServerStream) error {
	for {
		var m []byte
		if err := ss.RecvMsg(&m); err == io.EOF {
			return nil
		} else if err != nil {
			return err
		}
		if err := ss.SendMsg(&m); err != nil {
			return err
		}
	}
}

func recvWithin(t *testing.T, s *Stream, d time.Duration) ([]byte, error) {
	t.Helper()
	type result struct {
		m   []byte
		err error
	}
	ch := make(chan result, 1)
	go func() {
		m, err := s.Recv()
		ch <- result{m, err}
	}()
	select {
	case r := <-ch:
		return r.m, r.err
	case <-time.After(d):
		t.Fatalf("Recv did not return within %s", d)
		return nil, nil
	}
}

// Messages of every size, including ones far above the 64 KiB flow-control windows and the
// 16 KiB frame size in both directions, arrive whole and in order; a half-close ends the call
// with OK, which Recv reports as io.EOF.
func TestEchoThroughFlowControl(t *testing.T) {
	sock, _ := serve(t, echo)
	s := open(t, sock, map[string]string{"User-Agent": "envoy-docker-shim/test"})
	sizes := []int{0, 1, 100, 16379, 16380, 65535, 70000, 300000}
	go func() {
		for _, n := range sizes {
			if err := s.Send(bytes.Repeat([]byte{byte(n)}, n)); err != nil {
				t.Errorf("send %d: %v", n, err)
				return
			}
		}
		s.CloseSend()
	}()
	for _, n := range sizes {
		m, err := recvWithin(t, s, 5*time.Second)
		if err != nil {
			t.Fatalf("recv %d: %v", n, err)
		}
		if !bytes.Equal(m, bytes.Repeat([]byte{byte(n)}, n)) {
			t.Fatalf("message %d came back as %d bytes", n, len(m))
		}
	}
	if _, err := recvWithin(t, s, 5*time.Second); err != io.EOF {
		t.Fatalf("after the half-close: %v, want io.EOF", err)
	}
	if err := s.Send([]byte("late")); err == nil {
		t.Error("Send after the call ended succeeded")
	}
}

// The request carries gRPC's headers and the caller's; the server's error status and its
// percent-encoded message come back as they were sent.
func TestHeadersAndErrorStatus(t *testing.T) {
	msg := "bind: address already in use (100% sure) — ünïcode"
	gotUA := make(chan string, 1)
	sock, _ := serve(t, func(_ any, ss grpc.ServerStream) error {
		md, _ := metadata.FromIncomingContext(ss.Context())
		gotUA <- strings.Join(md.Get("x-shim"), ",")
		return status.Error(codes.FailedPrecondition, msg)
	})
	s := open(t, sock, map[string]string{"X-Shim": "envoy-docker-shim/test"})
	_, err := recvWithin(t, s, 5*time.Second)
	var st *Status
	if !errors.As(err, &st) || st.Code != int(codes.FailedPrecondition) || st.Message != msg {
		t.Fatalf("err = %#v, want FailedPrecondition %q", err, msg)
	}
	if ua := <-gotUA; ua != "envoy-docker-shim/test" {
		t.Errorf("server saw x-shim %q", ua)
	}
}

// A method the server does not know ends the call with Unimplemented (a trailers-only response).
func TestUnknownMethod(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	go srv.Serve(l)
	defer srv.Stop()
	s := open(t, sock, nil)
	_, err = recvWithin(t, s, 5*time.Second)
	var st *Status
	if !errors.As(err, &st) || st.Code != int(codes.Unimplemented) {
		t.Fatalf("err = %v, want Unimplemented", err)
	}
}

// The server going away ends a call that is waiting for messages, promptly.
func TestServerStopEndsTheCall(t *testing.T) {
	for _, graceful := range []bool{false, true} {
		t.Run(map[bool]string{false: "stop", true: "graceful stop"}[graceful], func(t *testing.T) {
			held := make(chan struct{})
			sock, srv := serve(t, func(_ any, ss grpc.ServerStream) error {
				close(held)
				<-ss.Context().Done()
				return ss.Context().Err()
			})
			s := open(t, sock, nil)
			<-held
			go func() {
				if graceful {
					// GracefulStop waits for the call; the client's end of it is what ends it.
					srv.GracefulStop()
				} else {
					srv.Stop()
				}
			}()
			if graceful {
				time.Sleep(100 * time.Millisecond)
				select {
				case <-s.Done():
					t.Fatal("a graceful stop ended the call by itself")
				default:
				}
				s.CloseSend()
				s.Close()
				return
			}
			select {
			case <-s.Done():
			case <-time.After(2 * time.Second):
				t.Fatal("Done not closed after the server stopped")
			}
			_, err := recvWithin(t, s, 2*time.Second)
			var st *Status
			if !errors.As(err, &st) || st.Code != Unavailable {
				t.Fatalf("err = %v, want Unavailable", err)
			}
		})
	}
}

// Close from the client cancels the call on the server.
func TestCloseCancelsOnTheServer(t *testing.T) {
	ended := make(chan error, 1)
	held := make(chan struct{})
	sock, _ := serve(t, func(_ any, ss grpc.ServerStream) error {
		close(held)
		<-ss.Context().Done()
		ended <- ss.Context().Err()
		return nil
	})
	s := open(t, sock, nil)
	<-held
	s.Close()
	select {
	case err := <-ended:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("server's call ended with %v", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("server did not see the call end")
	}
	if _, err := s.Recv(); !errors.Is(err, ErrClosed) {
		t.Errorf("Recv after Close = %v", err)
	}
}

func TestOpenErrors(t *testing.T) {
	dir := t.TempDir()
	if _, err := Open(context.Background(), filepath.Join(dir, "missing.sock"), "/a/b", nil); err == nil || !strings.Contains(err.Error(), "no such file") {
		t.Errorf("missing socket: %v", err)
	}
	// A listener that never answers: ctx bounds Open only, and the stream is usable later.
	sock := filepath.Join(dir, "silent.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := Open(ctx, sock, "/a/b", nil); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled ctx: %v", err)
	}
}

// Hand-made server frames: flow-control and framing rules this client must apply that a
// well-behaved grpc-go server does not exercise.
func TestProtocolFromAHandMadeServer(t *testing.T) {
	for _, tc := range []struct {
		name   string
		frames func(w *frameWriter)
		want   string // substring of the error Recv returns
	}{
		{"data before headers", func(w *frameWriter) { w.frame(frameData, 0, 1, []byte{0, 0, 0, 0, 0}) }, "DATA before the response headers"},
		{"compressed message", func(w *frameWriter) {
			w.headers(flagEndHeaders, ":status", "200", "content-type", "application/grpc")
			w.frame(frameData, 0, 1, []byte{1, 0, 0, 0, 0})
		}, "compressed"},
		{"oversized frame", func(w *frameWriter) { w.frame(frameData, 0, 1, make([]byte, defaultFrameSize+1)) }, "exceeds the maximum frame size"},
		{"push promise", func(w *frameWriter) { w.frame(framePushPromise, flagEndHeaders, 1, []byte{0, 0, 0, 2}) }, "PUSH_PROMISE"},
		{"http error", func(w *frameWriter) { w.headers(flagEndHeaders|flagEndStream, ":status", "503") }, `HTTP status "503"`},
		{"data ends the stream without trailers", func(w *frameWriter) {
			w.headers(flagEndHeaders, ":status", "200", "content-type", "application/grpc")
			w.frame(frameData, flagEndStream, 1, nil)
		}, "without trailers"},
		{"trailers over continuation, padded", func(w *frameWriter) {
			w.headers(flagEndHeaders, ":status", "200", "content-type", "application/grpc")
			block := w.block("grpc-status", "9", "grpc-message", "split%20message")
			w.frame(frameHeaders, flagEndStream|flagPadded, 1, append(append([]byte{2}, block[:3]...), 0, 0))
			w.frame(frameContinuation, flagEndHeaders, 1, block[3:])
		}, "split message"},
		{"reset", func(w *frameWriter) { w.frame(frameRSTStream, 0, 1, []byte{0, 0, 0, 8}) }, "cancelled by the server"},
		{"goaway before the stream", func(w *frameWriter) { w.frame(frameGoAway, 0, 0, []byte{0, 0, 0, 0, 0, 0, 0, 0, 'b', 'y', 'e'}) }, "going away: bye"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			client, server := net.Pipe()
			s := newStream(client)
			go s.readLoop()
			defer s.Close()
			go io.Copy(io.Discard, server)
			w := &frameWriter{conn: server}
			tc.frames(w)
			_, err := recvWithin(t, s, 2*time.Second)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
			server.Close()
		})
	}
}

// A window opened by WINDOW_UPDATE and SETTINGS lets a blocked Send go on; a PING is answered.
func TestSendWaitsForTheWindow(t *testing.T) {
	client, server := net.Pipe()
	defer server.Close()
	s := newStream(client)
	go s.readLoop()
	defer s.Close()
	got := make(chan []byte, 16)
	go func() { // the server's reader: collects frames as whole frames
		var h [frameHeaderLen]byte
		for {
			if _, err := io.ReadFull(server, h[:]); err != nil {
				close(got)
				return
			}
			p := make([]byte, int(h[0])<<16|int(h[1])<<8|int(h[2]))
			io.ReadFull(server, p)
			got <- append(bytes.Clone(h[:]), p...)
		}
	}()
	sent := make(chan error, 1)
	go func() { sent <- s.Send(make([]byte, 100000)) }() // more than the 65,535-byte windows
	var data int
	for data < defaultWindow {
		f := <-got
		if f[3] == frameData {
			data += len(f) - frameHeaderLen
		}
	}
	select {
	case err := <-sent:
		t.Fatalf("Send returned (%v) before the window opened", err)
	case <-time.After(100 * time.Millisecond):
	}
	w := &frameWriter{conn: server}
	w.frame(frameWindowUpdate, 0, 0, []byte{0, 1, 0, 0})                          // connection +65,536
	w.frame(frameSettings, 0, 0, []byte{0, settingInitialWindowSize, 0, 2, 0, 0}) // stream window 65,535 -> 131,072
	w.frame(framePing, 0, 0, []byte("12345678"))
	var pingAck, settingsAck bool
	for data < 100005 || !pingAck || !settingsAck {
		select {
		case f := <-got:
			switch {
			case f[3] == frameData:
				data += len(f) - frameHeaderLen
			case f[3] == framePing && f[4] == flagAck && string(f[frameHeaderLen:]) == "12345678":
				pingAck = true
			case f[3] == frameSettings && f[4] == flagAck:
				settingsAck = true
			}
		case <-time.After(2 * time.Second):
			t.Fatalf("stalled: %d data bytes, ping ack %v, settings ack %v", data, pingAck, settingsAck)
		}
	}
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
}

type frameWriter struct {
	conn net.Conn
	buf  bytes.Buffer
	enc  *hpack.Encoder // one for the connection: the client's decoder keeps its dynamic table
}

func (w *frameWriter) frame(typ, flags byte, stream uint32, p []byte) {
	h := []byte{byte(len(p) >> 16), byte(len(p) >> 8), byte(len(p)), typ, flags, byte(stream >> 24), byte(stream >> 16), byte(stream >> 8), byte(stream)}
	w.conn.Write(append(h, p...))
}

func (w *frameWriter) block(kv ...string) []byte {
	if w.enc == nil {
		w.enc = hpack.NewEncoder(&w.buf)
	}
	w.buf.Reset()
	for i := 0; i < len(kv); i += 2 {
		w.enc.WriteField(hpack.HeaderField{Name: kv[i], Value: kv[i+1]})
	}
	return bytes.Clone(w.buf.Bytes())
}

func (w *frameWriter) headers(flags byte, kv ...string) {
	w.frame(frameHeaders, flags, 1, w.block(kv...))
}

// The hand-made request header block decodes, with HPACK's own decoder, to the fields written,
// for names and values of every length class of the 7-bit-prefix integer.
func TestLiteralHeaderFields(t *testing.T) {
	fields := [][2]string{{":path", "/a.B/C"}, {"x-126", strings.Repeat("a", 126)}, {"x-127", strings.Repeat("b", 127)},
		{"x-128", strings.Repeat("c", 128)}, {"x-300", strings.Repeat("d", 300)}, {strings.Repeat("n", 20000), "big"}, {"empty", ""}}
	var block []byte
	for _, f := range fields {
		block = appendLiteralField(block, f[0], f[1])
	}
	got, err := hpack.NewDecoder(4096, nil).DecodeFull(block)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(fields) {
		t.Fatalf("decoded %d fields, want %d", len(got), len(fields))
	}
	for i, f := range fields {
		if got[i].Name != f[0] || got[i].Value != f[1] || got[i].Sensitive {
			t.Errorf("field %d = %q: %d bytes, want %q: %d bytes", i, got[i].Name[:min(len(got[i].Name), 10)], len(got[i].Value), f[0][:min(len(f[0]), 10)], len(f[1]))
		}
	}
}
