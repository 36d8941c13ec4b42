// Package ranges benchmarks publishing a port range: one container publishing N ports, under the
// stock docker-proxy and under envoy-docker-shim, on the testbed's real private dockerd
// (BenchmarkPortRange, `make bench-ranges`). This file holds what the benchmark records and the
// report it writes; it only measures, and figures never become assertions.
package ranges

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/testbed/bench"
)

// Leftovers is what one path still holds after `docker rm -f` returned; -1 where the path has no
// such thing (docker-proxy has no Envoy and no server). Sockets counts the sockets still listening
// on the range's host ports; Listeners Envoy's active (and warming) listeners, Draining those it
// removed and lets drain (no longer listening: Envoy forgets them after its drain time).
type Leftovers struct {
	Procs, Sockets, Listeners, Draining, Clusters, Registrations int
}

func (l Leftovers) String() string {
	part := func(n int, what string) string {
		if n < 0 {
			return ""
		}
		return fmt.Sprintf("%d %s", n, what)
	}
	var parts []string
	for _, p := range []string{part(l.Procs, "procs"), part(l.Sockets, "sockets"), part(l.Listeners, "lis"), part(l.Clusters, "cl"), part(l.Registrations, "reg")} {
		if p != "" {
			parts = append(parts, p)
		}
	}
	return strings.Join(parts, ", ")
}

// None reports whether nothing is left (draining listeners aside, which listen no more).
func (l Leftovers) None() bool {
	return max(l.Procs, 0)+max(l.Sockets, 0)+max(l.Listeners, 0)+max(l.Clusters, 0)+max(l.Registrations, 0) == 0
}

// Sample is one `docker run` of N published ports and its `docker rm -f`.
type Sample struct {
	Run, Remove time.Duration
	// AllIdle is, for ours, the time from the start of `docker run` until every shim went idle
	// (package idle): steered to Envoy's sockets, or with no connection for a moment (it wakes
	// for the next one). dockerd hears ready earlier, from each shim, as soon as it serves its
	// port.
	AllIdle time.Duration
	// EnvoyAll is, for ours, the time from the start of `docker run` until Envoy listened on
	// every port (its active listeners grew by N); the shims serve the ports until then.
	EnvoyAll time.Duration
	// Procs is the number of proxy processes counted while the ports were up; Proxies their
	// memory, summed.
	Procs   int
	Proxies bench.Memory
	// Envoy and Server are the growth of those processes from before `docker run` to the
	// moment the proxies were measured.
	Envoy, Server bench.Memory
	HasStack      bool
	// Left is what remained when `docker rm -f` returned, Later a moment after.
	Left, Later Leftovers
	// CPU is what `docker run` cost in CPU time.
	CPU CPU
}

// CPU is the CPU time used during `docker run`, by process.
type CPU struct {
	Dockerd, Proxies, Envoy, Server time.Duration
}

func (c CPU) sub(o CPU) CPU {
	return CPU{c.Dockerd - o.Dockerd, c.Proxies - o.Proxies, c.Envoy - o.Envoy, c.Server - o.Server}
}

// Total is the sum over the processes.
func (c CPU) Total() time.Duration { return c.Dockerd + c.Proxies + c.Envoy + c.Server }

func (c CPU) String() string {
	return fmt.Sprintf("dockerd %v, proxies %v, envoy %v, server %v", c.Dockerd, c.Proxies, c.Envoy, c.Server)
}

// Series is one path's samples for one generation and port count.
type Series struct {
	Generation string
	Path       string // "docker-proxy" or "ours"
	Ports      int
	Samples    []Sample
}

// Summary holds the medians of a Series.
type Summary struct {
	Series
	Run, Remove             time.Duration
	AllIdle, EnvoyAll       time.Duration
	PerPort                 time.Duration
	Procs                   int
	Proxies                 bench.Memory
	EnvoyPerPort, ServerPer bench.Memory // bytes per port
	Left, Later             Leftovers    // the worst round's
	CPUPerPort              time.Duration
}

