package bench

import (
	"bytes"
	"image/png"
	"os"
	"strings"
	"testing"
	"time"
)

const wrkReport = `Running 6s test @ http://127.0.0.1:18080/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.07ms  412.25us  15.02ms   91.12%
    Req/Sec    30.18k     1.52k   32.49k    73.33%
  Latency Distribution
     50%  995.00us
     75%    1.13ms
     90%    1.38ms
     99%    2.61ms
  180216 requests in 6.00s, 37.64MB read
Requests/sec:  30036.12
Transfer/sec:      6.27MB
`

func TestParseWrk(t *testing.T) {
	tests := []struct {
		name    string
		out     string
		want    Load
		wantErr bool
	}{
		{"keep-alive", wrkReport, Load{Requests: 180216, Elapsed: 6 * time.Second, Rate: 30036.12, P50: 995 * time.Microsecond, P99: 2610 * time.Microsecond}, false},
		{"errors counted", strings.Replace(wrkReport, "Requests/sec", "  Socket errors: connect 1, read 2, write 3, timeout 4\n  Non-2xx or 3xx responses: 5\nRequests/sec", 1),
			Load{Requests: 180216, Elapsed: 6 * time.Second, Rate: 30036.12, P50: 995 * time.Microsecond, P99: 2610 * time.Microsecond, Errors: 15,
				ErrorKinds: "Socket errors: connect 1, read 2, write 3, timeout 4; Non-2xx or 3xx responses: 5"}, false},
		{"seconds", strings.Replace(wrkReport, "99%    2.61ms", "99%    1.20s", 1),
			Load{Requests: 180216, Elapsed: 6 * time.Second, Rate: 30036.12, P50: 995 * time.Microsecond, P99: 1200 * time.Millisecond}, false},
		{"no latency distribution", "  10 requests in 1.00s, 1MB read\nRequests/sec: 10\n", Load{}, true},
		{"not wrk", "wrk: command not found", Load{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseWrk(tt.out)
			if (err != nil) != tt.wantErr {
				t.Fatalf("error %v, want error %v", err, tt.wantErr)
			}
			if !tt.wantErr && got != tt.want {
				t.Errorf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestParseStatCPU(t *testing.T) {
	// comm with spaces and a parenthesis, utime 250 and stime 50 ticks.
	stat := "1234 (envoy (main) x) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 8 0 100 0 0"
	got, err := parseStatCPU(stat)
	if err != nil {
		t.Fatal(err)
	}
	if got != 3*time.Second {
		t.Errorf("got %v, want 3s", got)
	}
	if _, err := parseStatCPU("1234 (x) S 1"); err == nil {
		t.Error("short stat accepted")
	}
	self, err := CPUTime(os.Getpid())
	if err != nil || self < 0 {
		t.Errorf("own CPU time %v, %v", self, err)
	}
}

func TestParseRSS(t *testing.T) {
	got, err := parseRSS("Name:\tenvoy\nVmPeak:\t 1 kB\nVmRSS:\t   67260 kB\nThreads: 9\n")
	if err != nil || got != 67260<<10 {
		t.Errorf("got %d, %v; want %d", got, err, 67260<<10)
	}
	if _, err := parseRSS("Name:\tkthreadd\n"); err == nil {
		t.Error("status without VmRSS accepted")
	}
}

func TestMedian(t *testing.T) {
	for _, tt := range []struct {
		in   []float64
		want float64
	}{{nil, 0}, {[]float64{3}, 3}, {[]float64{5, 1, 3}, 3}, {[]float64{4, 1, 3, 2}, 2.5}} {
		if got := Median(tt.in); got != tt.want {
			t.Errorf("median(%v) = %v, want %v", tt.in, got, tt.want)
		}
	}
}

func testResults() (Config, []Result) {
	cfg := Config{BulkSize: 512 << 20}
	sample := func(rate float64, cpu time.Duration, bulk time.Duration, rss int64) Sample {
		reqs := int64(rate * 6)
		return Sample{
			KeepAlive:    Load{Requests: reqs, Rate: rate, P50: time.Millisecond, P99: 3 * time.Millisecond},
			Close:        Load{Requests: reqs / 4, Rate: rate / 4},
			BulkElapsed:  bulk,
			KeepAliveCPU: []time.Duration{cpu, 0}, CloseCPU: []time.Duration{cpu, 0}, BulkCPU: []time.Duration{cpu, 0},
			RSS: rss,
		}
	}
	stock := Path{Name: "docker-proxy", Accounts: []Account{{Name: "docker-proxy"}, {Name: "x"}}}
	ours := Path{Name: "ours", Accounts: []Account{{Name: "envoy"}, {Name: "shim"}}}
	return cfg, []Result{
		{Path: Path{Name: "direct"}, Samples: []Sample{{KeepAlive: Load{Rate: 60000, Requests: 360000}, Close: Load{Rate: 18000}, BulkElapsed: time.Second}}},
		{Path: stock, Samples: []Sample{
			sample(30000, 4*time.Second, 2*time.Second, 8<<20),
			sample(20000, 5*time.Second, 3*time.Second, 8<<20),
			sample(40000, 6*time.Second, time.Second, 8<<20),
		}},
		{Path: ours, Samples: []Sample{sample(45000, 3*time.Second, time.Second, 64<<20)}},
	}
}

func TestMarkdown(t *testing.T) {
	cfg, results := testResults()
	sums := Summarize(cfg, results)
	if sums[1].KeepAliveRate != 30000 || sums[1].BulkMBps != mbps(512<<20, 2*time.Second) {
		t.Fatalf("docker-proxy medians %+v", sums[1])
	}
	// 5 s of CPU over the median run's 120,000 requests... each per-round figure's median:
	// 4s/180000, 5s/120000, 6s/240000 µs.
	if want := 25.0; sums[1].PerRequest[0] != want {
		t.Errorf("docker-proxy CPU per request %.2f µs, want %.2f", sums[1].PerRequest[0], want)
	}
	// Errors are summed over the rounds, keep-alive and new connections alike.
	results[1].Samples[0].Close.Errors = 1200
	results[1].Samples[2].KeepAlive.Errors = 34
	sums = Summarize(cfg, results)
	if sums[1].Errors != 1234 || sums[2].Errors != 0 {
		t.Errorf("errors %d and %d, want 1234 and 0", sums[1].Errors, sums[2].Errors)
	}
	table := Markdown(sums, "docker-proxy")
	for _, want := range []string{
		"| 11,250 (1.50x) |", // unchanged by errors
		" | 1,234 | 25.0 |",
		"| path | keep-alive req/s |",
		"| direct | 60,000 (2.00x) |",
		"| docker-proxy | 30,000 | 1.00 ms | 3.00 ms | 7,500 |",
		"| ours | 45,000 (1.50x) |",
		" 11.1 (0.44x) |", // 3 s over 270,000 requests, against 25 µs
		" 64.0 |",
		" shim CPU µs/req, /conn, /MiB |",
	} {
		if !strings.Contains(table, want) {
			t.Errorf("table lacks %q:\n%s", want, table)
		}
	}
	if got := Thousands(1234567.6); got != "1,234,568" {
		t.Errorf("thousands = %q", got)
	}
}

func TestChart(t *testing.T) {
	cfg, results := testResults()
	b, err := Chart("data plane, 2 cores", Summarize(cfg, results), "docker-proxy", DefaultPanels())
	if err != nil {
		t.Fatal(err)
	}
	img, err := png.Decode(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	if w := img.Bounds().Dx(); w != chartWidth {
		t.Errorf("width %d", w)
	}
	// Something was drawn besides the white background: the bars' colours.
	seen := map[uint32]bool{}
	for y := img.Bounds().Min.Y; y < img.Bounds().Max.Y; y += 2 {
		for x := img.Bounds().Min.X; x < img.Bounds().Max.X; x += 2 {
			r, g, b, _ := img.At(x, y).RGBA()
			seen[r>>8<<16|g>>8<<8|b>>8] = true
		}
	}
	for _, c := range palette[:3] {
		if !seen[uint32(c.R)<<16|uint32(c.G)<<8|uint32(c.B)] {
			t.Errorf("no bar in colour %v", c)
		}
	}
}

func TestGlyphs(t *testing.T) {
	for r, g := range glyphs {
		rows := strings.Split(g, " ")
		if len(rows) != glyphH {
			t.Errorf("glyph %q has %d rows", r, len(rows))
		}
		for _, row := range rows {
			if len(row) != glyphW || strings.Trim(row, ".#") != "" {
				t.Errorf("glyph %q row %q", r, row)
			}
		}
	}
}

func TestParseSmapsRollup(t *testing.T) {
	rollup := `55c6f5a1c000-7ffd3a5e6000 ---p 00000000 00:00 0                          [rollup]
Rss:                1396 kB
Pss:                 291 kB
Pss_Dirty:           106 kB
Pss_Anon:            104 kB
Pss_File:            186 kB
Pss_Shmem:             0 kB
Shared_Clean:       1216 kB
Shared_Dirty:          4 kB
Private_Clean:        72 kB
Private_Dirty:       104 kB
Referenced:         1396 kB
Anonymous:           104 kB
Private_Hugetlb:       0 kB
Swap:                  0 kB
SwapPss:               0 kB
Locked:                0 kB
`
	got, err := parseSmapsRollup(rollup)
	want := Memory{RSS: 1396 << 10, PSS: 291 << 10, USS: (72 + 104) << 10}
	if err != nil || got != want {
		t.Errorf("got %+v, %v; want %+v", got, err, want)
	}
	if _, err := parseSmapsRollup("Rss: 1 kB\n"); err == nil {
		t.Error("rollup without Pss accepted")
	}
	if _, err := parseSmapsRollup("Rss: x kB\nPss: 1 kB\n"); err == nil {
		t.Error("malformed Rss accepted")
	}
	self, err := MemoryOf(os.Getpid())
	if err != nil || self.RSS <= 0 || self.PSS <= 0 || self.USS <= 0 || self.USS > self.RSS {
		t.Errorf("own memory %+v, %v", self, err)
	}
}
