// Package bench measures the data paths of benchmarks: HTTP load from wrk, a bulk download, the
// CPU time and memory of the processes that carry the traffic (from /proc), medians over
// interleaved rounds, and the report: a markdown table with ratios against a reference path and a
// PNG chart. It only measures and reports; benchmarks never turn its figures into assertions.
//
// Every target is vetted by testbed.CheckTarget: loopback, or a container of a live test daemon.
package bench

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
)

// WrkOptions describe one wrk run: one thread, a fixed number of connections, a bounded duration.
type WrkOptions struct {
	URL         string
	Connections int
	Duration    time.Duration
	// Headers are extra request headers, e.g. "Connection: close" for a new connection per request.
	Headers []string
	// NetNS, when set, is a network namespace (testbed.NewNetns) that wrk runs in.
	NetNS *os.File
}

// Load is what wrk measured.
type Load struct {
	Requests int64
	Elapsed  time.Duration
	Rate     float64 // requests per second
	P50, P99 time.Duration
	// Errors counts socket errors (connect, read, write, timeout) and non-2xx/3xx answers.
	Errors int64
	// ErrorKinds says which (wrk's own lines), when there were any.
	ErrorKinds string
}

// wrkSlack bounds how long wrk may overrun its duration before it is killed.
const wrkSlack = 15 * time.Second

// Wrk runs wrk and parses its report. Socket errors and non-2xx/3xx answers are counted in
// Load.Errors, not returned: a proxy that drops connections under load is a result the report
// shows (its errors column), and one path's failure must not void every other path's figures.
func Wrk(ctx context.Context, o WrkOptions) (Load, error) {
	u, err := url.Parse(o.URL)
	if err != nil {
		return Load{}, fmt.Errorf("wrk: %w", err)
	}
	if err := testbed.CheckTarget(u.Host); err != nil {
		return Load{}, err
	}
	secs := max(1, int(o.Duration.Round(time.Second)/time.Second))
	args := []string{"wrk", "-t1", "-c" + strconv.Itoa(o.Connections), "-d" + strconv.Itoa(secs) + "s", "--latency"}
	for _, h := range o.Headers {
		args = append(args, "-H", h)
	}
	args = append(args, o.URL)
	ctx, cancel := context.WithTimeout(ctx, time.Duration(secs)*time.Second+wrkSlack)
	defer cancel()
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	cmd.WaitDelay = time.Second
	var out []byte
	run := func() (err error) { out, err = cmd.CombinedOutput(); return err }
	if o.NetNS != nil {
		err = testbed.InNetns(o.NetNS, run)
	} else {
		err = run()
	}
	if err != nil {
		return Load{}, fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, out)
	}
	l, err := ParseWrk(string(out))
	if err != nil {
		return Load{}, fmt.Errorf("%s: %w", strings.Join(args, " "), err)
	}
	if l.Requests == 0 {
		return l, fmt.Errorf("%s: no request answered:\n%s", strings.Join(args, " "), out)
	}
	return l, nil
}

var (
	wrkTotal   = regexp.MustCompile(`(?m)^\s*(\d+) requests in ([\d.]+)(us|ms|s|m),`)
	wrkRate    = regexp.MustCompile(`(?m)^Requests/sec:\s+([\d.]+)`)
	wrkPercent = regexp.MustCompile(`(?m)^\s+(50|99)%\s+([\d.]+)(us|ms|s|m)\s*$`)
	wrkSocket  = regexp.MustCompile(`(?m)^\s*Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)`)
	wrkNon2xx  = regexp.MustCompile(`(?m)^\s*Non-2xx or 3xx responses: (\d+)`)
)

// ParseWrk reads the report of `wrk --latency`.
func ParseWrk(out string) (Load, error) {
	var l Load
	m := wrkTotal.FindStringSubmatch(out)
	if m == nil {
		return l, fmt.Errorf("no request count in wrk's report:\n%s", out)
	}
	l.Requests, _ = strconv.ParseInt(m[1], 10, 64)
	l.Elapsed = wrkDuration(m[2], m[3])
	m = wrkRate.FindStringSubmatch(out)
	if m == nil {
		return l, fmt.Errorf("no Requests/sec in wrk's report:\n%s", out)
	}
	l.Rate, _ = strconv.ParseFloat(m[1], 64)
	for _, p := range wrkPercent.FindAllStringSubmatch(out, -1) {
		d := wrkDuration(p[2], p[3])
		if p[1] == "50" {
			l.P50 = d
		} else {
			l.P99 = d
		}
	}
	if l.P50 == 0 || l.P99 == 0 {
		return l, fmt.Errorf("no latency distribution in wrk's report (run with --latency):\n%s", out)
	}
	var kinds []string
	if m := wrkSocket.FindStringSubmatch(out); m != nil {
		for _, n := range m[1:] {
			v, _ := strconv.ParseInt(n, 10, 64)
			l.Errors += v
		}
		kinds = append(kinds, strings.TrimSpace(m[0]))
	}
	if m := wrkNon2xx.FindStringSubmatch(out); m != nil {
		v, _ := strconv.ParseInt(m[1], 10, 64)
		l.Errors += v
		kinds = append(kinds, strings.TrimSpace(m[0]))
	}
	if l.Errors > 0 {
		l.ErrorKinds = strings.Join(kinds, "; ")
	}
	return l, nil
}

func wrkDuration(value, unit string) time.Duration {
	v, _ := strconv.ParseFloat(value, 64)
	scale := map[string]time.Duration{"us": time.Microsecond, "ms": time.Millisecond, "s": time.Second, "m": time.Minute}[unit]
	return time.Duration(v * float64(scale))
}
