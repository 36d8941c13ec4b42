package bench

import (
	"fmt"
	"slices"
	"strings"
	"time"
)

// Summary is the median over the rounds of each figure of one path.
type Summary struct {
	Name                 string
	Note                 string
	Rounds               int
	KeepAliveRate        float64 // requests/s
	P50, P99             time.Duration
	CloseRate            float64 // new connections/s (one request each)
	BulkMBps             float64 // 10^6 bytes/s
	RSSMiB               float64 // 0: no proxy process
	Accounts             []string
	PerRequest, PerConn  []float64 // µs of CPU, per account
	PerMiB               []float64 // µs of CPU per MiB of bulk download, per account
	KeepAliveReqs, Close int64     // requests of the median keep-alive and close runs (for context)
	// Errors sums wrk's socket errors and non-2xx/3xx answers over every round.
	Errors int64
}

// Summarize takes the medians of each path's rounds.
func Summarize(cfg Config, results []Result) []Summary {
	out := make([]Summary, 0, len(results))
	for _, r := range results {
		s := Summary{Name: r.Path.Name, Note: r.Path.Note, Rounds: len(r.Samples)}
		pick := func(f func(Sample) float64) float64 {
			v := make([]float64, len(r.Samples))
			for i, x := range r.Samples {
				v[i] = f(x)
			}
			return Median(v)
		}
		s.KeepAliveRate = pick(func(x Sample) float64 { return x.KeepAlive.Rate })
		s.P50 = time.Duration(pick(func(x Sample) float64 { return float64(x.KeepAlive.P50) }))
		s.P99 = time.Duration(pick(func(x Sample) float64 { return float64(x.KeepAlive.P99) }))
		s.CloseRate = pick(func(x Sample) float64 { return x.Close.Rate })
		s.BulkMBps = pick(func(x Sample) float64 { return mbps(cfg.BulkSize, x.BulkElapsed) })
		s.RSSMiB = pick(func(x Sample) float64 { return float64(x.RSS) / (1 << 20) })
		s.KeepAliveReqs = int64(pick(func(x Sample) float64 { return float64(x.KeepAlive.Requests) }))
		s.Close = int64(pick(func(x Sample) float64 { return float64(x.Close.Requests) }))
		for _, x := range r.Samples {
			s.Errors += x.KeepAlive.Errors + x.Close.Errors
		}
		for j, a := range r.Path.Accounts {
			s.Accounts = append(s.Accounts, a.Name)
			s.PerRequest = append(s.PerRequest, pick(func(x Sample) float64 { return perOp(x.KeepAliveCPU[j], x.KeepAlive.Requests) }))
			s.PerConn = append(s.PerConn, pick(func(x Sample) float64 { return perOp(x.CloseCPU[j], x.Close.Requests) }))
			s.PerMiB = append(s.PerMiB, pick(func(x Sample) float64 {
				return float64(x.BulkCPU[j].Microseconds()) / (float64(cfg.BulkSize) / (1 << 20))
			}))
		}
		out = append(out, s)
	}
	return out
}

// Markdown renders the summaries as a table, each rate and the proxy's CPU with its ratio to the
// reference path's. The proxy is each path's first account; further accounts (the shim, dockerd)
// get a column each.
func Markdown(summaries []Summary, reference string) string {
	var ref *Summary
	for i := range summaries {
		if summaries[i].Name == reference {
			ref = &summaries[i]
		}
	}
	var extra []string
	for _, s := range summaries {
		for _, a := range s.Accounts[min(1, len(s.Accounts)):] {
			if !slices.Contains(extra, a) {
				extra = append(extra, a)
			}
		}
	}
	var b strings.Builder
	b.WriteString("| path | keep-alive req/s | p50 | p99 | new conn/s | bulk MB/s | errors | proxy CPU µs/req | µs/new conn | µs/MiB | proxy RSS MiB |")
	for _, a := range extra {
		fmt.Fprintf(&b, " %s CPU µs/req, /conn, /MiB |", a)
	}
	b.WriteString("\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
	b.WriteString(strings.Repeat("---:|", len(extra)))
	b.WriteString("\n")
	for _, s := range summaries {
		ratio := func(v float64, refOf func(Summary) float64) string {
			if ref == nil || ref.Name == s.Name || refOf(*ref) == 0 || v == 0 {
				return ""
			}
			return fmt.Sprintf(" (%.2fx)", v/refOf(*ref))
		}
		fmt.Fprintf(&b, "| %s | %s%s | %s | %s | %s%s | %s%s | %s |", s.Name,
			Thousands(s.KeepAliveRate), ratio(s.KeepAliveRate, func(r Summary) float64 { return r.KeepAliveRate }),
			latency(s.P50), latency(s.P99),
			Thousands(s.CloseRate), ratio(s.CloseRate, func(r Summary) float64 { return r.CloseRate }),
			Thousands(s.BulkMBps), ratio(s.BulkMBps, func(r Summary) float64 { return r.BulkMBps }),
			Thousands(float64(s.Errors)))
		if len(s.Accounts) == 0 {
			b.WriteString(" – | – | – | – |")
		} else {
			proxyRef := func(f func(Summary) []float64) func(Summary) float64 {
				return func(r Summary) float64 {
					if len(r.Accounts) == 0 {
						return 0
					}
					return f(r)[0]
				}
			}
			fmt.Fprintf(&b, " %.1f%s | %.0f%s | %.0f%s | %.1f |",
				s.PerRequest[0], ratio(s.PerRequest[0], proxyRef(func(r Summary) []float64 { return r.PerRequest })),
				s.PerConn[0], ratio(s.PerConn[0], proxyRef(func(r Summary) []float64 { return r.PerConn })),
				s.PerMiB[0], ratio(s.PerMiB[0], proxyRef(func(r Summary) []float64 { return r.PerMiB })),
				s.RSSMiB)
		}
		for _, a := range extra {
			j := slices.Index(s.Accounts, a)
			if j < 1 {
				b.WriteString(" – |")
				continue
			}
			fmt.Fprintf(&b, " %.1f, %.0f, %.0f |", s.PerRequest[j], s.PerConn[j], s.PerMiB[j])
		}
		b.WriteString("\n")
	}
	for _, s := range summaries {
		if s.Note != "" {
			fmt.Fprintf(&b, "\n- %s: %s", s.Name, s.Note)
		}
	}
	if len(summaries) > 0 {
		b.WriteString("\n")
	}
	return b.String()
}

// Thousands formats v rounded, with commas: 30036.4 -> "30,036".
func Thousands(v float64) string {
	s := fmt.Sprintf("%.0f", v)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var out []byte
	for i, c := range []byte(s) {
		if i > 0 && (len(s)-i)%3 == 0 {
			out = append(out, ',')
		}
		out = append(out, c)
	}
	if neg {
		return "-" + string(out)
	}
	return string(out)
}

func latency(d time.Duration) string {
	switch {
	case d >= time.Second:
		return fmt.Sprintf("%.2f s", d.Seconds())
	case d >= time.Millisecond:
		return fmt.Sprintf("%.2f ms", float64(d)/float64(time.Millisecond))
	}
	return fmt.Sprintf("%d µs", d.Microseconds())
}
