package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"runtime"
	"testing"

	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
	"github.com/envoy-docker-shim/envoy-docker-shim/testbed/bench"
	"github.com/envoy-docker-shim/envoy-docker-shim/testbed/stack"
)

// BenchmarkEnvoyDefaults measures what the defaults chosen for Envoy are worth, interleaved in one
// run against docker-proxy: ours as shipped (ENVOY_CONCURRENCY=auto, no access log) beside ours
// with one worker per CPU (Envoy's own default, which the appliance shipped before) and ours with
// the access log on (a container labelled AccessLog=true; Envoy's stdout goes to a file here, see
// BenchmarkApplianceDataPlane for Docker's logging), in both modes. The one-worker-per-CPU Envoy
// is a second server and Envoy on the same daemon, given the same containers' mappings directly.
func BenchmarkEnvoyDefaults(b *testing.B) {
	cfg := bench.ConfigFromEnv(b)
	cfg.Reference = "docker-proxy"
	s := startOpts(b, testbed.Docker20, stack.Options{Shipped: true})
	perCPU := stack.Start(b, stack.Options{DockerHost: s.daemon.Host, Concurrency: runtime.NumCPU()})
	shipped, err := bench.EnvoyWorkers(s.stack.Envoy.AdminAddr)
	if err != nil {
		b.Fatal(err)
	}
	if shipped == runtime.NumCPU() {
		b.Logf("the shipped worker count is one per CPU here (%d): the two Envoys are configured alike", shipped)
	}
	labels := func(mode, accessLog string) map[string]string {
		return map[string]string{"ServiceName": "bench", "EnvironmentName": mode, "ProxyMode": mode, "AccessLog": accessLog}
	}
	type published struct {
		c    *testbed.Container
		port int
	}
	run := func(mode, accessLog string) published {
		port := testbed.FreePort(b)
		c := s.daemon.Run(b, testbed.RunOptions{Publish: []string{fmt.Sprintf("127.0.0.1:%d:80", port)}, Labels: labels(mode, accessLog)})
		return published{c, port}
	}
	web, webTCP := run("http", ""), run("tcp", "")
	logged, loggedTCP := run("http", "true"), run("tcp", "true")
	// The same two containers through the one-worker-per-CPU Envoy.
	direct := func(p published) int {
		port := testbed.FreePort(b)
		if r, _ := perCPU.Register(b, stack.TCP(port, p.c.IP.String(), 80)); r.GetReady() == nil {
			b.Fatalf("registering %s with the second server: %v", p.c.Name, r)
		}
		return port
	}
	perCPUPort, perCPUTCPPort := direct(web), direct(webTCP)

	stockPort := testbed.FreePort(b)
	stock := bench.StartDockerProxy(b, testbed.DockerProxyBinary(b), loopbackPort(stockPort), netip.AddrPortFrom(web.c.IP, 80))
	envoyAccount := func(e *testbed.Envoy) []bench.Account {
		return []bench.Account{bench.Processes("envoy", func() []int { return []int{e.Pid()} })}
	}
	rss := func(e *testbed.Envoy) func() (int64, error) {
		return func() (int64, error) { return bench.RSS(e.Pid()) }
	}
	ours, second := s.stack.Envoy, perCPU.Envoy
	paths := []bench.Path{
		{Name: "docker-proxy", Addr: loopback(stockPort), Accounts: []bench.Account{bench.Processes("docker-proxy", stock.Pids)}, RSS: stock.RSS},
		{Name: "tcp, shipped (" + workersText(shipped) + ")", Addr: loopback(webTCP.port), Accounts: envoyAccount(ours), RSS: rss(ours)},
		{Name: "tcp, " + workersText(runtime.NumCPU()) + " (one per CPU)", Addr: loopback(perCPUTCPPort), Accounts: envoyAccount(second), RSS: rss(second)},
		{Name: "tcp, AccessLog=true", Addr: loopback(loggedTCP.port), Accounts: envoyAccount(ours), RSS: rss(ours)},
		{Name: "http, shipped (" + workersText(shipped) + ")", Addr: loopback(web.port), Accounts: envoyAccount(ours), RSS: rss(ours)},
		{Name: "http, " + workersText(runtime.NumCPU()) + " (one per CPU)", Addr: loopback(perCPUPort), Accounts: envoyAccount(second), RSS: rss(second)},
		{Name: "http, AccessLog=true", Addr: loopback(logged.port), Accounts: envoyAccount(ours), RSS: rss(ours),
			Note: "the access log goes to Envoy's stdout, a file here; it also carries a request ID, which Envoy then generates"},
	}
	for b.Loop() {
		run, err := bench.Run(context.Background(), cfg, paths)
		if err != nil {
			b.Fatal(err)
		}
		bench.Write(b, "envoy-defaults", "What Envoy's defaults are worth", "The same containers through each.", cfg, run)
	}
}

func workersText(n int) string {
	if n == 1 {
		return "1 worker"
	}
	return fmt.Sprintf("%d workers", n)
}
