package soak

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"os"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"time"
)

// Back to baseline means, after the settle and a garbage collection in both samples:
//   - goroutines: at most goroutineMargin more than before. The server's Docker API client keeps
//     up to two idle keep-alive connections (two goroutines each) with no idle timeout, and
//     parallel cycles can leave it one more than the warm-up did; a leak of one goroutine per
//     cycle of any one mode still exceeds this in the 20-cycle run.
//   - heap in use: at most heapMargin more than before. A leak of 1 KiB per cycle exceeds it
//     within 1,000 cycles; what the short run can see is a leak ten times that.
//
// RSS is reported, not judged: Go hands freed memory back to the kernel lazily, so RSS after a
// burst says how high the heap went, not what it keeps.
const (
	goroutineMargin = 4
	heapMargin      = 1 << 20
)

type steadyResult struct {
	Requests, Errors, Reconnects int64
	Kinds                        map[string]int
	Examples                     []string // the first errors in full, with when they happened
}

// armResult is everything one arm measured.
type armResult struct {
	Name         string
	ControlPlane bool // a server and Envoy, whose leftovers and figures exist

	Cycles        map[string]int // by mode
	FailedStarts  int
	StartKinds    map[string]int
	FirstFailed   map[string]int // by mode
	FirstKinds    map[string]int // "mode: kind"
	UDPResends    int
	FailedRemoves int
	RemoveKinds   map[string]int
	Aborted       string   // why the arm stopped early, if it did
	Examples      []string // the first few errors in full, to tell why

	Steady     steadyResult
	Leftovers  leftovers
	LeftDetail []string

	StartTimes, RemoveTimes []time.Duration
	FirstTimes              map[string][]time.Duration // of the answered first requests, by mode
	Wall                    time.Duration

	Before, After serverSample
	SampleErr     string
}

func newArmResult(name string, controlPlane bool) *armResult {
	return &armResult{
		Name: name, ControlPlane: controlPlane,
		Cycles: map[string]int{}, StartKinds: map[string]int{}, FirstFailed: map[string]int{},
		FirstKinds: map[string]int{}, RemoveKinds: map[string]int{}, FirstTimes: map[string][]time.Duration{},
	}
}

// maxExamples bounds the errors kept in full.
const maxExamples = 5

func (r *armResult) example(c cycleResult, what string, err error) {
	if len(r.Examples) < maxExamples {
		r.Examples = append(r.Examples, fmt.Sprintf("cycle %d (%s, port %d, listen delay %v) %s: %v", c.i, c.mode, c.port, c.delay, what, err))
	}
}

func (r *armResult) add(c cycleResult) {
	r.Cycles[c.mode]++
	r.StartTimes = append(r.StartTimes, c.startDur)
	switch {
	case c.startErr != nil:
		r.FailedStarts++
		r.StartKinds[errorKind(c.startErr)]++
		r.example(c, "docker run", c.startErr)
	case c.firstErr != nil:
		r.FirstFailed[c.mode]++
		r.FirstKinds[c.mode+": "+errorKind(c.firstErr)]++
		r.example(c, "first request", c.firstErr)
	default:
		r.FirstTimes[c.mode] = append(r.FirstTimes[c.mode], c.firstDur)
	}
	r.UDPResends += c.resends
	if c.rmErr != nil {
		r.FailedRemoves++
		r.RemoveKinds[errorKind(c.rmErr)]++
		r.example(c, "docker rm", c.rmErr)
	}
	r.RemoveTimes = append(r.RemoveTimes, c.rmDur)
}

func (r *armResult) total(m map[string]int) int {
	n := 0
	for _, v := range m {
		n += v
	}
	return n
}

