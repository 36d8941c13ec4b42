package ranges

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/shim/idle"
	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
	"github.com/envoy-docker-shim/envoy-docker-shim/testbed/bench"
	"github.com/envoy-docker-shim/envoy-docker-shim/testbed/stack"
)

const (
	shimPkg   = "github.com/envoy-docker-shim/envoy-docker-shim/shim/cmd/envoy-docker-shim"
	serverPkg = "github.com/envoy-docker-shim/envoy-docker-shim/services/cmd/envoy-docker-server"
	// containerBase is the first container port of the range; the echo server serves HTTP on all.
	containerBase = 10000
)

// BenchmarkPortRange publishes N ports from one container (`docker run -d -p
// 127.0.0.1:lo-hi:10000-...`, the echo image serving HTTP on every one, default labels, so
// Envoy's default HTTP mode) under each daemon generation, alternately with that generation's
// stock docker-proxy and with envoy-docker-shim (its server and Envoy as separate processes, with
// their shipped defaults), and reports the wall time of `docker run` and of `docker rm -f`, the
// memory of every proxy process (RSS, PSS, USS) once the ports are up and idle, the growth of
// Envoy and the server per port, and what is left after `docker rm -f`.
//
// BENCH_RANGE_PORTS picks the port counts (default 10,200,1000), BENCH_ROUNDS the rounds (3),
// BENCH_RANGE_SETTLE the idle time before the memory is read (2s); EDS_TESTBED_DOCKER the
// generations. The report goes to bench-results/ranges-<time>.md (and .png).
func BenchmarkPortRange(b *testing.B) {
	sizes := portCounts(b)
	rounds := roundsFromEnv(b)
	settle := 2 * time.Second
	if v := os.Getenv("BENCH_RANGE_SETTLE"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < 0 || d > time.Minute {
			b.Fatalf("BENCH_RANGE_SETTLE=%q: want a duration up to 1m", v)
		}
		settle = d
	}
	loadBefore := bench.LoadAverage()
	var all []Series
	for _, gen := range testbed.Generations(b) {
		b.Run(string(gen), func(b *testing.B) {
			for b.Loop() {
				all = append(all, benchmarkGeneration(b, gen, sizes, rounds, settle)...)
			}
		})
	}
	if len(all) == 0 {
		return
	}
	write(b, all, rounds, settle, loadBefore)
}

func portCounts(b *testing.B) []int {
	v := os.Getenv("BENCH_RANGE_PORTS")
	if v == "" {
		return []int{10, 200, 1000}
	}
	var out []int
	for f := range strings.SplitSeq(v, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 || n > 5000 {
			b.Fatalf("BENCH_RANGE_PORTS=%q: want a comma-separated list of counts from 1 to 5000", v)
		}
		out = append(out, n)
	}
	return out
}

