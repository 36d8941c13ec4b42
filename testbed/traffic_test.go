package testbed

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"
)

func TestCheckHostPort(t *testing.T) {
	bridge := []netip.Prefix{netip.MustParsePrefix("172.29.7.0/24")}
	tests := []struct {
		target string
		nets   []netip.Prefix
		ok     bool
	}{
		{"127.0.0.1:80", nil, true},
		{"127.1.2.3:80", nil, true},
		{"[::1]:80", nil, true},
		{"[::ffff:127.0.0.1]:80", nil, true},
		{"localhost:8080", nil, true},
		{"LOCALHOST:8080", nil, true},
		{"172.29.7.2:80", bridge, true},
		{"172.29.7.2:80", nil, false},            // the bridge of a daemon that is gone
		{"172.29.7.0:80", bridge, false},         // network address
		{"172.29.8.2:80", bridge, false},         // another instance's bridge
		{"10.0.0.1:80", bridge, false},           // private, not ours
		{"8.8.8.8:53", bridge, false},            // public
		{"0.0.0.0:80", nil, false},               // reaches the host by accident only
		{"[::]:80", nil, false},                  //
		{"example.com:80", nil, false},           // would need DNS
		{"127.0.0.1.nip.io:80", nil, false},      // names that look local are still names
		{"127.0.0.1", nil, false},                // no port
		{"[fe80::1%eth0]:80", bridge, false},     // link-local
		{"[2001:db8::1]:80", bridge, false},      //
		{"[::ffff:172.29.7.2]:80", bridge, true}, // v4-mapped form of an allowed address
	}
	for _, tt := range tests {
		err := checkHostPort(tt.target, tt.nets)
		if tt.ok && err != nil {
			t.Errorf("checkHostPort(%q, %v) = %v, want allowed", tt.target, tt.nets, err)
		}
		if !tt.ok && !errors.Is(err, ErrForbiddenTarget) {
			t.Errorf("checkHostPort(%q, %v) = %v, want ErrForbiddenTarget", tt.target, tt.nets, err)
		}
	}
}

func TestAllowNetCountsInstances(t *testing.T) {
	p := netip.MustParsePrefix("198.18.0.0/24") // outside every slot a live daemon could hold
	target := "198.18.0.9:80"
	if CheckTarget(target) == nil {
		t.Fatalf("%s allowed before any daemon registered its bridge", target)
	}
	allowNet(p)
	allowNet(p)
	disallowNet(p)
	if err := CheckTarget(target); err != nil {
		t.Fatalf("%s refused while one registration is left: %v", target, err)
	}
	disallowNet(p)
	if CheckTarget(target) == nil {
		t.Fatalf("%s still allowed after the last registration went", target)
	}
}

func TestHelpersRefuseForbiddenTargets(t *testing.T) {
	ctx := t.Context()
	if _, _, err := HTTPGet(ctx, "http://203.0.113.1/"); !errors.Is(err, ErrForbiddenTarget) {
		t.Errorf("HTTPGet to 203.0.113.1: %v, want ErrForbiddenTarget", err)
	}
	if _, err := TCPEcho(ctx, "203.0.113.1:7", []byte("x")); !errors.Is(err, ErrForbiddenTarget) {
		t.Errorf("TCPEcho to 203.0.113.1: %v, want ErrForbiddenTarget", err)
	}
	if _, err := UDPEcho(ctx, "[2001:db8::1]:7", []byte("x")); !errors.Is(err, ErrForbiddenTarget) {
		t.Errorf("UDPEcho to 2001:db8::1: %v, want ErrForbiddenTarget", err)
	}
	// From a container's namespace the same rule holds: refused before the namespace is entered.
	if _, err := TCPEchoFrom(ctx, nil, "203.0.113.1:7", []byte("x")); !errors.Is(err, ErrForbiddenTarget) {
		t.Errorf("TCPEchoFrom to 203.0.113.1: %v, want ErrForbiddenTarget", err)
	}
	if _, err := UDPEchoFrom(ctx, nil, "198.18.1.2:7", []byte("x")); !errors.Is(err, ErrForbiddenTarget) {
		t.Errorf("UDPEchoFrom to an outside host no test started: %v, want ErrForbiddenTarget", err)
	}
}

// recordingTB captures Fatalf instead of stopping the goroutine, so WaitFor's failure path can be
// observed.
type recordingTB struct {
	testing.TB
	fatal string
}

func (r *recordingTB) Helper() {}
func (r *recordingTB) Fatalf(format string, args ...any) {
	r.fatal = fmt.Sprintf(format, args...)
}

func TestWaitFor(t *testing.T) {
	calls := 0
	WaitFor(t, 5*time.Second, "third call", func() error {
		if calls++; calls < 3 {
			return fmt.Errorf("call %d", calls)
		}
		return nil
	})
	if calls != 3 {
		t.Errorf("cond called %d times, want 3", calls)
	}

	rec := &recordingTB{TB: t}
	start := time.Now()
	WaitFor(rec, 100*time.Millisecond, "never", func() error { return errors.New("still closed") })
	if time.Since(start) > 2*time.Second {
		t.Errorf("WaitFor ran %s past a 100ms timeout", time.Since(start))
	}
	if !strings.Contains(rec.fatal, "never") || !strings.Contains(rec.fatal, "still closed") {
		t.Errorf("WaitFor failure %q should name what it waited for and the last error", rec.fatal)
	}
}
