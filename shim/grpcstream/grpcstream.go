// Package grpcstream is a client for one gRPC bidirectional stream over HTTP/2 cleartext on a
// connection of its own: just what the shim needs to hold its registration with
// envoy-docker-server.
//
// Why not grpc-go: the shim is one process per published port, idle nearly all its life, and its
// users compare it with docker-proxy. Linking grpc-go and the protobuf runtime triples an idle
// shim's resident memory (their package initialisation alone touches megabytes), so the shim speaks
// the same wire protocol with only an HPACK codec. The server side stays grpc-go.
//
// The client sends one request (HEADERS), length-prefixed messages (DATA), honours HTTP/2 flow
// control in both directions, answers SETTINGS and PING, and reads the response messages and the
// trailers that carry the call's status. It does not compress, multiplex or retry.
package grpcstream

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/net/http2/hpack"
)

// HTTP/2 frame types and flags (RFC 9113, section 6) used here.
const (
	frameData         = 0x0
	frameHeaders      = 0x1
	frameRSTStream    = 0x3
	frameSettings     = 0x4
	framePushPromise  = 0x5
	framePing         = 0x6
	frameGoAway       = 0x7
	frameWindowUpdate = 0x8
	frameContinuation = 0x9

	flagEndStream  = 0x1
	flagAck        = 0x1
	flagEndHeaders = 0x4
	flagPadded     = 0x8
	flagPriority   = 0x20

	settingHeaderTableSize   = 0x1
	settingInitialWindowSize = 0x4
	settingMaxFrameSize      = 0x5

	frameHeaderLen   = 9
	defaultWindow    = 65535
	defaultFrameSize = 16384
	maxWindow        = 1<<31 - 1
	// maxMessage bounds one response message; the server's answers are a few hundred bytes.
	maxMessage = 1 << 20
	// maxHeaderBlock bounds a response header block (with its continuations).
	maxHeaderBlock = 64 << 10

	streamID = 1 // the one stream this client opens
)

var clientPreface = []byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")

// Status is a call's gRPC status other than OK, from the trailers or from the stream's reset.
type Status struct {
	Code    int // a gRPC status code (google.golang.org/grpc/codes)
	Message string
}

// gRPC status codes this package produces or callers test.
const (
	Canceled         = 1
	Unknown          = 2
	DeadlineExceeded = 4
	Internal         = 13
	Unavailable      = 14
)

func (s *Status) Error() string {
	return fmt.Sprintf("rpc error: code = %d desc = %s", s.Code, s.Message)
}

// ErrClosed is returned by Send and Recv after Close.
var ErrClosed = errors.New("grpcstream: stream closed")

// Stream is one gRPC call. Send and CloseSend from one goroutine, Recv from one (maybe another);
// Close from any.
type Stream struct {
	conn net.Conn
	r    *bufio.Reader

	wmu sync.Mutex // frames are written whole
	w   *bufio.Writer

	mu           sync.Mutex
	cond         *sync.Cond // signals changes to the windows, inbox and end
	connWindow   int64      // what the server still accepts on the connection
	streamWindow int64      // ... and on the stream
	peerFrame    int        // the largest frame the server accepts
	peerInitial  int64      // the server's SETTINGS_INITIAL_WINDOW_SIZE
	sentEnd      bool
	inbox        [][]byte
	end          error // why the stream ended; io.EOF for OK
	closed       bool
	done         chan struct{} // closed once end is set or the stream is closed

	// read side, owned by the reader goroutine
	dec          *hpack.Decoder
	fields       []hpack.HeaderField
	gotHeaders   bool
	pending      []byte // DATA bytes not yet a whole message
	readerExited chan struct{}
}

// Open connects to the Unix socket path, sends the HTTP/2 preface and the request for method
// ("/package.Service/Method") with the given extra headers. It returns once the request is
// written; the server's answer comes through Recv. ctx bounds the dial and the request only.
func Open(ctx context.Context, path, method string, header map[string]string) (*Stream, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	// DialUnix rather than a Dialer: connecting to a Unix socket does not block, and a Dialer
	// links the DNS resolver into the shim.
	conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, err
	}
	s := newStream(conn)
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	err = s.start(method, header)
	if !stop() && err == nil {
		err = ctx.Err()
	}
	if err != nil {
		conn.Close()
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, err
	}
	go s.readLoop()
	return s, nil
}

