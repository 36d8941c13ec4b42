package soak

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
	"github.com/envoy-docker-shim/envoy-docker-shim/testbed/stack"
)

const shimPkg = "github.com/envoy-docker-shim/envoy-docker-shim/shim/cmd/envoy-docker-shim"

// mode is one kind of published port the cycles take turns at.
type mode struct {
	name          string // http, tcp, udp
	containerPort int
	proto         string // of the -p mapping
	labels        map[string]string
}

var modes = []mode{
	{"http", 80, "tcp", map[string]string{"ServiceName": "soak-http", "EnvironmentName": "test", "ProxyMode": "http"}},
	{"tcp", 7, "tcp", map[string]string{"ServiceName": "soak-tcp", "EnvironmentName": "test", "ProxyMode": "tcp"}},
	{"udp", 7, "udp", map[string]string{"ServiceName": "soak-udp", "EnvironmentName": "test"}},
}

// arm is one daemon flavour under churn: the shim with its server and Envoy, or stock docker-proxy.
type arm struct {
	name   string
	proxy  string // program name of the userland proxy, to find leftovers
	d      *testbed.Daemon
	server *serverProc    // nil: no control plane
	envoy  *testbed.Envoy // nil: no Envoy
	cfg    config
}

// startShimArm starts a private dockerd whose userland proxy is the real shim, the server as its
// own binary, and a real Envoy with the appliance's bootstrap.
func startShimArm(t *testing.T, cfg config) *arm {
	shim := testbed.BuildStatic(t, shimPkg, "envoy-docker-shim")
	shimSocket := filepath.Join(t.TempDir(), "shim.sock")
	d := testbed.StartDaemon(t, testbed.DaemonOptions{UserlandProxyPath: shim, Env: []string{"EDS_SHIM_SOCKET=" + shimSocket}})
	s := startServer(t, d, shimSocket)
	e := stack.StartEnvoy(t, s.XDSAddr, stack.Options{})
	testbed.WaitFor(t, 15*time.Second, "envoy connected to the server", func() error {
		status, body, err := testbed.HTTPGet(context.Background(), "http://"+s.HTTPAddr+"/healthz")
		if err != nil || status != http.StatusOK {
			return fmt.Errorf("healthz %d %q %v", status, body, err)
		}
		return nil
	})
	return &arm{name: "envoy-docker-shim", proxy: "envoy-docker-shim", d: d, server: s, envoy: e, cfg: cfg}
}

func startDockerProxyArm(t *testing.T, cfg config) *arm {
	d := testbed.StartDaemon(t, testbed.DaemonOptions{})
	return &arm{name: "docker-proxy", proxy: "docker-proxy", d: d, cfg: cfg}
}

// cycleResult is one container's life: started, asked once, removed.
type cycleResult struct {
	i        int
	mode     string
	delay    time.Duration
	port     int
	startErr error
	startDur time.Duration
	firstErr error
	firstDur time.Duration
	resends  int // UDP datagrams sent again before the answer
	rmErr    error
	rmDur    time.Duration
}

// cycle runs cycle i: docker run -d, the first request as soon as that returns, docker rm -f.
// port is the host port to publish on, 0 to let dockerd choose.
func (a *arm) cycle(ctx context.Context, i, port int) cycleResult {
	m := modes[i%len(modes)]
	r := cycleResult{i: i, mode: m.name, port: port}
	if a.cfg.DelayMax > 0 {
		// Seeded per cycle, so a run's delays do not depend on which worker took which cycle.
		rng := rand.New(rand.NewPCG(a.cfg.Seed, uint64(i)))
		r.delay = time.Duration(rng.Int64N(int64(a.cfg.DelayMax) + 1)).Round(time.Millisecond)
	}
	publish := fmt.Sprintf("127.0.0.1:%d:%d/%s", port, m.containerPort, m.proto)
	if port == 0 {
		publish = fmt.Sprintf("127.0.0.1::%d/%s", m.containerPort, m.proto)
	}
	name := fmt.Sprintf("soak-%s-%d", m.name, i)
	started := time.Now()
	runCtx, cancel := context.WithTimeout(ctx, time.Minute)
	id, _, err := a.d.Start(runCtx, testbed.RunOptions{
		Name:    name,
		Publish: []string{publish},
		Labels:  m.labels,
		Env:     map[string]string{"ECHO_LISTEN_DELAY": r.delay.String()},
	})
	cancel()
	r.startDur = time.Since(started)
	if err == nil && port == 0 {
		r.port, err = a.publishedPort(ctx, id, m)
	}
	if err != nil {
		r.startErr = err
	} else if err := a.waitListening(ctx, id); err != nil {
		r.firstErr = err
	} else {
		first := time.Now()
		r.resends, r.firstErr = a.firstRequest(ctx, m, r.port, name)
		r.firstDur = time.Since(first)
	}
	// By name: a container whose start failed has no ID from docker run, but exists.
	removed := time.Now()
	rmCtx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if _, err := a.d.Docker(rmCtx, "rm", "-f", "-v", name); err != nil && (r.startErr == nil || !strings.Contains(err.Error(), "No such container")) {
		r.rmErr = err
	}
	r.rmDur = time.Since(removed)
	return r
}

