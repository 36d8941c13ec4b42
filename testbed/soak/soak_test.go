// Package soak churns published ports the way a busy Docker host does, and counts what goes
// wrong and what is left behind.
//
// Each cycle is one container, published on 127.0.0.1 with ServiceName/EnvironmentName labels, in
// turn in ProxyMode http, in ProxyMode tcp and on a UDP port: `docker run -d`, a first request
// sent the moment that returns (HTTP GET, TCP echo, UDP echo), `docker rm -f`. The app in the
// container may wait up to SOAK_DELAY_MAX before it listens, so the first request races its
// start. Cycles run SOAK_PARALLEL at a time beside a steady keep-alive HTTP load on another
// published port. The shim runs as dockerd's userland proxy with the server as its own binary and
// a real Envoy; the same cycles then run on a stock docker-proxy daemon for comparison
// (SOAK_DOCKER_PROXY), and the two are printed side by side.
//
// Counted: failed starts, failed first requests, steady-load errors, leftovers (proxy processes,
// Envoy listeners and clusters, registrations, containers, host ports still bound), and the
// server's goroutines and heap before and after. For the shim any of those off target fails the
// test; docker-proxy is only reported.
//
// `make test` runs it with the defaults below (20 cycles, 2 at a time); `make soak` runs the long
// version. See the Makefile and the README's testing section.
package soak

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kelseyhightower/envconfig"

	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
)

// config is the soak's settings, from SOAK_* environment variables; the defaults are the short
// run that `make test` includes: the first request races apps that listen up to 300 ms late,
// which only Envoy's bounded connect retries (EDS_CONNECT_RETRY_WINDOW) make pass.
type config struct {
	Cycles   int           `envconfig:"CYCLES" default:"20"`
	Parallel int           `envconfig:"PARALLEL" default:"2"`
	DelayMax time.Duration `envconfig:"DELAY_MAX" default:"300ms"`
	// Race sends the first request the moment docker run returns; false waits until the app
	// reports that it listens (to look at churn alone).
	Race           bool          `envconfig:"RACE" default:"true"`
	DockerProxy    bool          `envconfig:"DOCKER_PROXY" default:"false"`
	HostPorts      string        `envconfig:"HOST_PORTS" default:"leased"`
	SteadyClients  int           `envconfig:"STEADY_CLIENTS" default:"2"`
	SteadyInterval time.Duration `envconfig:"STEADY_INTERVAL" default:"20ms"`
	Settle         time.Duration `envconfig:"SETTLE" default:"30s"`
	Results        string        `envconfig:"RESULTS"`
	Seed           uint64        `envconfig:"SEED"`
}

func configFromEnv() (config, error) {
	var c config
	if err := envconfig.Process("SOAK", &c); err != nil {
		return config{}, fmt.Errorf("soak configuration: %w", err)
	}
	return c, c.validate()
}

func (c config) validate() error {
	var problems []string
	if c.Cycles < 1 || c.Parallel < 1 || c.Parallel > 32 || c.Cycles < c.Parallel {
		problems = append(problems, fmt.Sprintf("SOAK_CYCLES=%d and SOAK_PARALLEL=%d: want 1 <= SOAK_PARALLEL <= 32 and SOAK_CYCLES >= SOAK_PARALLEL", c.Cycles, c.Parallel))
	}
	if c.DelayMax < 0 || c.DelayMax > 10*time.Second {
		problems = append(problems, fmt.Sprintf("SOAK_DELAY_MAX=%v: want a duration from 0 to 10s, e.g. 300ms", c.DelayMax))
	}
	if c.HostPorts != "leased" && c.HostPorts != "docker" {
		problems = append(problems, fmt.Sprintf("SOAK_HOST_PORTS=%q: want leased (-p 127.0.0.1:PORT:80 with a port leased below the ephemeral range) or docker (-p 127.0.0.1::80, dockerd chooses)", c.HostPorts))
	}
	if c.SteadyClients < 1 || c.SteadyClients > 16 {
		problems = append(problems, fmt.Sprintf("SOAK_STEADY_CLIENTS=%d: want 1 to 16", c.SteadyClients))
	}
	if c.SteadyInterval < time.Millisecond {
		problems = append(problems, fmt.Sprintf("SOAK_STEADY_INTERVAL=%v: want at least 1ms", c.SteadyInterval))
	}
	if c.Settle < time.Second {
		problems = append(problems, fmt.Sprintf("SOAK_SETTLE=%v: want at least 1s", c.Settle))
	}
	if len(problems) > 0 {
		return fmt.Errorf("soak configuration: %s", strings.Join(problems, "; "))
	}
	return nil
}

