package bench

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"
)

// Path is one way from the load generator to the echo server.
type Path struct {
	Name string
	// Addr is host:port of the echo server's HTTP port through this path.
	Addr string
	// NetNS, when set, is the network namespace the clients run in (see WrkOptions.NetNS).
	NetNS *os.File
	// Accounts are the CPU time charged to the path, the proxy's first; none for a direct path.
	Accounts []Account
	// RSS is the resident memory of the proxy (nil: none).
	RSS func() (int64, error)
	// Note is shown under the table, e.g. what the CPU columns cover.
	Note string
}

// Account is CPU time that a path spends, read before and after each measurement.
type Account struct {
	Name string
	CPU  func() (time.Duration, error)
	// Pids, when set, lists the account's processes, for profiling (Config.Profiler).
	Pids func() []int
}

// Processes is the account of the processes pids lists at each reading.
func Processes(name string, pids func() []int) Account {
	return Account{Name: name, CPU: ProcessCPU(pids), Pids: pids}
}

// ProcessCPU is an Account's CPU function for the processes pids lists at each reading.
func ProcessCPU(pids func() []int) func() (time.Duration, error) {
	return func() (time.Duration, error) {
		p := pids()
		if len(p) == 0 {
			return 0, fmt.Errorf("no process to read")
		}
		return CPUTime(p...)
	}
}

// Config shapes a benchmark run.
type Config struct {
	Rounds int
	// Duration of each wrk run.
	Duration time.Duration
	// KeepAliveConns and CloseConns are wrk's connections for keep-alive and for a new
	// connection per request.
	KeepAliveConns, CloseConns int
	// BulkSize is the size of the bulk download.
	BulkSize int64
	// Reference names the path the ratios are taken against.
	Reference string
	Logf      func(format string, args ...any)
	// Profiler, when set, profiles each path's first account during the first round (perf's
	// sampling costs the profiled process a little: that round's figures are a little low).
	Profiler *Profiler
}

// Sample is one measurement of one path.
type Sample struct {
	KeepAlive, Close Load
	BulkElapsed      time.Duration
	// CPU per account (same order as Path.Accounts) for each of the three measurements.
	KeepAliveCPU, CloseCPU, BulkCPU []time.Duration
	RSS                             int64
}

// Result holds every round of one path.
type Result struct {
	Path    Path
	Samples []Sample
}

// Outcome is a run: every path's rounds, and the machine's load average before and after it,
// which says how far to trust the figures on a shared machine.
type Outcome struct {
	Results               []Result
	LoadBefore, LoadAfter string
}

// Run measures every path Rounds times, interleaved: each round visits every path in turn (the
// starting path rotates from round to round, so that no path always follows the same one), and
// at each visit runs keep-alive load, then new-connection load, then the bulk download. A warm-up
// visit to each path comes first and is not recorded.
func Run(ctx context.Context, cfg Config, paths []Path) (Outcome, error) {
	out := Outcome{LoadBefore: LoadAverage()}
	results := make([]Result, len(paths))
	for i, p := range paths {
		results[i].Path = p
	}
	logf := cfg.Logf
	if logf == nil {
		logf = func(string, ...any) {}
	}
	for i, p := range paths {
		if _, err := Wrk(ctx, WrkOptions{URL: "http://" + p.Addr + "/", Connections: cfg.KeepAliveConns, Duration: time.Second, NetNS: p.NetNS}); err != nil {
			return out, fmt.Errorf("warm-up of %s: %w", p.Name, err)
		}
		if _, err := Download(ctx, p.Addr, min(cfg.BulkSize, 64<<20), p.NetNS); err != nil {
			return out, fmt.Errorf("warm-up of %s: %w", p.Name, err)
		}
		logf("warm-up %d/%d: %s", i+1, len(paths), p.Name)
	}
	for round := range cfg.Rounds {
		for k := range paths {
			i := (round + k) % len(paths)
			s, err := measure(ctx, cfg, paths[i], round == 0)
			if err != nil {
				return out, fmt.Errorf("round %d, %s: %w", round+1, paths[i].Name, err)
			}
			results[i].Samples = append(results[i].Samples, s)
			for _, l := range []Load{s.KeepAlive, s.Close} {
				if l.Errors > 0 {
					logf("round %d/%d %s: %s", round+1, cfg.Rounds, paths[i].Name, l.ErrorKinds)
				}
			}
			logf("round %d/%d %-28s keep-alive %8.0f/s p99 %-8v close %7.0f/s bulk %6.0f MB/s errors %d cpu %s",
				round+1, cfg.Rounds, paths[i].Name, s.KeepAlive.Rate, s.KeepAlive.P99, s.Close.Rate,
				mbps(cfg.BulkSize, s.BulkElapsed), s.KeepAlive.Errors+s.Close.Errors, cpuSummary(paths[i], s))
		}
	}
	out.Results, out.LoadAfter = results, LoadAverage()
	return out, nil
}

