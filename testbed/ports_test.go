package testbed

import (
	"path/filepath"
	"sync"
	"testing"
)

func TestPortRangeFor(t *testing.T) {
	tests := []struct {
		ephemeral string
		lo, hi    int
	}{
		{"32768\t60999\n", 20000, 32768}, // Linux default: stay below it
		{"49152 65535", 20000, 45000},    // IANA range: whole default range is clear
		{"1024 65535", 20000, 45000},     // nothing clear: bind check must do
		{"15000 21000", 21001, 45000},    // room only above it
		{"21000 44000", 20000, 45000},    // too little room either side
		{"", 20000, 45000},               // unreadable
		{"garbage", 20000, 45000},        //
		{"60999 32768", 20000, 45000},    // inverted
	}
	for _, tt := range tests {
		lo, hi := portRangeFor(tt.ephemeral)
		if lo != tt.lo || hi != tt.hi {
			t.Errorf("portRangeFor(%q) = [%d, %d), want [%d, %d)", tt.ephemeral, lo, hi, tt.lo, tt.hi)
		}
	}
}

func TestFreePortNeverRepeats(t *testing.T) {
	const n = 40
	var mu sync.Mutex
	seen := map[int]bool{}
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			p := FreePort(t)
			mu.Lock()
			defer mu.Unlock()
			if seen[p] {
				t.Errorf("FreePort returned %d twice", p)
			}
			seen[p] = true
		})
	}
	wg.Wait()
	lo, hi := portRangeFor(string(readFile("/proc/sys/net/ipv4/ip_local_port_range")))
	for p := range seen {
		if p < lo || p >= hi {
			t.Errorf("port %d outside [%d, %d)", p, lo, hi)
		}
		if err := portFree(p); err != nil {
			t.Errorf("port %d handed out but not free: %v", p, err)
		}
	}
}

func TestFreePortRange(t *testing.T) {
	single := FreePort(t)
	const n = 64
	first := FreePortRange(t, n)
	again := FreePortRange(t, n)
	lo, hi := portRangeFor(string(readFile("/proc/sys/net/ipv4/ip_local_port_range")))
	for _, start := range []int{first, again} {
		if start < lo || start+n > hi {
			t.Errorf("range [%d, %d) outside [%d, %d)", start, start+n, lo, hi)
		}
		if single >= start && single < start+n {
			t.Errorf("range [%d, %d) holds %d, which FreePort handed out", start, start+n, single)
		}
		for p := start; p < start+n; p++ {
			if err := portFree(p); err != nil {
				t.Errorf("port %d handed out but not free: %v", p, err)
			}
		}
	}
	if again < first+n && first < again+n {
		t.Errorf("ranges at %d and %d overlap", first, again)
	}
	// Every port of the range is leased: another process could not take one.
	if l, err := leasePort(filepath.Join(testbedRoot(), "ports"), first+n/2); err == nil {
		l.f.Close()
		t.Errorf("port %d of a range is not leased", first+n/2)
	}
}

func TestPortLeaseExcludesOthers(t *testing.T) {
	dir := t.TempDir()
	a, err := leasePort(dir, 31000)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := leasePort(dir, 31000); err != errLeaseHeld {
		t.Fatalf("second lease of a held port: %v, want errLeaseHeld", err)
	}
	a.release()
	b, err := leasePort(dir, 31000)
	if err != nil {
		t.Fatalf("lease after release: %v", err)
	}
	b.release()
}