// problems lists every way the run missed the target; for the shim each is a test failure.
func (r *armResult) problems() []string {
	var out []string
	if r.Aborted != "" {
		out = append(out, "stopped early: "+r.Aborted)
	}
	if r.FailedStarts > 0 {
		out = append(out, fmt.Sprintf("%d failed starts: %s", r.FailedStarts, kindList(r.StartKinds)))
	}
	if n := r.total(r.FirstFailed); n > 0 {
		out = append(out, fmt.Sprintf("%d failed first requests: %s", n, kindList(r.FirstKinds)))
	}
	if r.FailedRemoves > 0 {
		out = append(out, fmt.Sprintf("%d failed removes: %s", r.FailedRemoves, kindList(r.RemoveKinds)))
	}
	if r.Steady.Requests == 0 {
		out = append(out, "the steady load sent no request")
	}
	if r.Steady.Errors > 0 || r.Steady.Reconnects > 0 {
		out = append(out, fmt.Sprintf("steady load: %d errors, %d reconnects: %s; the first: %s", r.Steady.Errors, r.Steady.Reconnects, kindList(r.Steady.Kinds), strings.Join(r.Steady.Examples, " | ")))
	}
	if r.Leftovers.total() > 0 {
		out = append(out, fmt.Sprintf("leftovers %+v: %s", r.Leftovers, strings.Join(r.LeftDetail, "; ")))
	}
	if r.ControlPlane {
		switch {
		case r.SampleErr != "":
			out = append(out, "server figures: "+r.SampleErr)
		default:
			if r.After.Goroutines > r.Before.Goroutines+goroutineMargin {
				out = append(out, fmt.Sprintf("server goroutines %d after, %d before: more than the margin of %d", r.After.Goroutines, r.Before.Goroutines, goroutineMargin))
			}
			if r.After.HeapInuse > r.Before.HeapInuse+heapMargin {
				out = append(out, fmt.Sprintf("server heap in use %s after, %s before: more than the margin of %s", mib(r.After.HeapInuse), mib(r.Before.HeapInuse), mib(heapMargin)))
			}
		}
	}
	return out
}

// report is problems, and the first errors in full when there are any.
func (r *armResult) report() []string {
	out := r.problems()
	if len(out) > 0 && len(r.Examples) > 0 {
		out = append(out, "the first errors in full: "+strings.Join(r.Examples, " | "))
	}
	return out
}

// errorKind names an error without what differs from cycle to cycle (ports, addresses,
// container names), so that failures of one kind are counted together.
func errorKind(err error) string {
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNRESET):
		return "connection reset"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "connection refused"
	case errors.Is(err, syscall.ENOTCONN), errors.Is(err, syscall.EPIPE):
		return "closed before the request was sent"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return "closed without an answer (EOF)"
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, os.ErrDeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	}
	msg := err.Error()
	if m := statusRE.FindStringSubmatch(msg); m != nil {
		return "status " + m[1]
	}
	msg = variableRE.ReplaceAllString(msg, "…")
	if r := []rune(msg); len(r) > 160 {
		msg = string(r[:160]) + "…"
	}
	return msg
}

var (
	statusRE   = regexp.MustCompile(`^status (\d{3})`)
	variableRE = regexp.MustCompile(`\b(soak-[a-z]+-\d+|[0-9a-f]{64}|[0-9a-f]{12}|\d+\.\d+\.\d+\.\d+(:\d*)*|\[[0-9a-f:]+\](:\d+)?|:\d{2,5}\b)`)
)

func kindList(kinds map[string]int) string {
	keys := slices.Sorted(maps.Keys(kinds))
	slices.SortStableFunc(keys, func(a, b string) int { return kinds[b] - kinds[a] })
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s ×%d", k, kinds[k]))
	}
	return strings.Join(parts, ", ")
}

func mib(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }

// quantiles returns the median, 95th percentile and maximum.
func quantiles(d []time.Duration) string {
	if len(d) == 0 {
		return "–"
	}
	s := slices.Clone(d)
	slices.Sort(s)
	q := func(p float64) time.Duration { return s[min(len(s)-1, int(p*float64(len(s))))] }
	r := func(x time.Duration) string { return x.Round(time.Millisecond).String() }
	return fmt.Sprintf("%s / %s / %s", r(q(0.5)), r(q(0.95)), r(s[len(s)-1]))
}

