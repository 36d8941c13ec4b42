// Package logging is the shim's logger. Under dockerd the shim's stdout and stderr are /dev/null,
// so records go where an operator will find them: as JSON to the local syslog (/dev/log, i.e.
// journald or rsyslog) when there is one, and to envoy-docker-server over the registration stream
// (through a Relay the registration client drains). Stderr gets them too when it is not /dev/null (someone
// running the shim by hand).
//
// Why not log/slog, as the server uses: the shim is one process per published port and must idle
// in no more memory than docker-proxy. slog's package links encoding/json and reflection-driven
// formatting, and a Go binary's resident memory grows with its size; this logger writes the same
// JSON records (time, level, msg, then key-value pairs) with a small encoder of its own.
//
// Logging must never block the shim or make it fail: every sink is asynchronous with a bounded
// queue, and a line that does not fit is dropped.
package logging

import (
	"bytes"
	"io"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Level is a record's severity; the values are log/slog's.
type Level int

const (
	LevelDebug Level = -4
	LevelInfo  Level = 0
	LevelWarn  Level = 4
	LevelError Level = 8
)

func (l Level) String() string {
	switch {
	case l >= LevelError:
		return "ERROR"
	case l >= LevelWarn:
		return "WARN"
	case l >= LevelInfo:
		return "INFO"
	}
	return "DEBUG"
}

// Line is one record for the server.
type Line struct {
	Level   Level
	Message string
}

// Relay holds lines for the server until the registration client sends them. When it is full (the server
// is away), new lines are dropped.
type Relay struct{ c chan Line }

// NewRelay returns an relay holding up to n lines.
func NewRelay(n int) *Relay { return &Relay{c: make(chan Line, n)} }

// Pending is the number of lines not drained yet.
func (o *Relay) Pending() int { return len(o.c) }

// Lines is what the registration client drains.
func (o *Relay) Lines() <-chan Line { return o.c }

func (o *Relay) put(l Line) {
	select {
	case o.c <- l:
	default:
	}
}

// Logger writes records to its sinks. Methods take a message and alternating keys and values,
// as slog's do. A Logger is safe for concurrent use.
type Logger struct {
	out   *output
	attrs []any // from New and With, before each record's own
}

// output is what every Logger derived with With shares.
type output struct {
	relay *Relay
	// open makes the local sinks, with the first record: dialling syslog and starting a writer per
	// sink take about 0.2 ms, which a shim that logs nothing before its port is ready keeps off
	// dockerd's path.
	open  func() []*asyncSink
	once  sync.Once
	sinks []*asyncSink
}

// local returns the local sinks, opening them the first time.
func (o *output) local() []*asyncSink {
	o.once.Do(func() {
		if o.open != nil {
			o.sinks = o.open()
		}
	})
	return o.sinks
}

// New returns a logger writing to syslog (if reachable), to stderr (unless it is /dev/null) and to
// relay (if not nil). kv are on every record.
func New(relay *Relay, kv ...any) *Logger {
	return newLogger(relay, func() []*asyncSink {
		var sinks []*asyncSink
		if w, err := dialSyslog("envoy-docker-shim"); err == nil {
			sinks = append(sinks, newAsyncSink(w.write, w.close))
		}
		if !isDevNull(2) {
			sinks = append(sinks, newAsyncSink(func(_ Level, line []byte) { os.Stderr.Write(line) }, nil))
		}
		return sinks
	}, kv)
}

// NewWriter returns a logger writing JSON lines to w and to relay (if not nil).
func NewWriter(w io.Writer, relay *Relay, kv ...any) *Logger {
	return newLogger(relay, func() []*asyncSink {
		return []*asyncSink{newAsyncSink(func(_ Level, line []byte) { w.Write(line) }, nil)}
	}, kv)
}

// Discard returns a logger that writes nowhere.
func Discard() *Logger { return newLogger(nil, nil, nil) }

func newLogger(relay *Relay, open func() []*asyncSink, kv []any) *Logger {
	return &Logger{out: &output{open: open, relay: relay}, attrs: kv}
}

// With returns a logger that adds kv to every record.
func (l *Logger) With(kv ...any) *Logger {
	return &Logger{out: l.out, attrs: append(l.attrs[:len(l.attrs):len(l.attrs)], kv...)}
}

func (l *Logger) Debug(msg string, kv ...any) { l.Log(LevelDebug, msg, kv...) }
func (l *Logger) Info(msg string, kv ...any)  { l.Log(LevelInfo, msg, kv...) }
func (l *Logger) Warn(msg string, kv ...any)  { l.Log(LevelWarn, msg, kv...) }
func (l *Logger) Error(msg string, kv ...any) { l.Log(LevelError, msg, kv...) }

// Log formats the record once as JSON for the local sinks and once as text for the server (which
// stamps time and level itself), and hands both on without waiting.
func (l *Logger) Log(level Level, msg string, kv ...any) {
	if sinks := l.out.local(); len(sinks) > 0 {
		b := make([]byte, 0, 256)
		b = append(b, `{"time":`...)
		b = appendJSONString(b, time.Now().Format(time.RFC3339Nano))
		b = append(b, `,"level":"`...)
		b = append(b, level.String()...)
		b = append(b, `","msg":`...)
		b = appendJSONString(b, msg)
		b = appendPairs(b, l.attrs, kv, appendJSONPair)
		b = append(b, "}\n"...)
		for _, s := range sinks {
			s.put(level, b)
		}
	}
	if l.out.relay != nil {
		b := append(make([]byte, 0, 128), "msg="...)
		b = appendTextValue(b, msg)
		b = appendPairs(b, l.attrs, kv, appendTextPair)
		l.out.relay.put(Line{Level: level, Message: string(b)})
	}
}

// Close flushes what is queued for the local sinks, waiting at most timeout.
func (l *Logger) Close(timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	l.out.once.Do(func() {}) // nothing logged: nothing to open now
	for _, s := range l.out.sinks {
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

type record struct {
	level Level
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

func newAsyncSink(write func(Level, []byte), closeFn func()) *asyncSink {
	s := &asyncSink{c: make(chan record, 256), done: make(chan struct{}), closeFn: closeFn}
	go func() {
		defer close(s.done)
		for r := range s.c {
			write(r.level, r.line)
		}
	}()
	return s
}

// put queues line, which the caller must not change afterwards.
func (s *asyncSink) put(level Level, line []byte) {
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

// trimNewline drops the record's line end, for sinks that frame records themselves.
func trimNewline(b []byte) []byte { return bytes.TrimRight(b, "\n") }