func roundsFromEnv(b *testing.B) int {
	v := os.Getenv("BENCH_ROUNDS")
	if v == "" {
		return 3
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 {
		b.Fatalf("BENCH_ROUNDS=%q: want a positive number", v)
	}
	return n
}

func logf(format string, args ...any) { fmt.Printf("bench-ranges: "+format+"\n", args...) }

// path is one userland proxy under test: a daemon and, for ours, the server and Envoy.
type path struct {
	name    string
	proxy   string // the proxy's program name
	daemon  *testbed.Daemon
	server  *serverProc
	envoy   *testbed.Envoy
	hostLos map[int]int // port count -> first host port of its range, leased for the benchmark
}

func benchmarkGeneration(b *testing.B, gen testbed.Generation, sizes []int, rounds int, settle time.Duration) []Series {
	stock := &path{name: Reference, proxy: "docker-proxy", daemon: testbed.StartDaemon(b, testbed.DaemonOptions{Generation: gen})}
	shim := testbed.BuildStatic(b, shimPkg, "envoy-docker-shim")
	socket := filepath.Join(b.TempDir(), "shim.sock")
	ours := &path{name: "ours", proxy: "envoy-docker-shim", daemon: testbed.StartDaemon(b, testbed.DaemonOptions{
		Generation: gen, UserlandProxyPath: shim, Env: []string{"EDS_SHIM_SOCKET=" + socket},
	})}
	ours.server = startServer(b, ours.daemon, socket)
	ours.envoy = stack.StartEnvoy(b, ours.server.XDSAddr, stack.Options{Shipped: true})
	testbed.WaitFor(b, 15*time.Second, "envoy connected to the server", func() error {
		status, body, err := testbed.HTTPGet(context.Background(), "http://"+ours.server.HTTPAddr+"/healthz")
		if err != nil || status != 200 {
			return fmt.Errorf("healthz %d %q %v", status, body, err)
		}
		return nil
	})
	for _, p := range []*path{stock, ours} {
		p.daemon.EchoImage(b)
		p.hostLos = map[int]int{}
		for _, n := range sizes {
			p.hostLos[n] = testbed.FreePortRange(b, n)
		}
	}
	var out []Series
	for _, n := range sizes {
		series := map[string]*Series{}
		for _, p := range []*path{stock, ours} {
			series[p.name] = &Series{Generation: string(gen), Path: p.name, Ports: n}
		}
		for round := range rounds {
			for _, p := range []*path{stock, ours} {
				x := measure(b, p, n, settle)
				logf("%s, %d ports, %s, round %d: docker run %v, %d procs, PSS %s MiB, USS %s MiB, docker rm -f %v, left %v; CPU during docker run: %v",
					gen, n, p.name, round+1, x.Run.Round(time.Millisecond), x.Procs, mib(x.Proxies.PSS), mib(x.Proxies.USS), x.Remove.Round(time.Millisecond), x.Left, x.CPU)
				series[p.name].Samples = append(series[p.name].Samples, x)
				if p.server != nil {
					n, docker, envoy := p.server.breakdown()
					logf("  the server's %d registrations: Docker API %.0f µs, Envoy's acknowledgement %.0f µs (medians); push to ACK so far (means): %s",
						n, docker, envoy, p.server.pushToAck(b))
				}
			}
		}
		for _, p := range []*path{stock, ours} {
			out = append(out, *series[p.name])
		}
		sumStock, sumOurs := Summarize(*series[stock.name]), Summarize(*series[ours.name])
		tag := fmt.Sprintf("%s-%d-", gen, n)
		b.ReportMetric(sumStock.Run.Seconds(), tag+"docker-proxy-run-s")
		b.ReportMetric(sumOurs.Run.Seconds(), tag+"ours-run-s")
		b.ReportMetric(sumOurs.Run.Seconds()/sumStock.Run.Seconds(), tag+"run-ratio")
		b.ReportMetric(float64(sumOurs.Proxies.PSS)/float64(max(sumStock.Proxies.PSS, 1)), tag+"pss-ratio")
	}
	return out
}

// measure runs one container publishing n ports on p, measures, and removes it.
func measure(b *testing.B, p *path, n int, settle time.Duration) Sample {
	ctx := context.Background()
	lo := p.hostLos[n]
	publish := fmt.Sprintf("127.0.0.1:%d-%d:%d-%d", lo, lo+n-1, containerBase, containerBase+n-1)
	opts := testbed.RunOptions{
		Publish: []string{publish},
		Labels:  map[string]string{"ServiceName": "range", "EnvironmentName": "bench"},
		Env:     map[string]string{"ECHO_HTTP_PORTS": fmt.Sprintf("%d-%d", containerBase, containerBase+n-1)},
	}
	var x Sample
	var envoyBefore, serverBefore bench.Memory
	var base counts
	if p.server != nil {
		x.HasStack = true
		envoyBefore = memoryOf(b, p.envoy.Pid())
		serverBefore = memoryOf(b, p.server.pid)
		base = stackCounts(b, p)
	}
	stopPerf := perfRecord(b, p, n)
	cpuBefore := cpuOf(p)
	start := time.Now()
	id, _, err := p.daemon.Start(ctx, opts)
	x.Run = time.Since(start)
	x.CPU = cpuOf(p).sub(cpuBefore)
	stopPerf()
	if err != nil {
		b.Fatalf("docker run -p %s on %s: %v", publish, p.name, err)
	}
	if p.server != nil {
		x.EnvoyAll = waitEnvoyListens(b, p, base, n, start)
		x.AllIdle = waitAllIdle(b, p, n, start)
	}
	if err := p.daemon.WaitEchoServing(ctx, id); err != nil {
		b.Fatal(err)
	}
	// Every port answers, through this path, from the container: checked at both ends and the middle.
	for _, port := range slices.Compact([]int{lo, lo + n/2, lo + n - 1}) {
		status, _, err := testbed.HTTPGet(ctx, fmt.Sprintf("http://127.0.0.1:%d/", port))
		if err != nil || status != 200 {
			b.Fatalf("%s: port %d of the range does not reach the container: %d %v", p.name, port, status, err)
		}
	}
	time.Sleep(settle)
	pids := p.daemon.Processes(p.proxy)
	x.Procs = len(pids)
	x.Proxies, _ = bench.MemoryOfAll(pids)
	if p.server != nil {
		x.Envoy = memoryOf(b, p.envoy.Pid()).Sub(envoyBefore)
		x.Server = memoryOf(b, p.server.pid).Sub(serverBefore)
	}
	start = time.Now()
	if _, err := p.daemon.Docker(ctx, "rm", "-f", "-v", id); err != nil {
		b.Fatalf("docker rm -f on %s: %v", p.name, err)
	}
	x.Remove = time.Since(start)
	x.Left = leftovers(b, p, base, lo, n)
	time.Sleep(time.Second)
	x.Later = leftovers(b, p, base, lo, n)
	return x
}

// waitEnvoyListens waits until Envoy's active listeners grew by n since base, and returns the time
// since start.
func waitEnvoyListens(b *testing.B, p *path, base counts, n int, start time.Time) time.Duration {
	deadline := time.Now().Add(2 * time.Minute)
	for {
		v, ok := p.envoy.Stat(b, "listener_manager.total_listeners_active")
		if ok && int(v)-base.listeners >= n {
			return time.Since(start)
		}
		if time.Now().After(deadline) {
			b.Fatalf("%s: Envoy listens on %d of %d ports 2 minutes after docker run", p.name, int(v)-base.listeners, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitAllIdle waits until each of the n shims went idle (package idle) after steering its port to
// Envoy: idle through the idle program's memfd, which a shim the fast start left idle reaches once
// the server's Served woke it (one every 10 ms) and it steered. Their memory is then what the host
// keeps paying. (Idle alone is no such point: a woken shim steers and goes idle again in a few
// milliseconds, so every shim is idle now and then while most have yet to be woken.) It returns
// the time since start.
func waitAllIdle(b *testing.B, p *path, n int, start time.Time) time.Duration {
	deadline := time.Now().Add(2 * time.Minute)
	for {
		idled := 0
		for _, pid := range p.daemon.Processes(p.proxy) {
			exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
			if idle.Running(pid) && strings.Contains(exe, "memfd:") {
				idled++
			}
		}
		if idled >= n {
			return time.Since(start)
		}
		if time.Now().After(deadline) {
			b.Fatalf("%s: %d of %d shims steered and idle 2 minutes after docker run", p.name, idled, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// perfRecord profiles the server and Envoy with perf while `docker run` runs, once per port
// count, when BENCH_RANGE_PERF names a directory: perf-<server|envoy>-<n>.data there.
func perfRecord(b *testing.B, p *path, n int) func() {
	dir := os.Getenv("BENCH_RANGE_PERF")
	if dir == "" || p.server == nil {
		return func() {}
	}
	var cmds []*exec.Cmd
	for name, pid := range map[string]int{"server": p.server.pid, "envoy": p.envoy.Pid()} {
		out := filepath.Join(dir, fmt.Sprintf("perf-%s-%d.data", name, n))
		if _, err := os.Stat(out); err == nil {
			continue // once per port count
		}
		cmd := exec.Command("perf", "record", "-F", "2000", "-g", "-o", out, "-p", strconv.Itoa(pid))
		if err := cmd.Start(); err != nil {
			b.Logf("perf: %v", err)
			continue
		}
		cmds = append(cmds, cmd)
	}
	time.Sleep(300 * time.Millisecond) // perf attaches
	return func() {
		for _, cmd := range cmds {
			_ = cmd.Process.Signal(os.Interrupt)
			_ = cmd.Wait()
		}
	}
}

// cpuOf is the CPU time dockerd, the proxies, Envoy and the server have used so far (a
// process's CPU time survives its exec into the idle program; a proxy that exited is not counted).
func cpuOf(p *path) CPU {
	var c CPU
	c.Dockerd = onCPU(p.daemon.Pid())
	for _, pid := range p.daemon.Processes(p.proxy) {
		c.Proxies += onCPU(pid)
	}
	if p.server != nil {
		c.Envoy = onCPU(p.envoy.Pid())
		c.Server = onCPU(p.server.pid)
	}
	return c
}

// onCPU is the CPU time of a process: the run time of its live threads in nanoseconds
// (/proc/PID/task/*/schedstat; a proxy's start-up takes less than one 10 ms tick), or its ticks in
// /proc/PID/stat, which also count the threads that are gone (a shim's, once it went idle),
// whichever is larger.
func onCPU(pid int) time.Duration {
	read := func(path string) time.Duration {
		b, err := os.ReadFile(path)
		if err != nil {
			return 0
		}
		f := strings.Fields(string(b))
		if len(f) == 0 {
			return 0
		}
		ns, _ := strconv.ParseInt(f[0], 10, 64)
		return time.Duration(ns)
	}
	var threads time.Duration
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/schedstat", pid))
	for _, t := range tasks {
		threads += read(t)
	}
	ticks, _ := bench.CPUTime(pid)
	return max(threads, ticks)
}

func memoryOf(b *testing.B, pid int) bench.Memory {
	m, err := bench.MemoryOf(pid)
	if err != nil {
		b.Fatalf("memory of %d: %v", pid, err)
	}
	return m
}

// counts is what Envoy and the server hold, to compare with before the run.
type counts struct{ listeners, draining, clusters, registrations int }

func stackCounts(b *testing.B, p *path) counts {
	stat := func(name string) int {
		v, ok := p.envoy.Stat(b, name)
		if !ok {
			b.Fatalf("envoy has no stat %s", name)
		}
		return int(v)
	}
	return counts{
		listeners:     stat("listener_manager.total_listeners_active") + stat("listener_manager.total_listeners_warming"),
		draining:      stat("listener_manager.total_listeners_draining"),
		clusters:      stat("cluster_manager.active_clusters") + stat("cluster_manager.warming_clusters"),
		registrations: p.server.registrations(b),
	}
}

func leftovers(b *testing.B, p *path, base counts, lo, n int) Leftovers {
	l := Leftovers{Procs: len(p.daemon.Processes(p.proxy)), Sockets: listening(lo, n), Listeners: -1, Draining: -1, Clusters: -1, Registrations: -1}
	if p.server != nil {
		now := stackCounts(b, p)
		l.Listeners, l.Draining = now.listeners-base.listeners, now.draining-base.draining
		l.Clusters, l.Registrations = now.clusters-base.clusters, now.registrations-base.registrations
	}
	return l
}

// listening counts the TCP sockets listening on a port in [lo, lo+n), from /proc/net/tcp and tcp6.
func listening(lo, n int) int {
	count := 0
	for _, file := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		b, _ := os.ReadFile(file)
		for line := range strings.SplitSeq(string(b), "\n") {
			f := strings.Fields(line)
			if len(f) < 4 || f[3] != "0A" { // TCP_LISTEN
				continue
			}
			_, portHex, ok := strings.Cut(f[1], ":")
			port, err := strconv.ParseUint(portHex, 16, 16)
			if ok && err == nil && int(port) >= lo && int(port) < lo+n {
				count++
			}
		}
	}
	return count
}

func write(b *testing.B, all []Series, rounds int, settle time.Duration, loadBefore string) {
	sums := make([]Summary, len(all))
	for i, s := range all {
		sums[i] = Summarize(s)
	}
	var doc strings.Builder
	fmt.Fprintf(&doc, "# Port ranges: `docker run -p` of N ports, docker-proxy and ours\n\nMachine: %s; load average (1, 5, 15 min) %s before the run, %s after.\n\n", bench.Machine(), loadBefore, bench.LoadAverage())
	fmt.Fprintf(&doc, "One container (the echo image, HTTP on every container port, default labels: Envoy's HTTP mode) publishing `127.0.0.1:lo-hi:%d-...`; "+
		"each generation's own docker-proxy against envoy-docker-shim with its server and Envoy (shipped defaults) as processes of their own; "+
		"%d rounds, alternating, medians (leftovers: the worst round). Memory is read %v after the ports answer and every shim steered its port to Envoy and went idle: the sum over every proxy process of "+
		"RSS, PSS and USS from /proc/PID/smaps_rollup; Envoy's and the server's growth from before `docker run`, per port. Ratios against docker-proxy.\n\n", containerBase, rounds, settle)
	doc.WriteString(Markdown(sums))
	doc.WriteString("Every round:\n\n")
	doc.WriteString(Rounds(all))
	fmt.Printf("\n%s\n", doc.String())
	dir, err := bench.ResultsDirectory()
	if err != nil {
		b.Logf("report not written: %v", err)
		return
	}
	md := filepath.Join(dir, "ranges-"+time.Now().Format("20060102-150405")+".md")
	if err := os.WriteFile(md, []byte(doc.String()), 0o644); err != nil {
		b.Logf("report not written: %v", err)
		return
	}
	summaries, panels := Panels(sums)
	if chart, err := bench.Chart("port ranges: docker run -p of n ports", summaries, "", panels); err == nil {
		_ = os.WriteFile(strings.TrimSuffix(md, ".md")+".png", chart, 0o644)
	}
	fmt.Printf("report: %s (and .png)\n", md)
}

// serverProc is envoy-docker-server as a process of its own, so that its memory is its own.
type serverProc struct {
	HTTPAddr, XDSAddr string
	LogPath           string
	pid               int
	exited            chan struct{}
	logRead           int64 // how much of the log breakdown has read
}

// breakdown is where the server says the registrations logged since the last call spent their
// time (medians, µs): the Docker API, and Envoy's acknowledgement.
func (s *serverProc) breakdown() (n int, docker, envoy float64) {
	b, err := os.ReadFile(s.LogPath)
	if err != nil || int64(len(b)) < s.logRead {
		return 0, 0, 0
	}
	fresh := b[s.logRead:]
	s.logRead = int64(len(b))
	var dockerUS, envoyUS []float64
	for line := range strings.SplitSeq(string(fresh), "\n") {
		var rec struct {
			Msg    string  `json:"msg"`
			Docker float64 `json:"docker_us"`
			Envoy  float64 `json:"envoy_us"`
		}
		if json.Unmarshal([]byte(line), &rec) != nil || rec.Msg != "ready" {
			continue
		}
		dockerUS = append(dockerUS, rec.Docker)
		envoyUS = append(envoyUS, rec.Envoy)
	}
	return len(dockerUS), bench.Median(dockerUS), bench.Median(envoyUS)
}

func startServer(b *testing.B, d *testbed.Daemon, shimSocket string) *serverProc {
	bin := testbed.BuildStatic(b, serverPkg, "envoy-docker-server")
	dir := b.TempDir()
	s := &serverProc{
		HTTPAddr: net.JoinHostPort("127.0.0.1", strconv.Itoa(testbed.FreePort(b))),
		XDSAddr:  net.JoinHostPort("127.0.0.1", strconv.Itoa(testbed.FreePort(b))),
		exited:   make(chan struct{}),
	}
	logPath := filepath.Join(dir, "server.log")
	s.LogPath = logPath
	logFile, err := os.Create(logPath)
	if err != nil {
		b.Fatal(err)
	}
	defer logFile.Close()
	cmd := d.Command(bin)
	cmd.Env = append(cmd.Env,
		"EDS_SHIM_SOCKET="+shimSocket,
		"EDS_SOCKET="+filepath.Join(dir, "server.sock"),
		"EDS_XDS_ADDR="+s.XDSAddr,
		"EDS_HTTP_ADDR="+s.HTTPAddr,
		"DOCKER_HOST="+d.Host,
		"EDS_RESTART_GRACE=0s", // nothing to restore: answer Envoy at once
	)
	cmd.Env = append(cmd.Env, testbed.ServerHostEnv(b, d)...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		b.Fatalf("starting %s: %v", bin, err)
	}
	s.pid = cmd.Process.Pid
	go func() { _ = cmd.Wait(); close(s.exited) }()
	b.Cleanup(func() {
		_ = syscall.Kill(s.pid, syscall.SIGTERM)
		select {
		case <-s.exited:
		case <-time.After(10 * time.Second):
			_ = syscall.Kill(s.pid, syscall.SIGKILL)
			<-s.exited
		}
		if b.Failed() {
			log, _ := os.ReadFile(logPath)
			b.Logf("server log (last 4 KiB):\n%s", log[max(0, len(log)-4096):])
		}
	})
	testbed.WaitFor(b, 15*time.Second, "the server's shim socket", func() error {
		select {
		case <-s.exited:
			log, _ := os.ReadFile(logPath)
			b.Fatalf("envoy-docker-server exited during start; its log:\n%s", log)
		default:
		}
		c, err := net.Dial("unixpacket", shimSocket)
		if err != nil {
			return err
		}
		return c.Close()
	})
	return s
}

// pushToAck is the mean time from a push to Envoy's answer, by resource type, from the server's
// eds_xds_push_to_ack_seconds histogram (since the server started).
func (s *serverProc) pushToAck(b *testing.B) string {
	status, body, err := testbed.HTTPGet(context.Background(), "http://"+s.HTTPAddr+"/metrics")
	if err != nil || status != 200 {
		b.Fatalf("server /metrics: %d %v", status, err)
	}
	sums, counts := map[string]float64{}, map[string]float64{}
	for line := range strings.SplitSeq(body, "\n") {
		for suffix, into := range map[string]map[string]float64{"_sum{": sums, "_count{": counts} {
			rest, ok := strings.CutPrefix(line, "eds_xds_push_to_ack_seconds"+suffix)
			if !ok {
				continue
			}
			labels, value, ok := strings.Cut(rest, "} ")
			if !ok {
				continue
			}
			v, _ := strconv.ParseFloat(strings.TrimSpace(value), 64)
			into[labels] = v
		}
	}
	var parts []string
	for labels, n := range counts {
		if n > 0 {
			parts = append(parts, fmt.Sprintf("%s %.0f µs", labels, sums[labels]/n*1e6))
		}
	}
	slices.Sort(parts)
	return strings.Join(parts, ", ")
}

// registrations is the server's eds_registrations gauge.
func (s *serverProc) registrations(b *testing.B) int {
	status, body, err := testbed.HTTPGet(context.Background(), "http://"+s.HTTPAddr+"/metrics")
	if err != nil || status != 200 {
		b.Fatalf("server /metrics: %d %v", status, err)
	}
	sc := bufio.NewScanner(strings.NewReader(body))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "eds_registrations "); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err != nil {
				b.Fatalf("eds_registrations %q: %v", v, err)
			}
			return int(f)
		}
	}
	b.Fatal("the server's /metrics has no eds_registrations")
	return 0
}