// Summarize takes the medians of s's samples (leftovers: the worst round's).
func Summarize(s Series) Summary {
	out := Summary{Series: s}
	if len(s.Samples) == 0 {
		return out
	}
	med := func(f func(Sample) float64) float64 {
		v := make([]float64, len(s.Samples))
		for i, x := range s.Samples {
			v[i] = f(x)
		}
		return bench.Median(v)
	}
	memMed := func(f func(Sample) bench.Memory) bench.Memory {
		return bench.Memory{
			RSS: int64(med(func(x Sample) float64 { return float64(f(x).RSS) })),
			PSS: int64(med(func(x Sample) float64 { return float64(f(x).PSS) })),
			USS: int64(med(func(x Sample) float64 { return float64(f(x).USS) })),
		}
	}
	perPort := func(m bench.Memory) bench.Memory {
		n := int64(max(s.Ports, 1))
		return bench.Memory{RSS: m.RSS / n, PSS: m.PSS / n, USS: m.USS / n}
	}
	out.Run = time.Duration(med(func(x Sample) float64 { return float64(x.Run) }))
	out.Remove = time.Duration(med(func(x Sample) float64 { return float64(x.Remove) }))
	out.AllIdle = time.Duration(med(func(x Sample) float64 { return float64(x.AllIdle) }))
	out.EnvoyAll = time.Duration(med(func(x Sample) float64 { return float64(x.EnvoyAll) }))
	out.PerPort = out.Run / time.Duration(max(s.Ports, 1))
	out.Procs = int(med(func(x Sample) float64 { return float64(x.Procs) }))
	out.CPUPerPort = time.Duration(med(func(x Sample) float64 { return float64(x.CPU.Total()) })) / time.Duration(max(s.Ports, 1))
	out.Proxies = memMed(func(x Sample) bench.Memory { return x.Proxies })
	out.EnvoyPerPort = perPort(memMed(func(x Sample) bench.Memory { return x.Envoy }))
	out.ServerPer = perPort(memMed(func(x Sample) bench.Memory { return x.Server }))
	out.Left, out.Later = s.Samples[0].Left, s.Samples[0].Later
	for _, x := range s.Samples[1:] {
		out.Left = worst(out.Left, x.Left)
		out.Later = worst(out.Later, x.Later)
	}
	return out
}

func worst(a, b Leftovers) Leftovers {
	return Leftovers{max(a.Procs, b.Procs), max(a.Sockets, b.Sockets), max(a.Listeners, b.Listeners), max(a.Draining, b.Draining),
		max(a.Clusters, b.Clusters), max(a.Registrations, b.Registrations)}
}

// Reference is the path the others are compared with.
const Reference = "docker-proxy"

func mib(b int64) string { return fmt.Sprintf("%.1f", float64(b)/(1<<20)) }

func kib(b int64) string { return fmt.Sprintf("%.1f", float64(b)/(1<<10)) }

func ratio(v, ref float64) string {
	if ref == 0 {
		return ""
	}
	return fmt.Sprintf(" (%.2fx)", v/ref)
}

// Markdown renders one table per generation: a row per port count and path, ratios against
// docker-proxy of the same generation and port count.
func Markdown(sums []Summary) string {
	var b strings.Builder
	var gens []string
	for _, s := range sums {
		if !slices.Contains(gens, s.Generation) {
			gens = append(gens, s.Generation)
		}
	}
	for _, gen := range gens {
		fmt.Fprintf(&b, "### %s\n\n", gen)
		b.WriteString("| ports | path | rounds | `docker run` s | Envoy has every port, s | every shim steered and idle, s | per port ms | proxies | RSS MiB | PSS MiB | USS MiB | Envoy KiB/port (RSS, PSS) | server KiB/port (RSS, PSS) | `docker rm -f` s | left at return | left 1 s later | CPU ms/port |\n")
		b.WriteString("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|\n")
		for _, s := range sums {
			if s.Generation != gen {
				continue
			}
			var ref *Summary
			for i := range sums {
				if r := &sums[i]; r.Generation == gen && r.Ports == s.Ports && r.Path == Reference && s.Path != Reference {
					ref = r
				}
			}
			rr := func(v, r float64) string {
				if ref == nil {
					return ""
				}
				return ratio(v, r)
			}
			var refRun, refRSS, refPSS, refUSS, refRm float64
			if ref != nil {
				refRun, refRSS, refPSS, refUSS, refRm = ref.Run.Seconds(), float64(ref.Proxies.RSS), float64(ref.Proxies.PSS), float64(ref.Proxies.USS), ref.Remove.Seconds()
			}
			envoy, server, allIdle, envoyAll := "–", "–", "–", "–"
			if s.Path != Reference {
				allIdle = fmt.Sprintf("%.2f", s.AllIdle.Seconds())
				envoyAll = fmt.Sprintf("%.2f", s.EnvoyAll.Seconds())
				envoy = kib(s.EnvoyPerPort.RSS) + ", " + kib(s.EnvoyPerPort.PSS)
				server = kib(s.ServerPer.RSS) + ", " + kib(s.ServerPer.PSS)
			}
			left := func(l Leftovers) string {
				text := l.String()
				if l.None() {
					text = "nothing"
				}
				if l.Draining > 0 {
					text += fmt.Sprintf(" (%d lis draining)", l.Draining)
				}
				return text
			}
			fmt.Fprintf(&b, "| %s | %s | %d | %.2f%s | %s | %s | %.2f | %d | %s%s | %s%s | %s%s | %s | %s | %.2f%s | %s | %s | %.2f |\n",
				bench.Thousands(float64(s.Ports)), s.Path, len(s.Samples),
				s.Run.Seconds(), rr(s.Run.Seconds(), refRun), envoyAll, allIdle, float64(s.PerPort.Microseconds())/1000, s.Procs,
				mib(s.Proxies.RSS), rr(float64(s.Proxies.RSS), refRSS), mib(s.Proxies.PSS), rr(float64(s.Proxies.PSS), refPSS),
				mib(s.Proxies.USS), rr(float64(s.Proxies.USS), refUSS), envoy, server,
				s.Remove.Seconds(), rr(s.Remove.Seconds(), refRm), left(s.Left), left(s.Later), float64(s.CPUPerPort.Microseconds())/1000)
		}
		b.WriteString("\n")
	}
	return b.String()
}