func TestSoak(t *testing.T) {
	cfg, err := configFromEnv()
	if err != nil {
		t.Fatal(err)
	}
	testbed.RequireDocker(t)
	testbed.EnvoyBinary(t)
	if cfg.Seed == 0 {
		cfg.Seed = rand.Uint64()
	}
	t.Logf("soak: %+v (SOAK_SEED=%d repeats the listen delays)", cfg, cfg.Seed)

	var results []*armResult
	t.Run("envoy-docker-shim", func(t *testing.T) {
		r := soakArm(t, cfg, startShimArm(t, cfg))
		results = append(results, r)
		for _, p := range r.report() {
			t.Error(p)
		}
	})
	if cfg.DockerProxy {
		// For comparison only: docker-proxy is not held to the targets.
		t.Run("docker-proxy", func(t *testing.T) {
			results = append(results, soakArm(t, cfg, startDockerProxyArm(t, cfg)))
		})
	}
	report := table(cfg, results)
	t.Log("\n" + report)
	if cfg.Results != "" {
		path, err := writeResults(cfg.Results, report)
		if err != nil {
			t.Error(err)
		} else {
			t.Logf("results written to %s", path)
		}
	}
}

// writeResults writes the report into dir (a new file per run) or, if dest is not a
// directory, to that file.
func writeResults(dest, report string) (string, error) {
	path := dest
	if fi, err := os.Stat(dest); (err == nil && fi.IsDir()) || strings.HasSuffix(dest, "/") {
		path = filepath.Join(dest, "soak-"+time.Now().Format("20060102-150405")+".md")
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return "", fmt.Errorf("results: %w", err)
	}
	if err := os.WriteFile(path, []byte(report), 0o644); err != nil {
		return "", fmt.Errorf("results: %w", err)
	}
	return path, nil
}

// maxConsecutiveFailedStarts stops an arm whose daemon has evidently broken: the remaining cycles
// would fail fast and tell nothing more.
const maxConsecutiveFailedStarts = 20

// soakArm runs every cycle on one arm and measures it.
func soakArm(t *testing.T, cfg config, a *arm) *armResult {
	r := newArmResult(a.name, a.server != nil)
	var err error
	a.d.EchoImage(t)
	var ports []int
	used := map[int]string{}
	if cfg.HostPorts == "leased" {
		ports = make([]int, cfg.Cycles)
		for i := range ports {
			ports[i] = testbed.FreePort(t)
			used[ports[i]] = modes[i%len(modes)].proto
		}
	}
	steady := startSteady(t, a.d, cfg.SteadyClients, cfg.SteadyInterval)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var mu sync.Mutex
	consecutive, done := 0, 0
	every := max(1, cfg.Cycles/10)
	began := time.Now()
	record := func(_ int, c cycleResult) {
		mu.Lock()
		defer mu.Unlock()
		r.add(c)
		if c.startErr == nil {
			consecutive = 0
		} else if consecutive++; consecutive >= maxConsecutiveFailedStarts && r.Aborted == "" {
			r.Aborted = fmt.Sprintf("%d consecutive failed starts, the last: %v", consecutive, c.startErr)
			cancel()
		}
		if done++; done%every == 0 || done == cfg.Cycles {
			t.Logf("%s: %d/%d cycles in %v: %d failed starts, %d failed first requests, steady load %d requests %d errors",
				a.name, done, cfg.Cycles, time.Since(began).Round(time.Second), r.FailedStarts, r.total(r.FirstFailed),
				steady.requests.Load(), steady.errors.Load())
		}
	}

	// One cycle per worker first, so that the baseline is taken with the server's pools and
	// caches as warm as the churn makes them.
	a.run(ctx, 0, cfg.Parallel, ports, record)
	if a.server != nil {
		r.Before, err = a.baseline(t, cfg.Settle, nil)
		if err != nil {
			r.SampleErr = "before: " + err.Error()
		}
	}
	a.run(ctx, cfg.Parallel, cfg.Cycles, ports, record)
	r.Wall = time.Since(began)
	steady.Stop()
	r.Steady = steady.result()
	if a.server != nil && r.SampleErr == "" {
		r.After, err = a.baseline(t, cfg.Settle, &r.Before)
		if err != nil {
			r.SampleErr = "after: " + err.Error()
		}
	}
	a.d.Remove(t, steady.c)
	r.Leftovers, r.LeftDetail = a.leftovers(t, cfg.Settle, used)
	return r
}

// baseline waits, up to settle, until the server holds only the steady port (one registration,
// one shim) and, when comparing with before, until its goroutines are back within the margin;
// then it samples the server after a garbage collection.
func (a *arm) baseline(t *testing.T, settle time.Duration, before *serverSample) (serverSample, error) {
	ctx := context.Background()
	deadline := time.Now().Add(settle)
	var last string
	for {
		s, err := a.server.scrape(ctx)
		if err != nil {
			return serverSample{}, err
		}
		shims := a.d.Processes(a.proxy)
		switch {
		case s.Live != 1 || len(shims) != 1:
			last = fmt.Sprintf("%d registrations and %d shims, want the steady port's one of each", s.Live, len(shims))
		case before != nil && s.Goroutines > before.Goroutines+goroutineMargin:
			last = fmt.Sprintf("%d goroutines, %d before", s.Goroutines, before.Goroutines)
		default:
			last = ""
		}
		if last == "" || time.Now().After(deadline) {
			break
		}
		time.Sleep(250 * time.Millisecond)
	}
	if last != "" && before == nil {
		return serverSample{}, fmt.Errorf("no baseline: not settled after %v: %s", settle, last)
	}
	if last != "" {
		t.Logf("%s: not settled after %v: %s", a.name, settle, last)
	}
	return a.server.sampleAfterGC(ctx)
}
