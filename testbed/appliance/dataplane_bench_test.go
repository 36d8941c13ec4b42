package appliance

import (
	"context"
	"fmt"
	"net/netip"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
	"github.com/envoy-docker-shim/envoy-docker-shim/testbed/bench"
)

// BenchmarkApplianceDataPlane is BenchmarkDataPlane through the compose appliance as users run it:
// the images built from this repository, compose.yaml's defaults, Envoy in its container with its
// stdout going to Docker's log driver. Besides Envoy's CPU (its container's cgroup) it charges
// Docker's: dockerd, its containerd and the containerd shims of the daemon, which carry Envoy's
// stdout when an access log is on. The stock docker-proxy (run as dockerd runs it) serves the same
// echo container for the ratios; TCP mode serves a twin with the ProxyMode=tcp label, and a third
// twin with AccessLog=true shows what the access log costs through Docker's logging.
func BenchmarkApplianceDataPlane(b *testing.B) {
	cfg := bench.ConfigFromEnv(b)
	cfg.Reference = "docker-proxy"
	a := Start(b, Options{Shipped: true})
	if !a.HasShim {
		b.Fatalf("the shim (%s) is missing from the installer image", ShimPackage)
	}
	d := a.Daemon
	publish := func(labels map[string]string) (*testbed.Container, int) {
		port := testbed.FreePort(b)
		return d.Run(b, testbed.RunOptions{Publish: []string{fmt.Sprintf("127.0.0.1:%d:80", port)}, Labels: labels}), port
	}
	web, httpPort := publish(map[string]string{"ServiceName": "bench", "EnvironmentName": "http"})
	_, tcpPort := publish(map[string]string{"ServiceName": "bench", "EnvironmentName": "tcp", "ProxyMode": "tcp"})
	_, loggedPort := publish(map[string]string{"ServiceName": "bench", "EnvironmentName": "logged", "AccessLog": "true"})
	upstream := netip.AddrPortFrom(web.IP, 80)
	stockPort := testbed.FreePort(b)
	stock := bench.StartDockerProxy(b, testbed.DockerProxyBinary(b), netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(stockPort)), upstream)

	// The Envoy container runs the entrypoint and, as its child, Envoy.
	envoyInit := containerPid(b, a, a.Container(b, "envoy"))
	envoyPids := func() []int { return append([]int{envoyInit}, bench.Children(envoyInit)...) }
	envoyPid := func() int {
		for _, c := range bench.Children(envoyInit) {
			return c
		}
		return envoyInit
	}
	envoy := bench.Processes("envoy", envoyPids)
	envoyRSS := func() (int64, error) { return bench.RSS(envoyPid()) }
	namespace := "eds-" + filepath.Base(d.Root)
	docker := bench.Account{Name: "docker", CPU: bench.ProcessCPU(func() []int {
		pids := append([]int{d.Pid()}, bench.Children(d.Pid())...) // and its containerd
		return append(pids, bench.PidsOf("containerd-shim-runc-v2", namespace)...)
	})}
	shim := func(port int) bench.Account {
		return bench.Processes("shim", func() []int {
			return bench.PidsRunning(filepath.Base(a.ShimPath), "\x00-host-port\x00"+strconv.Itoa(port)+"\x00")
		})
	}
	loopback := func(port int) string { return "127.0.0.1:" + strconv.Itoa(port) }
	paths := []bench.Path{
		{Name: "direct to the container IP", Addr: upstream.String()},
		{Name: "docker-proxy", Addr: loopback(stockPort), RSS: stock.RSS,
			Accounts: []bench.Account{bench.Processes("docker-proxy", stock.Pids), docker}},
		{Name: "appliance, ProxyMode=tcp", Addr: loopback(tcpPort), RSS: envoyRSS, Accounts: []bench.Account{envoy, shim(tcpPort), docker}},
		{Name: "appliance, ProxyMode=http", Addr: loopback(httpPort), RSS: envoyRSS, Accounts: []bench.Account{envoy, shim(httpPort), docker}},
		{Name: "appliance, http, AccessLog=true", Addr: loopback(loggedPort), RSS: envoyRSS, Accounts: []bench.Account{envoy, shim(loggedPort), docker},
			Note: "the access log goes to Envoy's stdout, through containerd's shim to dockerd's json-file log driver: the docker column"},
	}
	workers, err := bench.EnvoyWorkers(a.AdminAddr)
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		run, err := bench.Run(context.Background(), cfg, paths)
		if err != nil {
			b.Fatal(err)
		}
		bench.Write(b, "appliance-dataplane", "Data plane through the compose appliance",
			fmt.Sprintf("compose.yaml's defaults: Envoy with %d worker(s); proxy CPU is the Envoy container's processes (entrypoint and Envoy); docker = dockerd, its containerd and the daemon's containerd shims (their healthchecks every 5 s included).",
				workers), cfg, run)
	}
}

// containerPid is the host PID of a container's first process.
func containerPid(b *testing.B, a *Appliance, id string) int {
	pid, err := strconv.Atoi(a.Daemon.MustDocker(b, "inspect", "-f", "{{.State.Pid}}", id))
	if err != nil || pid <= 0 {
		b.Fatalf("container %s: pid %d, %v", id, pid, err)
	}
	return pid
}
