package logging

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"
)

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) { s.mu.Lock(); defer s.mu.Unlock(); return s.b.Write(p) }
func (s *syncBuf) String() string              { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

func TestRecordsReachLocalSinkAsJSONAndServerAsText(t *testing.T) {
	var buf syncBuf
	out := NewOutbox(4)
	l := NewWriter(&buf, out, slog.String("mapping", "127.0.0.1:80/tcp"))
	l.With("attempt", 2).Warn("re-registering", "err", "EOF")
	l.Close(time.Second)

	var rec map[string]any
	if err := json.Unmarshal([]byte(buf.String()), &rec); err != nil {
		t.Fatalf("local line %q is not JSON: %v", buf.String(), err)
	}
	if rec["msg"] != "re-registering" || rec["level"] != "WARN" || rec["mapping"] != "127.0.0.1:80/tcp" || rec["attempt"] != float64(2) {
		t.Errorf("local record = %v", rec)
	}
	line := <-out.Lines()
	if line.Level != slog.LevelWarn || line.Message != `msg=re-registering mapping=127.0.0.1:80/tcp attempt=2 err=EOF` {
		t.Errorf("server line = %+v", line)
	}
}

// Logging must never block: a full outbox and a stuck sink drop lines instead.
func TestLoggingNeverBlocks(t *testing.T) {
	stuck := make(chan struct{})
	defer close(stuck)
	out := NewOutbox(1)
	l := newLogger(out, []*asyncSink{newAsyncSink(func(slog.Level, []byte) { <-stuck }, nil)}, nil)
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
		t.Fatal("logging blocked on a stuck sink or a full outbox")
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