// waitListening returns at once when the soak races the first request against the app's start,
// else once the app reports that it listens.
func (a *arm) waitListening(ctx context.Context, id string) error {
	if a.cfg.Race {
		return nil
	}
	if err := a.d.WaitEchoServing(ctx, id); err != nil {
		return fmt.Errorf("waiting for the app to listen: %w", err)
	}
	return nil
}

// publishedPort asks the Engine API which host port dockerd chose; the API answers in a
// millisecond where another docker CLI call would hold the first request back by tens.
func (a *arm) publishedPort(ctx context.Context, id string, m mode) (int, error) {
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", a.d.Socket)
		},
	}}
	defer client.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://docker/containers/"+id+"/json", nil)
	if err != nil {
		return 0, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, fmt.Errorf("inspecting %s for its host port: %w", id, err)
	}
	defer resp.Body.Close()
	var info struct {
		NetworkSettings struct {
			Ports map[string][]struct{ HostPort string }
		}
	}
	if err := json.NewDecoder(resp.Body).Decode(&info); err != nil {
		return 0, fmt.Errorf("inspecting %s for its host port: %w", id, err)
	}
	key := fmt.Sprintf("%d/%s", m.containerPort, m.proto)
	if b := info.NetworkSettings.Ports[key]; len(b) > 0 {
		return strconv.Atoi(b[0].HostPort)
	}
	return 0, fmt.Errorf("container %s publishes no %s: %v", id, key, info.NetworkSettings.Ports)
}

// udpResendEvery is how long the first UDP exchange waits for an answer before it sends the
// datagram again. A datagram that reaches a port nobody listens on yet is gone, whichever proxy
// carried it, so a UDP client resends; the soak does the same, counts the resends, and fails the
// exchange only when no answer comes within the app's longest start plus udpGrace.
const (
	udpResendEvery = 100 * time.Millisecond
	udpGrace       = 2 * time.Second
	// firstRequestTimeout bounds an HTTP or TCP first request: well past any bounded connect
	// retry, short of hiding a hang.
	firstRequestTimeout = 10 * time.Second
)

// firstRequest asks the new container once, through the published port, and checks that the
// container itself answered.
func (a *arm) firstRequest(ctx context.Context, m mode, port int, name string) (resends int, err error) {
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	switch m.name {
	case "http":
		ctx, cancel := context.WithTimeout(ctx, firstRequestTimeout)
		defer cancel()
		status, body, err := testbed.HTTPGet(ctx, "http://"+addr+"/first")
		if err != nil {
			return 0, err
		}
		var reply struct{ Name string }
		if status != http.StatusOK || json.Unmarshal([]byte(body), &reply) != nil || reply.Name != name {
			return 0, fmt.Errorf("status %d: %.120q", status, body)
		}
		return 0, nil
	case "tcp":
		ctx, cancel := context.WithTimeout(ctx, firstRequestTimeout)
		defer cancel()
		got, err := testbed.TCPEcho(ctx, addr, []byte("WHOAMI\n"))
		if err != nil {
			return 0, err
		}
		if string(got) != name+"\n" {
			return 0, fmt.Errorf("wrong reply %.120q", got)
		}
		return 0, nil
	default:
		return udpExchange(ctx, addr, name, a.cfg.DelayMax+udpGrace)
	}
}

func udpExchange(ctx context.Context, addr, name string, bound time.Duration) (resends int, err error) {
	ctx, cancel := context.WithTimeout(ctx, bound)
	defer cancel()
	c, err := testbed.Dial(ctx, "udp", addr)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	buf := make([]byte, 2048)
	var last error
	for sent := 0; ; sent++ {
		if ctx.Err() != nil {
			return sent - 1, fmt.Errorf("no answer to %d datagrams in %v (last: %v)", sent, bound, last)
		}
		slot := time.Now().Add(udpResendEvery)
		if dl, _ := ctx.Deadline(); dl.Before(slot) {
			slot = dl
		}
		if _, err := c.Write([]byte("WHOAMI")); err != nil {
			last = err
		} else {
			_ = c.SetReadDeadline(slot)
			n, err := c.Read(buf)
			if err == nil {
				if string(buf[:n]) != name {
					return sent, fmt.Errorf("wrong reply %.120q", buf[:n])
				}
				return sent, nil
			}
			last = err
		}
		// A refused datagram (ICMP port unreachable) returns at once: wait out the slot.
		time.Sleep(time.Until(slot))
	}
}

// leftovers is what remains once every container is gone.
type leftovers struct {
	Proxies       int // userland proxy processes
	Listeners     int // Envoy listeners added by the server
	Clusters      int // Envoy clusters added by the server
	Registrations int // registrations the server lists
	Containers    int // containers docker still has
	PortsBound    int // host ports of the cycles that cannot be bound again
}

