// Package logging is the shim's one logger setup. Under dockerd the shim's stdout and stderr are
// /dev/null, so records go where an operator will find them: as JSON to the local syslog
// (/dev/log, i.e. journald or rsyslog) when there is one, and to envoy-docker-server over the
// registration stream (through an Outbox the registrar drains). Stderr gets them too when it is
// not /dev/null (someone running the shim by hand).
//
// Logging must never block the shim or make it fail: every sink is asynchronous with a bounded
// queue, and a line that does not fit is dropped.
package logging

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"log/syslog"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Line is one record for the server.
type Line struct {
	Level   slog.Level
	Message string
}

// Outbox holds lines for the server until the registrar sends them. When it is full (the server
// is away), new lines are dropped.
type Outbox struct{ c chan Line }

// NewOutbox returns an outbox holding up to n lines.
func NewOutbox(n int) *Outbox { return &Outbox{c: make(chan Line, n)} }

// Lines is what the registrar drains.
func (o *Outbox) Lines() <-chan Line { return o.c }

func (o *Outbox) put(l Line) {
	select {
	case o.c <- l:
	default:
	}
}

// Logger is the shim's logger and the sinks behind it.
type Logger struct {
	*slog.Logger
	sinks []*asyncSink
}

// New returns a logger writing to syslog (if reachable), to stderr (unless it is /dev/null) and to
// outbox (if not nil). attrs are on every record.
func New(outbox *Outbox, attrs ...slog.Attr) *Logger {
	var sinks []*asyncSink
	if w, err := syslog.New(syslog.LOG_DAEMON|syslog.LOG_INFO, "envoy-docker-shim"); err == nil {
		sinks = append(sinks, newAsyncSink(func(level slog.Level, line []byte) {
			msg := string(bytes.TrimRight(line, "\n"))
			switch {
			case level >= slog.LevelError:
				w.Err(msg)
			case level >= slog.LevelWarn:
				w.Warning(msg)
			case level >= slog.LevelInfo:
				w.Info(msg)
			default:
				w.Debug(msg)
			}
		}, func() { w.Close() }))
	}
	if !isDevNull(2) {
		sinks = append(sinks, newAsyncSink(func(_ slog.Level, line []byte) { os.Stderr.Write(line) }, nil))
	}
	return newLogger(outbox, sinks, attrs)
}

// NewWriter returns a logger writing JSON lines to w (for tests) and to outbox.
func NewWriter(w io.Writer, outbox *Outbox, attrs ...slog.Attr) *Logger {
	return newLogger(outbox, []*asyncSink{newAsyncSink(func(_ slog.Level, line []byte) { w.Write(line) }, nil)}, attrs)
}

func newLogger(outbox *Outbox, sinks []*asyncSink, attrs []slog.Attr) *Logger {
	h := &handler{shared: &shared{sinks: sinks, outbox: outbox}}
	opts := &slog.HandlerOptions{Level: slog.LevelDebug}
	h.json = slog.NewJSONHandler(&h.shared.jsonBuf, opts)
	// The server stamps time and level itself; it gets the message and attributes as text.
	h.text = slog.NewTextHandler(&h.shared.textBuf, &slog.HandlerOptions{
		Level: slog.LevelDebug,
		ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
			if len(groups) == 0 && (a.Key == slog.TimeKey || a.Key == slog.LevelKey) {
				return slog.Attr{}
			}
			return a
		},
	})
	var hh slog.Handler = h
	if len(attrs) > 0 {
		hh = h.WithAttrs(attrs)
	}
	return &Logger{Logger: slog.New(hh), sinks: sinks}
}

// Close flushes what is queued for the local sinks, waiting at most timeout.
func (l *Logger) Close(timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for _, s := range l.sinks {
		s.close(time.Until(deadline))
	}
}

func isDevNull(fd int) bool {
	var st, null unix.Stat_t
	if unix.Fstat(fd, &st) != nil {
		return true // closed: nowhere to write
	}
	if unix.Stat("/dev/null", &null) != nil {
		return false
	}
	return st.Rdev == null.Rdev && st.Mode&unix.S_IFMT == unix.S_IFCHR
}

// shared is the state all handlers derived with WithAttrs/WithGroup write through.
type shared struct {
	mu      sync.Mutex
	jsonBuf bytes.Buffer
	textBuf bytes.Buffer
	sinks   []*asyncSink
	outbox  *Outbox
}

// handler formats each record twice (JSON for local sinks, text for the server) and hands the
// results to the sinks without waiting for them.
type handler struct {
	shared *shared
	json   slog.Handler
	text   slog.Handler
}

func (h *handler) Enabled(context.Context, slog.Level) bool { return true }

func (h *handler) Handle(ctx context.Context, r slog.Record) error {
	s := h.shared
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.sinks) > 0 {
		s.jsonBuf.Reset()
		if err := h.json.Handle(ctx, r); err == nil {
			for _, sink := range s.sinks {
				sink.put(r.Level, bytes.Clone(s.jsonBuf.Bytes()))
			}
		}
	}
	if s.outbox != nil {
		s.textBuf.Reset()
		if err := h.text.Handle(ctx, r); err == nil {
			s.outbox.put(Line{Level: r.Level, Message: string(bytes.TrimRight(s.textBuf.Bytes(), "\n"))})
		}
	}
	return nil
}

func (h *handler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return &handler{shared: h.shared, json: h.json.WithAttrs(attrs), text: h.text.WithAttrs(attrs)}
}

func (h *handler) WithGroup(name string) slog.Handler {
	return &handler{shared: h.shared, json: h.json.WithGroup(name), text: h.text.WithGroup(name)}
}

type record struct {
	level slog.Level
	line  []byte
}

// asyncSink writes lines from its own goroutine; put never blocks.
type asyncSink struct {
	mu      sync.Mutex
	closed  bool
	c       chan record
	done    chan struct{}
	closeFn func()
}

func newAsyncSink(write func(slog.Level, []byte), closeFn func()) *asyncSink {
	s := &asyncSink{c: make(chan record, 256), done: make(chan struct{}), closeFn: closeFn}
	go func() {
		defer close(s.done)
		for r := range s.c {
			write(r.level, r.line)
		}
	}()
	return s
}

func (s *asyncSink) put(level slog.Level, line []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	select {
	case s.c <- record{level, line}:
	default:
	}
}

func (s *asyncSink) close(timeout time.Duration) {
	s.mu.Lock()
	if !s.closed {
		s.closed = true
		close(s.c)
	}
	s.mu.Unlock()
	select {
	case <-s.done:
		if s.closeFn != nil {
			s.closeFn()
		}
	case <-time.After(timeout):
	}
}