func newStream(conn net.Conn) *Stream {
	s := &Stream{
		conn: conn, r: bufio.NewReaderSize(conn, 4096), w: bufio.NewWriterSize(conn, 4096),
		connWindow: defaultWindow, streamWindow: defaultWindow, peerFrame: defaultFrameSize, peerInitial: defaultWindow,
		readerExited: make(chan struct{}), done: make(chan struct{}),
	}
	s.cond = sync.NewCond(&s.mu)
	s.dec = hpack.NewDecoder(4096, func(f hpack.HeaderField) { s.fields = append(s.fields, f) })
	s.dec.SetMaxStringLength(maxHeaderBlock)
	return s
}

func (s *Stream) start(method string, header map[string]string) error {
	var block []byte
	for _, f := range [][2]string{
		{":method", "POST"}, {":scheme", "http"}, {":path", method}, {":authority", "localhost"},
		{"content-type", "application/grpc"}, {"te", "trailers"},
	} {
		block = appendLiteralField(block, f[0], f[1])
	}
	for k, v := range header {
		block = appendLiteralField(block, strings.ToLower(k), v)
	}
	s.wmu.Lock()
	defer s.wmu.Unlock()
	s.w.Write(clientPreface)
	writeFrame(s.w, frameSettings, 0, 0, nil)
	// The header block is far below the smallest frame size, so no CONTINUATION is needed.
	writeFrame(s.w, frameHeaders, flagEndHeaders, streamID, block)
	return s.w.Flush()
}

// appendLiteralField encodes one header as HPACK's "literal header field without indexing, new
// name" with plain strings (RFC 7541, 6.2.2): one request needs no compression, and without an
// encoder's dynamic table there is no state to keep in step with the server.
func appendLiteralField(b []byte, name, value string) []byte {
	b = append(b, 0x00)
	b = appendHPACKString(b, name)
	return appendHPACKString(b, value)
}

// appendHPACKString writes a string literal: no Huffman bit, the length as a 7-bit-prefix integer
// (RFC 7541, 5.1 and 5.2), then the bytes.
func appendHPACKString(b []byte, s string) []byte {
	n := len(s)
	if n < 127 {
		b = append(b, byte(n))
	} else {
		b = append(b, 127)
		for n -= 127; n >= 128; n >>= 7 {
			b = append(b, byte(n%128+128))
		}
		b = append(b, byte(n))
	}
	return append(b, s...)
}

func writeFrame(w *bufio.Writer, typ, flags byte, stream uint32, payload []byte) {
	var h [frameHeaderLen]byte
	h[0], h[1], h[2] = byte(len(payload)>>16), byte(len(payload)>>8), byte(len(payload))
	h[3], h[4] = typ, flags
	binary.BigEndian.PutUint32(h[5:], stream&maxWindow)
	w.Write(h[:])
	w.Write(payload)
}

// writeControl writes one frame now (acks and window updates from the reader).
func (s *Stream) writeControl(typ, flags byte, stream uint32, payload []byte) error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	writeFrame(s.w, typ, flags, stream, payload)
	return s.w.Flush()
}

// Send sends one message, waiting for the server's flow-control window as needed. An error
// means the stream has ended; Recv tells why.
func (s *Stream) Send(msg []byte) error {
	framed := make([]byte, 5+len(msg))
	binary.BigEndian.PutUint32(framed[1:], uint32(len(msg)))
	copy(framed[5:], msg)
	for len(framed) > 0 {
		s.mu.Lock()
		for !s.closed && s.end == nil && !s.sentEnd && (s.connWindow <= 0 || s.streamWindow <= 0) {
			s.cond.Wait()
		}
		if err := s.sendErrLocked(); err != nil {
			s.mu.Unlock()
			return err
		}
		n := min(int64(len(framed)), s.connWindow, s.streamWindow, int64(s.peerFrame))
		s.connWindow -= n
		s.streamWindow -= n
		s.mu.Unlock()
		if err := s.writeControl(frameData, 0, streamID, framed[:n]); err != nil {
			return fmt.Errorf("send: %w", err)
		}
		framed = framed[n:]
	}
	return nil
}

func (s *Stream) sendErrLocked() error {
	switch {
	case s.closed:
		return ErrClosed
	case s.sentEnd:
		return errors.New("grpcstream: send after CloseSend")
	case s.end != nil:
		return io.EOF // as grpc-go: the stream has ended, Recv has the status
	}
	return nil
}