func (l leftovers) total() int {
	return l.Proxies + l.Listeners + l.Clusters + l.Registrations + l.Containers + l.PortsBound
}

// leftovers counts what is left, waiting up to settle for teardown that is still under way; what
// remains then is counted, not waited for any longer. ports are the host ports the cycles used,
// with their protocols.
func (a *arm) leftovers(t *testing.T, settle time.Duration, ports map[int]string) (leftovers, []string) {
	var l leftovers
	var detail []string
	deadline := time.Now().Add(settle)
	for {
		l, detail = a.countLeftovers(t, ports)
		if l.total() == 0 || time.Now().After(deadline) {
			return l, detail
		}
		time.Sleep(250 * time.Millisecond)
	}
}

func (a *arm) countLeftovers(t *testing.T, ports map[int]string) (leftovers, []string) {
	var l leftovers
	var detail []string
	if pids := a.d.Processes(a.proxy); len(pids) > 0 {
		l.Proxies = len(pids)
		for _, pid := range pids {
			cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
			detail = append(detail, fmt.Sprintf("%s process %d: %s", a.proxy, pid, strings.ReplaceAll(strings.TrimRight(string(cmdline), "\x00"), "\x00", " ")))
		}
	}
	if a.envoy != nil {
		listeners, clusters := envoyDynamic(t, a.envoy)
		l.Listeners, l.Clusters = len(listeners), len(clusters)
		for _, n := range listeners {
			detail = append(detail, "envoy listener "+n)
		}
		for _, n := range clusters {
			detail = append(detail, "envoy cluster "+n)
		}
	}
	if a.server != nil {
		n, err := a.server.registrations(context.Background())
		if err != nil {
			t.Errorf("counting registrations: %v", err)
		}
		l.Registrations = n
		if n > 0 {
			detail = append(detail, fmt.Sprintf("%d registrations", n))
		}
	}
	ids := strings.Fields(a.d.MustDocker(t, "ps", "-aq"))
	l.Containers = len(ids)
	if len(ids) > 0 {
		detail = append(detail, "containers "+strings.Join(ids, " "))
	}
	for port, proto := range ports {
		if err := bindBriefly(proto, port); err != nil {
			l.PortsBound++
			detail = append(detail, fmt.Sprintf("host port %d/%s: %v", port, proto, err))
		}
	}
	return l, detail
}

// envoyDynamic lists the listeners and clusters Envoy got over xDS (the bootstrap's are static).
// A removed listener that only drains its last connections is gone from the configuration and
// its port is closed, so it is not counted.
func envoyDynamic(t *testing.T, e *testbed.Envoy) (listeners, clusters []string) {
	var dump struct {
		Configs []struct {
			DynamicListeners []struct {
				Name         string          `json:"name"`
				ActiveState  json.RawMessage `json:"active_state"`
				WarmingState json.RawMessage `json:"warming_state"`
			} `json:"dynamic_listeners"`
			DynamicActiveClusters []struct {
				Cluster struct {
					Name string `json:"name"`
				} `json:"cluster"`
			} `json:"dynamic_active_clusters"`
			DynamicWarmingClusters []struct {
				Cluster struct {
					Name string `json:"name"`
				} `json:"cluster"`
			} `json:"dynamic_warming_clusters"`
		} `json:"configs"`
	}
	if err := json.Unmarshal(e.Admin(t, "/config_dump"), &dump); err != nil {
		t.Fatalf("envoy /config_dump: %v", err)
	}
	for _, c := range dump.Configs {
		for _, l := range c.DynamicListeners {
			switch {
			case l.ActiveState != nil:
				listeners = append(listeners, l.Name)
			case l.WarmingState != nil:
				listeners = append(listeners, l.Name+" (warming)")
			}
		}
		for _, cl := range c.DynamicActiveClusters {
			clusters = append(clusters, cl.Cluster.Name)
		}
		for _, cl := range c.DynamicWarmingClusters {
			clusters = append(clusters, cl.Cluster.Name+" (warming)")
		}
	}
	return listeners, clusters
}

// bindBriefly reports whether the host port is free again on 127.0.0.1.
func bindBriefly(proto string, port int) error {
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	if proto == "udp" {
		pc, err := net.ListenPacket("udp", addr)
		if err != nil {
			return err
		}
		return pc.Close()
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	return ln.Close()
}

// run runs the cycles from..to-1, parallel at a time, and hands each result to record.
func (a *arm) run(ctx context.Context, from, to int, ports []int, record func(i int, r cycleResult)) {
	next := make(chan int)
	var wg sync.WaitGroup
	for range a.cfg.Parallel {
		wg.Go(func() {
			for i := range next {
				port := 0
				if ports != nil {
					port = ports[i]
				}
				record(i, a.cycle(ctx, i, port))
			}
		})
	}
	for i := from; i < to && ctx.Err() == nil; i++ {
		next <- i
	}
	close(next)
	wg.Wait()
}
