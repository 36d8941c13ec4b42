package wait

import (
	"context"
	"testing"
	"time"
)

func TestSleep(t *testing.T) {
	live := context.Background()
	ended, cancel := context.WithCancel(context.Background())
	cancel()
	for _, tc := range []struct {
		name     string
		ctx      context.Context
		d        time.Duration
		want     bool
		min, max time.Duration
	}{
		{"the whole time", live, 30 * time.Millisecond, true, 30 * time.Millisecond, 5 * time.Second},
		{"nothing to wait", live, 0, true, 0, time.Second},
		{"negative", live, -time.Second, true, 0, time.Second},
		{"context already ended", ended, time.Hour, false, 0, time.Second},
		{"context ended, nothing to wait", ended, 0, false, 0, time.Second},
	} {
		start := time.Now()
		got := Sleep(tc.ctx, tc.d)
		took := time.Since(start)
		if got != tc.want || took < tc.min || took > tc.max {
			t.Errorf("%s: Sleep = %v after %v, want %v after %v to %v", tc.name, got, took, tc.want, tc.min, tc.max)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	start := time.Now()
	if Sleep(ctx, time.Hour) || time.Since(start) > 5*time.Second {
		t.Errorf("a context that ends during the sleep: not cut short")
	}
}

// SleepUnless ends when wake is closed, with the context still live; a nil wake waits the whole time.
func TestSleepUnless(t *testing.T) {
	wake := make(chan struct{})
	time.AfterFunc(20*time.Millisecond, func() { close(wake) })
	start := time.Now()
	if !SleepUnless(context.Background(), time.Hour, wake) || time.Since(start) > 5*time.Second {
		t.Errorf("a wake channel closed during the sleep: not cut short")
	}
	start = time.Now()
	if !SleepUnless(context.Background(), 20*time.Millisecond, nil) || time.Since(start) < 20*time.Millisecond {
		t.Errorf("a nil wake channel: the sleep was cut short")
	}
	ended, cancel := context.WithCancel(context.Background())
	cancel()
	if SleepUnless(ended, time.Hour, wake) {
		t.Errorf("an ended context: SleepUnless reports it live")
	}
}