// CloseSend half-closes the stream: the server sees the end of the client's messages.
func (s *Stream) CloseSend() error {
	s.mu.Lock()
	err := s.sendErrLocked()
	if err == nil {
		s.sentEnd = true
	}
	s.mu.Unlock()
	if err != nil {
		return err
	}
	return s.writeControl(frameData, flagEndStream, streamID, nil)
}

// Recv returns the next message. When the server has ended the call it returns io.EOF for
// status OK, a *Status otherwise, or the connection's error.
func (s *Stream) Recv() ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for len(s.inbox) == 0 && s.end == nil && !s.closed {
		s.cond.Wait()
	}
	if len(s.inbox) > 0 {
		m := s.inbox[0]
		s.inbox = s.inbox[1:]
		return m, nil
	}
	if s.end != nil {
		return nil, s.end
	}
	return nil, ErrClosed
}

// Done is closed when the call has ended or the stream is closed; Recv then returns the
// messages still queued, and after them the call's status.
func (s *Stream) Done() <-chan struct{} { return s.done }

// markDone closes done once; s.mu is held.
func (s *Stream) markDoneLocked() {
	select {
	case <-s.done:
	default:
		close(s.done)
	}
}

// Close tears the connection down; the server sees the call cancelled.
func (s *Stream) Close() error {
	s.mu.Lock()
	already := s.closed
	s.closed = true
	s.markDoneLocked()
	s.cond.Broadcast()
	s.mu.Unlock()
	if already {
		return nil
	}
	err := s.conn.Close()
	<-s.readerExited
	return err
}

// finish records why the stream ended, once.
func (s *Stream) finish(err error) {
	s.mu.Lock()
	if s.end == nil {
		s.end = err
	}
	s.markDoneLocked()
	s.cond.Broadcast()
	s.mu.Unlock()
}

func (s *Stream) readLoop() {
	defer close(s.readerExited)
	for {
		typ, flags, stream, payload, err := s.readFrame()
		if err == nil {
			err = s.handle(typ, flags, stream, payload)
		}
		if err != nil {
			var violation protocolError
			if errors.As(err, &violation) {
				s.fail(string(violation))
			} else {
				s.finish(connectionLost(err))
				s.conn.Close()
			}
			return
		}
	}
}

// readFrame reads one frame. Errors are the connection's, or a protocolError for a frame larger
// than our SETTINGS allow.
func (s *Stream) readFrame() (typ, flags byte, stream uint32, payload []byte, err error) {
	var hdr [frameHeaderLen]byte
	if _, err := io.ReadFull(s.r, hdr[:]); err != nil {
		return 0, 0, 0, nil, err
	}
	length := int(hdr[0])<<16 | int(hdr[1])<<8 | int(hdr[2])
	if length > defaultFrameSize { // we never allow larger frames in our SETTINGS
		return 0, 0, 0, nil, protocolError(fmt.Sprintf("frame of %d bytes exceeds the maximum frame size", length))
	}
	payload = make([]byte, length)
	if _, err := io.ReadFull(s.r, payload); err != nil {
		return 0, 0, 0, nil, err
	}
	return hdr[3], hdr[4], binary.BigEndian.Uint32(hdr[5:]) & maxWindow, payload, nil
}

// protocolError is the server breaking HTTP/2 or gRPC rules, as opposed to the connection failing.
type protocolError string

func (e protocolError) Error() string { return string(e) }

// fail ends the stream for a protocol violation by the server and drops the connection.
func (s *Stream) fail(why string) {
	s.finish(&Status{Code: Internal, Message: "grpcstream: " + why})
	s.conn.Close()
}

func connectionLost(err error) error {
	if errors.Is(err, net.ErrClosed) {
		return ErrClosed
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return &Status{Code: Unavailable, Message: "connection closed by the server"}
	}
	return &Status{Code: Unavailable, Message: "connection error: " + err.Error()}
}

