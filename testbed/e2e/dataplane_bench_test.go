package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"testing"

	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
	"github.com/envoy-docker-shim/envoy-docker-shim/testbed/bench"
	"github.com/envoy-docker-shim/envoy-docker-shim/testbed/stack"
)

// BenchmarkDataPlane serves one echo container several ways and measures them interleaved in
// one run (bench.Run): straight to the container's IP; through the stock docker-proxy (the
// binary, with the arguments dockerd gives it); through Debian's nginx as a reverse proxy with
// upstream keep-alive and as many workers as Envoy has; through ours, as users get it (the shim
// as dockerd's userland proxy, the server and Envoy with every shipped default) in ProxyMode=tcp
// and ProxyMode=http; and through the kernel's DNAT (a daemon with "--userland-proxy=false" and
// "--iptables=true", in a network namespace of the benchmark's own so its rules never touch the
// host's). TCP mode needs the ProxyMode=tcp label, so it serves a twin container of the same
// image; the DNAT daemon has its own twin.
//
// It prints, and writes under bench-results/, a markdown table with ratios against docker-proxy
// and a PNG chart. `make bench-dataplane`; BENCH_ROUNDS, BENCH_DURATION, BENCH_BULK_MIB shorten it.
func BenchmarkDataPlane(b *testing.B) {
	cfg := bench.ConfigFromEnv(b)
	cfg.Reference = "docker-proxy"
	s := startOpts(b, testbed.Docker20, stack.Options{Shipped: true})
	labels := func(mode string) map[string]string {
		return map[string]string{"ServiceName": "bench", "EnvironmentName": mode, "ProxyMode": mode}
	}
	httpPort, tcpPort := testbed.FreePort(b), testbed.FreePort(b)
	web := s.daemon.Run(b, testbed.RunOptions{Publish: []string{fmt.Sprintf("127.0.0.1:%d:80", httpPort)}, Labels: labels("http")})
	webTCP := s.daemon.Run(b, testbed.RunOptions{Publish: []string{fmt.Sprintf("127.0.0.1:%d:80", tcpPort)}, Labels: labels("tcp")})
	upstream := netip.AddrPortFrom(web.IP, 80)

	stockPort := testbed.FreePort(b)
	stock := bench.StartDockerProxy(b, testbed.DockerProxyBinary(b), loopbackPort(stockPort), upstream)

	workers, err := bench.EnvoyWorkers(s.stack.Envoy.AdminAddr)
	if err != nil {
		b.Fatal(err)
	}
	nginxPort := testbed.FreePort(b)
	nginx := bench.StartNginx(b, loopbackPort(nginxPort), upstream, workers)

	envoy := s.stack.Envoy
	envoyAccount := bench.Processes("envoy", func() []int { return []int{envoy.Pid()} })
	shimAccount := func(port int) bench.Account {
		return bench.Processes("shim", func() []int { return s.shims(port) })
	}
	envoyRSS := func() (int64, error) { return bench.RSS(envoy.Pid()) }
	paths := []bench.Path{
		{Name: "direct to the container IP", Addr: upstream.String()},
		{Name: "docker-proxy", Addr: loopback(stockPort), Accounts: []bench.Account{bench.Processes("docker-proxy", stock.Pids)}, RSS: stock.RSS},
		{Name: "nginx (" + workersText(workers) + ")", Addr: loopback(nginxPort), Accounts: []bench.Account{bench.Processes("nginx", nginx.Pids)}, RSS: nginx.RSS,
			Note: "Debian's nginx, upstream keep-alive, no access log, as many workers as Envoy's; CPU and RSS of master and workers"},
		{Name: "ours, ProxyMode=tcp", Addr: loopback(tcpPort), Accounts: []bench.Account{envoyAccount, shimAccount(tcpPort)}, RSS: envoyRSS},
		{Name: "ours, ProxyMode=http", Addr: loopback(httpPort), Accounts: []bench.Account{envoyAccount, shimAccount(httpPort)}, RSS: envoyRSS,
			Note: "ours: proxy CPU and RSS are Envoy's; the shim's CPU is a column of its own"},
	}
	if dnat, ok := dnatPath(b); ok {
		paths = append(paths, dnat)
	}
	b.Logf("twin containers: http %s (%s), tcp %s (%s)", web.Name, web.IP, webTCP.Name, webTCP.IP)
	for b.Loop() {
		run, err := bench.Run(context.Background(), cfg, paths)
		if err != nil {
			b.Fatal(err)
		}
		bench.Write(b, "dataplane", "Data plane: one echo container, served several ways",
			fmt.Sprintf("Ours as shipped: Envoy with %s; nginx with as many worker processes.", workersText(workers)), cfg, run)
	}
}

// dnatPath is the kernel's DNAT, as dockerd sets it up without a userland proxy, in a network
// namespace of the benchmark's own: wrk and the download run there too, against its loopback.
func dnatPath(b *testing.B) (bench.Path, bool) {
	if v, _ := strconv.ParseBool(os.Getenv("BENCH_NO_DNAT")); v {
		b.Log("BENCH_NO_DNAT: no iptables DNAT path")
		return bench.Path{}, false
	}
	ns, err := testbed.NewNetns()
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ns.Close() })
	d := testbed.StartDaemon(b, testbed.DaemonOptions{NetNS: ns, ExtraArgs: []string{"--iptables=true", "--userland-proxy=false"}})
	port := testbed.FreePort(b)
	d.Run(b, testbed.RunOptions{Publish: []string{fmt.Sprintf("127.0.0.1:%d:80", port)}})
	return bench.Path{Name: "iptables DNAT (no userland proxy)", Addr: loopback(port), NetNS: ns,
		Note: "dockerd --userland-proxy=false --iptables=true in a network namespace of the benchmark's own (its rules never reach the host's); the kernel carries the traffic, so no process is charged"}, true
}

func loopback(port int) string { return "127.0.0.1:" + strconv.Itoa(port) }

func loopbackPort(port int) netip.AddrPort {
	return netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(port))
}