// Rounds lists every round's figures, for a reader who wants more than the medians.
func Rounds(series []Series) string {
	var b strings.Builder
	b.WriteString("| generation | ports | path | round | `docker run` s | Envoy has every port, s | every shim steered and idle, s | PSS MiB | USS MiB | Envoy RSS +MiB | server RSS +MiB | `docker rm -f` s | CPU s: dockerd, proxies, Envoy, server |\n")
	b.WriteString("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
	for _, s := range series {
		for i, x := range s.Samples {
			envoy, server, allIdle, envoyAll := "–", "–", "–", "–"
			if x.HasStack {
				envoy, server = mib(x.Envoy.RSS), mib(x.Server.RSS)
				allIdle, envoyAll = fmt.Sprintf("%.2f", x.AllIdle.Seconds()), fmt.Sprintf("%.2f", x.EnvoyAll.Seconds())
			}
			fmt.Fprintf(&b, "| %s | %d | %s | %d | %.2f | %s | %s | %s | %s | %s | %s | %.2f | %.2f, %.2f, %.2f, %.2f |\n",
				s.Generation, s.Ports, s.Path, i+1, x.Run.Seconds(), envoyAll, allIdle, mib(x.Proxies.PSS), mib(x.Proxies.USS), envoy, server, x.Remove.Seconds(),
				x.CPU.Dockerd.Seconds(), x.CPU.Proxies.Seconds(), x.CPU.Envoy.Seconds(), x.CPU.Server.Seconds())
		}
	}
	return b.String()
}

// Panels are the chart's figures: one bar per generation, port count and path.
func Panels(sums []Summary) (summaries []bench.Summary, panels []bench.Panel) {
	byName := map[string]Summary{}
	for _, s := range sums {
		name := fmt.Sprintf("%s %d %s", s.Generation, s.Ports, s.Path)
		byName[name] = s
		summaries = append(summaries, bench.Summary{Name: name})
	}
	value := func(f func(Summary) float64) func(bench.Summary) float64 {
		return func(s bench.Summary) float64 { return f(byName[s.Name]) }
	}
	return summaries, []bench.Panel{
		{Title: "docker run ms per port (lower is better)", Value: value(func(s Summary) float64 { return float64(s.PerPort.Microseconds()) / 1000 }),
			Format: func(v float64) string { return fmt.Sprintf("%.2f", v) }},
		{Title: "proxies pss kib per port (lower is better)", Value: value(func(s Summary) float64 { return float64(s.Proxies.PSS) / 1024 / float64(max(s.Ports, 1)) }),
			Format: func(v float64) string { return fmt.Sprintf("%.0f", v) }},
		{Title: "proxies uss kib per port (lower is better)", Value: value(func(s Summary) float64 { return float64(s.Proxies.USS) / 1024 / float64(max(s.Ports, 1)) }),
			Format: func(v float64) string { return fmt.Sprintf("%.0f", v) }},
	}
}