func (s *Stream) handle(typ, flags byte, stream uint32, p []byte) error {
	switch typ {
	case frameSettings:
		if flags&flagAck != 0 {
			return nil
		}
		return s.settings(p)
	case framePing:
		if flags&flagAck != 0 {
			return nil
		}
		if len(p) != 8 {
			return protocolError("PING with a payload other than 8 bytes")
		}
		return s.writeControl(framePing, flagAck, 0, p)
	case frameWindowUpdate:
		if len(p) != 4 {
			return protocolError("WINDOW_UPDATE with a payload other than 4 bytes")
		}
		inc := int64(binary.BigEndian.Uint32(p) & maxWindow)
		s.mu.Lock()
		if stream == 0 {
			s.connWindow += inc
		} else if stream == streamID {
			s.streamWindow += inc
		}
		over := s.connWindow > maxWindow || s.streamWindow > maxWindow
		s.cond.Broadcast()
		s.mu.Unlock()
		if over {
			return protocolError("flow-control window above 2^31-1")
		}
		return nil
	case frameGoAway:
		if len(p) < 8 {
			return protocolError("GOAWAY shorter than 8 bytes")
		}
		if last := binary.BigEndian.Uint32(p) & maxWindow; last < streamID {
			s.finish(&Status{Code: Unavailable, Message: "the server is going away: " + string(p[8:])})
		}
		return nil // the call goes on until the server ends it or the connection closes
	case frameRSTStream:
		if stream != streamID {
			return nil
		}
		if len(p) != 4 {
			return protocolError("RST_STREAM with a payload other than 4 bytes")
		}
		s.finish(resetStatus(binary.BigEndian.Uint32(p)))
		return nil
	case frameData:
		return s.data(flags, stream, p)
	case frameHeaders:
		return s.headers(flags, stream, p)
	case frameContinuation:
		return protocolError("CONTINUATION without HEADERS")
	case framePushPromise:
		return protocolError("PUSH_PROMISE received; push is not enabled")
	}
	return nil // PRIORITY and unknown frame types are ignored (RFC 9113, 4.1)
}

func (s *Stream) settings(p []byte) error {
	if len(p)%6 != 0 {
		return protocolError("SETTINGS with a payload not a multiple of 6 bytes")
	}
	for ; len(p) > 0; p = p[6:] {
		id, val := binary.BigEndian.Uint16(p), binary.BigEndian.Uint32(p[2:])
		switch id {
		case settingInitialWindowSize:
			if val > maxWindow {
				return protocolError("SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1")
			}
			s.mu.Lock()
			// The change applies to the open stream's window as a delta (RFC 9113, 6.9.2).
			s.streamWindow += int64(val) - s.peerInitial
			s.peerInitial = int64(val)
			s.cond.Broadcast()
			s.mu.Unlock()
		case settingMaxFrameSize:
			if val < defaultFrameSize || val > 1<<24-1 {
				return protocolError("SETTINGS_MAX_FRAME_SIZE out of range")
			}
			s.mu.Lock()
			s.peerFrame = int(val)
			s.mu.Unlock()
		case settingHeaderTableSize:
			// Only the encoder's table is affected; ours never indexes, so nothing to do.
		}
	}
	return s.writeControl(frameSettings, flagAck, 0, nil)
}

// data collects the gRPC messages from a DATA frame and returns the flow-control credit at once:
// messages are small and queued in memory, so the window only has to stay open.
func (s *Stream) data(flags byte, stream uint32, p []byte) error {
	credit := len(p)
	if stream != streamID {
		return protocolError("DATA on a stream this client did not open")
	}
	p, err := unpad(flags, p)
	if err != nil {
		return err
	}
	if !s.gotHeaders {
		return protocolError("DATA before the response headers")
	}
	s.pending = append(s.pending, p...)
	var msgs [][]byte
	for len(s.pending) >= 5 {
		if s.pending[0] != 0 {
			return protocolError("compressed message received; compression was not negotiated")
		}
		n := binary.BigEndian.Uint32(s.pending[1:5])
		if n > maxMessage {
			return protocolError(fmt.Sprintf("message of %d bytes exceeds %d", n, maxMessage))
		}
		if len(s.pending) < 5+int(n) {
			break
		}
		msgs = append(msgs, bytes.Clone(s.pending[5:5+n]))
		s.pending = s.pending[5+n:]
	}
	if len(s.pending) == 0 {
		s.pending = nil
	}
	if len(msgs) > 0 {
		s.mu.Lock()
		s.inbox = append(s.inbox, msgs...)
		s.cond.Broadcast()
		s.mu.Unlock()
	}
	if credit > 0 {
		var inc [4]byte
		binary.BigEndian.PutUint32(inc[:], uint32(credit))
		if err := s.writeControl(frameWindowUpdate, 0, 0, inc[:]); err != nil {
			return err
		}
		if flags&flagEndStream == 0 {
			if err := s.writeControl(frameWindowUpdate, 0, streamID, inc[:]); err != nil {
				return err
			}
		}
	}
	if flags&flagEndStream != 0 {
		s.finish(&Status{Code: Internal, Message: "the server ended the call without trailers"})
	}
	return nil
}

