package logging

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"
)

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) { s.mu.Lock(); defer s.mu.Unlock(); return s.b.Write(p) }
func (s *syncBuf) String() string              { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

func TestRecordsReachLocalSinkAsJSONAndServerAsText(t *testing.T) {
	var buf syncBuf
	out := NewRelay(4)
	l := NewWriter(&buf, out, "mapping", "127.0.0.1:80/tcp")
	l.With("attempt", 2).Warn("re-registering", "err", errors.New("EOF"), "took", 1500*time.Millisecond)
	l.Close(time.Second)

	var rec map[string]any
	if err := json.Unmarshal([]byte(buf.String()), &rec); err != nil {
		t.Fatalf("local line %q is not JSON: %v", buf.String(), err)
	}
	if rec["msg"] != "re-registering" || rec["level"] != "WARN" || rec["mapping"] != "127.0.0.1:80/tcp" || rec["attempt"] != float64(2) || rec["took"] != "1.5s" || rec["err"] != "EOF" {
		t.Errorf("local record = %v", rec)
	}
	if ts, err := time.Parse(time.RFC3339Nano, fmt.Sprint(rec["time"])); err != nil || time.Since(ts) > time.Minute {
		t.Errorf("time = %v (%v)", rec["time"], err)
	}
	line := <-out.Lines()
	if line.Level != LevelWarn || line.Message != `msg=re-registering mapping=127.0.0.1:80/tcp attempt=2 err=EOF took=1.5s` {
		t.Errorf("server line = %+v", line)
	}
}

// Every kind of value, odd keys and odd characters: the local line stays one valid JSON object
// and the server's text quotes what needs quoting, as slog's text handler does.
func TestValues(t *testing.T) {
	var buf syncBuf
	out := NewRelay(4)
	l := NewWriter(&buf, out)
	l.Info("odd \"msg\"\n\x00\u2028\xff",
		"s", "a b", "empty", "", "eq", "k=v", "b", true, "i64", int64(-3), "u16", uint16(80), "f", 0.5, "nan", math.NaN(),
		"nil", nil, "addr", netip.MustParseAddrPort("[::1]:80"), "slice", []int{1, 2}, "dangling")
	l.Close(time.Second)
	var rec map[string]any
	if err := json.Unmarshal([]byte(buf.String()), &rec); err != nil {
		t.Fatalf("local line %q is not JSON: %v", buf.String(), err)
	}
	want := map[string]any{"msg": "odd \"msg\"\n\x00\u2028\ufffd", "s": "a b", "empty": "", "eq": "k=v", "b": true, "i64": float64(-3), "u16": float64(80),
		"f": 0.5, "nan": "NaN", "nil": nil, "addr": "[::1]:80", "slice": "[1 2]", badKey: "dangling"}
	for k, v := range want {
		if rec[k] != v {
			t.Errorf("%s = %#v, want %#v", k, rec[k], v)
		}
	}
	got := (<-out.Lines()).Message
	wantText := `msg="odd \"msg\"\n\x00\u2028\xff" s="a b" empty="" eq="k=v" b=true i64=-3 u16=80 f=0.5 nan=NaN nil=<nil> addr=[::1]:80 slice="[1 2]" !BADKEY=dangling`
	if got != wantText {
		t.Errorf("server line\n got %s\nwant %s", got, wantText)
	}
}

// Logging must never block: a full relay and a stuck sink drop lines instead.
func TestLoggingNeverBlocks(t *testing.T) {
	stuck := make(chan struct{})
	defer close(stuck)
	out := NewRelay(1)
	l := newLogger(out, func() []*asyncSink { return []*asyncSink{newAsyncSink(func(Level, []byte) { <-stuck }, nil)} }, nil)
	done := make(chan struct{})
	go func() {
		for i := 0; i < 10000; i++ {
			l.Info("line", "i", i)
		}
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("logging blocked on a stuck sink or a full relay")
	}
	start := time.Now()
	l.Close(50 * time.Millisecond)
	if time.Since(start) > time.Second {
		t.Fatal("Close did not respect its timeout")
	}
	l.Info("after close") // must not panic
	if got := (<-out.Lines()).Message; !strings.Contains(got, "i=0") {
		t.Errorf("first kept line = %q", got)
	}
}

// Records reach a syslog daemon on a datagram socket, framed as log/syslog frames them, and the
// writer reconnects when the daemon comes back on a new socket.
func TestSyslog(t *testing.T) {
	path := filepath.Join(t.TempDir(), "log")
	listen := func() *net.UnixConn {
		c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	saved := syslogSockets
	syslogSockets = []string{path}
	defer func() { syslogSockets = saved }()
	daemon := listen()
	w, err := dialSyslog("envoy-docker-shim")
	if err != nil {
		t.Fatal(err)
	}
	defer w.close()
	read := func(c *net.UnixConn) string {
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		buf := make([]byte, 4096)
		n, err := c.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		return string(buf[:n])
	}
	frame := regexp.MustCompile(`^<(\d+)>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d envoy-docker-shim\[\d+\]: (.*)\n$`)
	w.write(LevelWarn, []byte(`{"msg":"x"}`+"\n"))
	if m := frame.FindStringSubmatch(read(daemon)); m == nil || m[1] != "28" || m[2] != `{"msg":"x"}` {
		t.Errorf("frame = %q", m)
	}
	daemon.Close() // the daemon restarts
	os.Remove(path)
	daemon = listen()
	defer daemon.Close()
	w.write(LevelError, []byte("again"))
	if m := frame.FindStringSubmatch(read(daemon)); m == nil || m[1] != "27" || m[2] != "again" {
		t.Errorf("after reconnect: %q", m)
	}
}

// FuzzJSONString: any message or value, however malformed its UTF-8, makes valid JSON that
// reads back as the same text (invalid bytes as U+FFFD).
func FuzzJSONString(f *testing.F) {
	for _, s := range []string{"", "plain", "q\"b\\", "\x00\x1f\x7f", "\xff\xfe", "\u2028\u2029", "ü€𝄞"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		var got string
		b := appendJSONString(nil, s)
		if err := json.Unmarshal(b, &got); err != nil {
			t.Fatalf("%q encodes as %s: %v", s, b, err)
		}
		var want strings.Builder
		for i := 0; i < len(s); {
			r, size := utf8.DecodeRuneInString(s[i:])
			want.WriteRune(r) // RuneError for each invalid byte
			i += size
		}
		if got != want.String() {
			t.Fatalf("%q reads back as %q", s, got)
		}
	})
}

// The local sinks open with the first record, not before: dialling syslog and starting their
// writers stays off dockerd's path for a shim that logs nothing until its port is ready.
func TestLocalSinksOpenWithTheFirstRecord(t *testing.T) {
	opened := 0
	var got bytes.Buffer
	l := newLogger(nil, func() []*asyncSink {
		opened++
		return []*asyncSink{newAsyncSink(func(_ Level, line []byte) { got.Write(line) }, nil)}
	}, nil)
	child := l.With("k", "v")
	if opened != 0 {
		t.Fatalf("sinks opened %d times before any record", opened)
	}
	l.Info("one")
	child.Info("two")
	l.Close(time.Second)
	if opened != 1 {
		t.Errorf("sinks opened %d times, want once", opened)
	}
	if n := strings.Count(got.String(), "\n"); n != 2 {
		t.Errorf("%d lines written, want 2: %q", n, got.String())
	}
	closedEarly := 0
	quiet := newLogger(nil, func() []*asyncSink { closedEarly++; return nil }, nil)
	quiet.Close(time.Second)
	if closedEarly != 0 {
		t.Error("Close opened the sinks of a logger that logged nothing")
	}
}