func cpuSummary(p Path, s Sample) string {
	var parts []string
	for j, a := range p.Accounts {
		parts = append(parts, fmt.Sprintf("%s %.1fµs/req %.0fµs/conn", a.Name, perOp(s.KeepAliveCPU[j], s.KeepAlive.Requests), perOp(s.CloseCPU[j], s.Close.Requests)))
	}
	return strings.Join(parts, ", ")
}

func measure(ctx context.Context, cfg Config, p Path, profile bool) (Sample, error) {
	var s Sample
	var err error
	url := "http://" + p.Addr + "/"
	// profiled runs f under the profiler when this visit is profiled and the path has processes.
	profiled := func(load string, f func() error) func() error {
		if !profile || cfg.Profiler == nil || len(p.Accounts) == 0 || p.Accounts[0].Pids == nil {
			return f
		}
		return func() error { return cfg.Profiler.Record(ctx, slug(p.Name)+"-"+load, p.Accounts[0].Pids(), f) }
	}
	if s.KeepAliveCPU, err = charged(p, profiled("keepalive", func() error {
		s.KeepAlive, err = Wrk(ctx, WrkOptions{URL: url, Connections: cfg.KeepAliveConns, Duration: cfg.Duration, NetNS: p.NetNS})
		return err
	})); err != nil {
		return s, fmt.Errorf("keep-alive: %w", err)
	}
	if p.RSS != nil {
		if s.RSS, err = p.RSS(); err != nil {
			return s, fmt.Errorf("rss: %w", err)
		}
	}
	if s.CloseCPU, err = charged(p, profiled("newconn", func() error {
		s.Close, err = Wrk(ctx, WrkOptions{URL: url, Connections: cfg.CloseConns, Duration: cfg.Duration, Headers: []string{"Connection: close"}, NetNS: p.NetNS})
		return err
	})); err != nil {
		return s, fmt.Errorf("new connections: %w", err)
	}
	if s.BulkCPU, err = charged(p, profiled("bulk", func() error {
		s.BulkElapsed, err = Download(ctx, p.Addr, cfg.BulkSize, p.NetNS)
		return err
	})); err != nil {
		return s, fmt.Errorf("bulk: %w", err)
	}
	return s, nil
}

// charged runs f and returns the CPU time each account of p used meanwhile.
func charged(p Path, f func() error) ([]time.Duration, error) {
	before := make([]time.Duration, len(p.Accounts))
	for j, a := range p.Accounts {
		v, err := a.CPU()
		if err != nil {
			return nil, fmt.Errorf("cpu of %s: %w", a.Name, err)
		}
		before[j] = v
	}
	if err := f(); err != nil {
		return nil, err
	}
	used := make([]time.Duration, len(p.Accounts))
	for j, a := range p.Accounts {
		v, err := a.CPU()
		if err != nil {
			return nil, fmt.Errorf("cpu of %s: %w", a.Name, err)
		}
		used[j] = v - before[j]
	}
	return used, nil
}

func perOp(d time.Duration, n int64) float64 {
	if n == 0 {
		return 0
	}
	return float64(d.Microseconds()) / float64(n)
}

func mbps(size int64, d time.Duration) float64 {
	if d <= 0 {
		return 0
	}
	return float64(size) / 1e6 / d.Seconds()
}

// Median is the middle value of v (the mean of the two middle ones for an even count); 0 for none.
func Median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// slug is a path's name as a file name: lower case letters and digits, dashes between.
func slug(name string) string {
	var b strings.Builder
	dash := false
	for _, r := range strings.ToLower(name) {
		if (r >= 'a' && r <= 'z') || (r >= '0' && r <= '9') {
			if dash && b.Len() > 0 {
				b.WriteByte('-')
			}
			b.WriteRune(r)
			dash = false
			continue
		}
		dash = true
	}
	return b.String()
}