// table renders the arms side by side as markdown.
func table(cfg config, arms []*armResult) string {
	var b strings.Builder
	first := "the moment `docker run -d` returns"
	if !cfg.Race {
		first = "once the app listens (SOAK_RACE=false)"
	}
	fmt.Fprintf(&b, "Soak: %d cycles (http, tcp, udp in turn), %d in parallel, app listen delay 0 to %v, first request %s, host ports %s, seed %d; steady load %d keep-alive clients, one request each per %v.\n\n",
		cfg.Cycles, cfg.Parallel, cfg.DelayMax, first, cfg.HostPorts, cfg.Seed, cfg.SteadyClients, cfg.SteadyInterval)
	b.WriteString("| |")
	for _, a := range arms {
		fmt.Fprintf(&b, " %s |", a.Name)
	}
	b.WriteString("\n|---|")
	for range arms {
		b.WriteString("---|")
	}
	b.WriteString("\n")
	row := func(label string, cell func(a *armResult) string) {
		fmt.Fprintf(&b, "| %s |", label)
		for _, a := range arms {
			fmt.Fprintf(&b, " %s |", cell(a))
		}
		b.WriteString("\n")
	}
	cp := func(cell func(a *armResult) string) func(a *armResult) string {
		return func(a *armResult) string {
			if !a.ControlPlane {
				return "n/a"
			}
			return cell(a)
		}
	}
	row("cycles (http / tcp / udp)", func(a *armResult) string {
		s := fmt.Sprintf("%d (%d / %d / %d)", a.total(a.Cycles), a.Cycles["http"], a.Cycles["tcp"], a.Cycles["udp"])
		if a.Aborted != "" {
			s += ", stopped early"
		}
		return s
	})
	row("wall time", func(a *armResult) string { return a.Wall.Round(time.Second).String() })
	row("**failed starts**", func(a *armResult) string { return fmt.Sprint(a.FailedStarts) })
	for _, m := range modes {
		row("**failed first requests**, "+m.name, func(a *armResult) string {
			return fmt.Sprintf("%d of %d", a.FirstFailed[m.name], a.Cycles[m.name])
		})
	}
	row("UDP datagrams resent before the answer", func(a *armResult) string { return fmt.Sprint(a.UDPResends) })
	row("failed removes", func(a *armResult) string { return fmt.Sprint(a.FailedRemoves) })
	row("**steady-load errors** (reconnects) of requests", func(a *armResult) string {
		return fmt.Sprintf("%d (%d) of %d", a.Steady.Errors, a.Steady.Reconnects, a.Steady.Requests)
	})
	row("`docker run -d`: median / p95 / max", func(a *armResult) string { return quantiles(a.StartTimes) })
	for _, m := range modes {
		row("first "+m.name+" request answered in: median / p95 / max", func(a *armResult) string { return quantiles(a.FirstTimes[m.name]) })
	}
	row("`docker rm -f`: median / p95 / max", func(a *armResult) string { return quantiles(a.RemoveTimes) })
	row("**leftover** proxy processes", func(a *armResult) string { return fmt.Sprint(a.Leftovers.Proxies) })
	row("**leftover** Envoy listeners / clusters", cp(func(a *armResult) string {
		return fmt.Sprintf("%d / %d", a.Leftovers.Listeners, a.Leftovers.Clusters)
	}))
	row("**leftover** registrations", cp(func(a *armResult) string { return fmt.Sprint(a.Leftovers.Registrations) }))
	row("**leftover** containers / host ports still bound", func(a *armResult) string {
		return fmt.Sprintf("%d / %d", a.Leftovers.Containers, a.Leftovers.PortsBound)
	})
	sample := func(f func(serverSample) string, margin string) func(a *armResult) string {
		return cp(func(a *armResult) string {
			if a.SampleErr != "" {
				return "not measured"
			}
			return fmt.Sprintf("%s → %s%s", f(a.Before), f(a.After), margin)
		})
	}
	row("**server goroutines** before → after", sample(func(s serverSample) string { return fmt.Sprint(s.Goroutines) }, fmt.Sprintf(" (margin +%d)", goroutineMargin)))
	row("**server heap in use** before → after", sample(func(s serverSample) string { return mib(s.HeapInuse) }, fmt.Sprintf(" (margin +%s)", mib(heapMargin))))
	row("server RSS before → after", sample(func(s serverSample) string { return mib(s.RSS) }, ""))
	row("verdict", func(a *armResult) string {
		if p := a.problems(); len(p) > 0 {
			return fmt.Sprintf("%d off target", len(p))
		}
		return "target met"
	})
	b.WriteString("\nBold rows are the targets: 0, and the server back to its baseline within the margin. " +
		"Only the shim is held to them; docker-proxy is measured for comparison and is known to fail first requests " +
		"while the app starts (it accepts the connection, finds the container's port closed, and drops the client).\n")
	for _, a := range arms {
		p := a.report()
		if len(p) == 0 {
			continue
		}
		fmt.Fprintf(&b, "\n%s:\n", a.Name)
		for _, line := range p {
			fmt.Fprintf(&b, "- %s\n", line)
		}
	}
	return b.String()
}
