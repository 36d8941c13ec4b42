package e2e

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
)

// BenchmarkPublishVsDockerProxy compares, in one run, the shim with the stock docker-proxy it
// replaces, under each daemon generation with that generation's own docker-proxy: the wall time of
// `docker run -d -p` (median of 10; target shim <= 1.3x) and the memory of an idle userland proxy,
// RSS and PSS (target shim <= docker-proxy), for a TCP port (which Envoy serves) and for a UDP
// port (which the shim proxies itself).
func BenchmarkPublishVsDockerProxy(b *testing.B) {
	for _, gen := range testbed.Generations(b) {
		b.Run(string(gen), func(b *testing.B) { benchmarkPublishVsDockerProxy(b, gen) })
	}
}

func benchmarkPublishVsDockerProxy(b *testing.B, gen testbed.Generation) {
	stock := testbed.StartDaemon(b, testbed.DaemonOptions{Generation: gen})
	s := startB(b, gen)
	// Ten published ports live at once, as on a real host: code pages of the same binary are
	// shared between its processes, so PSS (proportional set size) is what each port really costs.
	measure := func(d *testbed.Daemon, proxyName, publish string) (run time.Duration, rss, pss int) {
		d.EchoImage(b)
		var runs []time.Duration
		var ports []int
		var containers []*testbed.Container
		for range 10 {
			port := testbed.FreePort(b)
			start := time.Now()
			c, err := d.RunErr(context.Background(), testbed.RunOptions{Publish: []string{fmt.Sprintf(publish, port)}})
			if err != nil {
				b.Fatal(err)
			}
			runs = append(runs, time.Since(start))
			ports = append(ports, port)
			containers = append(containers, c)
		}
		time.Sleep(time.Second) // idle
		var rssAll, pssAll []int
		for _, port := range ports {
			for _, pid := range proxyPids(proxyName, port) {
				rssAll = append(rssAll, memKiB(pid, "status", "VmRSS:"))
				pssAll = append(pssAll, memKiB(pid, "smaps_rollup", "Pss:"))
			}
		}
		for _, c := range containers {
			d.Remove(b, c)
		}
		if len(rssAll) == 0 {
			b.Fatalf("no %s process found", proxyName)
		}
		slices.Sort(runs)
		slices.Sort(rssAll)
		slices.Sort(pssAll)
		return runs[len(runs)/2], rssAll[len(rssAll)/2], pssAll[len(pssAll)/2]
	}
	for b.Loop() {
		for _, proto := range []struct{ name, publish string }{{"tcp", "127.0.0.1:%d:80"}, {"udp", "127.0.0.1:%d:7/udp"}} {
			stockRun, stockRSS, stockPSS := measure(stock, "docker-proxy", proto.publish)
			shimRun, shimRSS, shimPSS := measure(s.daemon, "envoy-docker-shim", proto.publish)
			if proto.name == "tcp" {
				b.ReportMetric(float64(stockRun.Microseconds())/1000, "docker-proxy-run-ms")
				b.ReportMetric(float64(shimRun.Microseconds())/1000, "shim-run-ms")
				b.ReportMetric(float64(shimRun)/float64(stockRun), "run-ratio")
			}
			b.ReportMetric(float64(stockRSS), proto.name+"-docker-proxy-rss-KiB")
			b.ReportMetric(float64(shimRSS), proto.name+"-shim-rss-KiB")
			b.ReportMetric(float64(shimRSS)/float64(stockRSS), proto.name+"-rss-ratio")
			b.ReportMetric(float64(shimPSS)/float64(stockPSS), proto.name+"-pss-ratio")
			b.Logf("%s: docker run -p median: docker-proxy %v, shim %v (%.2fx); idle RSS: docker-proxy %d KiB, shim %d KiB (%.2fx); idle PSS: docker-proxy %d KiB, shim %d KiB (%.2fx)",
				proto.name, stockRun, shimRun, float64(shimRun)/float64(stockRun), stockRSS, shimRSS, float64(shimRSS)/float64(stockRSS),
				stockPSS, shimPSS, float64(shimPSS)/float64(stockPSS))
		}
	}
}

// BenchmarkUDPVsDockerProxy compares UDP echo round trips per second through the shim and through
// docker-proxy, under each daemon generation with its own docker-proxy, measured alternately in
// one run: 8 clients, each sending 1,000-byte datagrams one after the other to one published port
// (target shim >= docker-proxy).
func BenchmarkUDPVsDockerProxy(b *testing.B) {
	for _, gen := range testbed.Generations(b) {
		b.Run(string(gen), func(b *testing.B) { benchmarkUDPVsDockerProxy(b, gen) })
	}
}

func benchmarkUDPVsDockerProxy(b *testing.B, gen testbed.Generation) {
	stock := testbed.StartDaemon(b, testbed.DaemonOptions{Generation: gen})
	s := startB(b, gen)
	const clients, perClient = 8, 3000
	roundTrips := func(d *testbed.Daemon) float64 {
		port := testbed.FreePort(b)
		c := d.Run(b, testbed.RunOptions{Publish: []string{fmt.Sprintf("127.0.0.1:%d:7/udp", port)}})
		defer d.Remove(b, c)
		addr := fmt.Sprintf("127.0.0.1:%d", port)
		var wg sync.WaitGroup
		var lost atomic.Int64
		begin := time.Now()
		for range clients {
			wg.Go(func() {
				conn, err := testbed.Dial(context.Background(), "udp", addr)
				if err != nil {
					b.Error(err)
					return
				}
				defer conn.Close()
				msg, buf := make([]byte, 1000), make([]byte, 2048)
				for range perClient {
					_ = conn.SetDeadline(time.Now().Add(time.Second))
					if _, err := conn.Write(msg); err != nil {
						lost.Add(1)
						continue
					}
					if _, err := conn.Read(buf); err != nil {
						lost.Add(1)
					}
				}
			})
		}
		wg.Wait()
		if n := lost.Load(); n > 0 {
			b.Fatalf("%d of %d datagrams lost on %s", n, clients*perClient, addr)
		}
		return clients * perClient / time.Since(begin).Seconds()
	}
	for b.Loop() {
		var stockRates, shimRates []float64
		for range 3 {
			stockRates = append(stockRates, roundTrips(stock))
			shimRates = append(shimRates, roundTrips(s.daemon))
		}
		slices.Sort(stockRates)
		slices.Sort(shimRates)
		stockRate, shimRate := stockRates[1], shimRates[1]
		b.ReportMetric(stockRate, "docker-proxy-rtt/s")
		b.ReportMetric(shimRate, "shim-rtt/s")
		b.ReportMetric(shimRate/stockRate, "udp-rate-ratio")
		b.Logf("UDP echo round trips per second (median of 3): docker-proxy %.0f, shim %.0f (%.2fx)", stockRate, shimRate, shimRate/stockRate)
	}
}

// proxyPids lists the processes whose program name ends in name and serve host port port.
func proxyPids(name string, port int) []int {
	return procsServing(port, func(_ int, argv0 string) bool { return strings.HasSuffix(argv0, name) })
}

func memKiB(pid int, file, field string) int {
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/%s", pid, file))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(status), "\n") {
		if strings.HasPrefix(line, field) {
			kib, _ := strconv.Atoi(strings.Fields(line)[1])
			return kib
		}
	}
	return 0
}