func unpad(flags byte, p []byte) ([]byte, error) {
	if flags&flagPadded == 0 {
		return p, nil
	}
	if len(p) < 1 || int(p[0]) >= len(p) {
		return nil, protocolError("padding longer than the frame")
	}
	return p[1 : len(p)-int(p[0])], nil
}

// headers decodes the response headers or the trailers, reading CONTINUATION frames as needed.
func (s *Stream) headers(flags byte, stream uint32, p []byte) error {
	if stream != streamID {
		return protocolError("HEADERS on a stream this client did not open")
	}
	p, err := unpad(flags, p)
	if err != nil {
		return err
	}
	if flags&flagPriority != 0 {
		if len(p) < 5 {
			return protocolError("HEADERS priority field truncated")
		}
		p = p[5:]
	}
	block := p
	for f := flags; f&flagEndHeaders == 0; {
		typ, next, stream, more, err := s.readFrame()
		if err != nil {
			return err
		}
		if typ != frameContinuation || stream != streamID {
			return protocolError("header block interrupted by another frame")
		}
		if len(block)+len(more) > maxHeaderBlock {
			return protocolError("header block too large")
		}
		block = append(block[:len(block):len(block)], more...)
		f = next
	}
	s.fields = s.fields[:0]
	if _, err := s.dec.Write(block); err != nil {
		return protocolError("header block: " + err.Error())
	}
	if err := s.dec.Close(); err != nil {
		return protocolError("header block: " + err.Error())
	}
	endStream := flags&flagEndStream != 0
	if !s.gotHeaders {
		s.gotHeaders = true
		if status := s.field(":status"); status != "200" {
			s.finish(httpStatus(status))
			return nil
		}
		if !endStream { // else trailers-only: the status is in this block
			if ct := s.field("content-type"); !strings.HasPrefix(ct, "application/grpc") {
				s.finish(&Status{Code: Unknown, Message: "response content-type " + strconv.Quote(ct)})
			}
			return nil
		}
	} else if !endStream {
		return protocolError("second header block without END_STREAM")
	}
	s.finish(s.trailerStatus())
	return nil
}

func (s *Stream) field(name string) string {
	for _, f := range s.fields {
		if f.Name == name {
			return f.Value
		}
	}
	return ""
}

func (s *Stream) trailerStatus() error {
	raw := s.field("grpc-status")
	code, err := strconv.Atoi(raw)
	if err != nil || code < 0 {
		return &Status{Code: Unknown, Message: "malformed grpc-status " + strconv.Quote(raw)}
	}
	if code == 0 {
		return io.EOF
	}
	return &Status{Code: code, Message: percentDecode(s.field("grpc-message"))}
}

// percentDecode undoes gRPC's encoding of grpc-message; malformed escapes are kept as they are.
func percentDecode(v string) string {
	if !strings.Contains(v, "%") {
		return v
	}
	var b strings.Builder
	for i := 0; i < len(v); i++ {
		if v[i] == '%' && i+2 < len(v) {
			if n, err := strconv.ParseUint(v[i+1:i+3], 16, 8); err == nil {
				b.WriteByte(byte(n))
				i += 2
				continue
			}
		}
		b.WriteByte(v[i])
	}
	return b.String()
}

// httpStatus maps a non-200 response to a gRPC status as gRPC's HTTP-to-gRPC table does.
func httpStatus(status string) error {
	code := Unknown
	switch status {
	case "400":
		code = Internal
	case "401":
		code = 16 // Unauthenticated
	case "403":
		code = 7 // PermissionDenied
	case "404":
		code = 12 // Unimplemented
	case "429", "502", "503", "504":
		code = Unavailable
	}
	return &Status{Code: code, Message: "unexpected HTTP status " + strconv.Quote(status)}
}

// resetStatus maps an RST_STREAM error code (RFC 9113, 7) as grpc-go does.
func resetStatus(code uint32) error {
	switch code {
	case 0x8: // CANCEL
		return &Status{Code: Canceled, Message: "stream cancelled by the server"}
	case 0x7: // REFUSED_STREAM
		return &Status{Code: Unavailable, Message: "stream refused by the server"}
	case 0xb: // ENHANCE_YOUR_CALM
		return &Status{Code: 8, Message: "stream reset by the server: enhance your calm"}
	}
	return &Status{Code: Internal, Message: fmt.Sprintf("stream reset by the server with HTTP/2 error code %#x", code)}
}
