package netfilter

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/docker/docker/api/types/events"
	"github.com/docker/docker/api/types/network"

	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
)

// fakeDocker is dockerd's network list and event stream, as the tests set them.
type fakeDocker struct {
	mu      sync.Mutex
	nets    []network.Summary
	listErr error
	subs    []chan events.Message
	errs    []chan error
	opts    []events.ListOptions
}

func (f *fakeDocker) NetworkList(context.Context, network.ListOptions) ([]network.Summary, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.nets), f.listErr
}

func (f *fakeDocker) Events(ctx context.Context, o events.ListOptions) (<-chan events.Message, <-chan error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	// Unbuffered: event returns once the reconciler took the event, that is once it was done
	// with the one before.
	msgs, errs := make(chan events.Message), make(chan error, 1)
	f.subs, f.errs, f.opts = append(f.subs, msgs), append(f.errs, errs), append(f.opts, o)
	return msgs, errs
}

func (f *fakeDocker) set(nets ...network.Summary) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.nets = nets
}

// event sends an event on the latest subscription, as dockerd does when a network comes or goes.
func (f *fakeDocker) event(action events.Action, name string) {
	f.mu.Lock()
	sub := f.subs[len(f.subs)-1]
	f.mu.Unlock()
	sub <- events.Message{Type: events.NetworkEventType, Action: action, Actor: events.Actor{Attributes: map[string]string{"name": name}}}
}

func (f *fakeDocker) breakStream() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.errs[len(f.errs)-1] <- errors.New("unexpected EOF")
}

func (f *fakeDocker) subscriptions() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.subs)
}

type reconcilerRun struct {
	r      *Reconciler
	stop   context.CancelFunc
	done   chan error
	halted sync.Once
	logs   *syncBuffer
}

type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func startReconciler(t *testing.T, r *Reconciler) *reconcilerRun {
	t.Helper()
	logs := &syncBuffer{}
	r.Log = slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	ctx, cancel := context.WithCancel(context.Background())
	run := &reconcilerRun{r: r, stop: cancel, done: make(chan error, 1), logs: logs}
	go func() { run.done <- r.Run(ctx) }()
	t.Cleanup(func() {
		run.halt(t)
		if t.Failed() {
			t.Logf("reconciler log:\n%s", logs)
		}
	})
	return run
}

// halt stops Run and waits for it, as the server's run group does.
func (run *reconcilerRun) halt(t *testing.T) {
	t.Helper()
	run.halted.Do(func() {
		run.stop()
		select {
		case err := <-run.done:
			if err != nil {
				t.Errorf("Run = %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Run did not return after its context ended")
		}
	})
}

// waitTable waits until the table holds the rules of nets (nil: until it is gone).
func waitTable(t *testing.T, tbl Table, what string, nets ...network.Summary) {
	t.Helper()
	var want []string
	if nets != nil {
		want = Summary(Rules(Networks(nets)))
	}
	testbed.WaitFor(t, 5*time.Second, what, func() error {
		have, exists, err := tbl.Current()
		switch {
		case err != nil:
			return err
		case nets == nil && exists:
			return fmt.Errorf("table %s still there:\n%s", tbl, strings.Join(have, "\n"))
		case nets != nil && !slices.Equal(have, want):
			return fmt.Errorf("table %s (exists=%v):\n%s\nwant\n%s", tbl, exists, strings.Join(have, "\n"), strings.Join(want, "\n"))
		}
		return nil
	})
}

func sysctlDir(t *testing.T) string {
	dir := t.TempDir()
	for f, v := range map[string]string{"ipv4/ip_forward": "0\n", "ipv6/conf/all/forwarding": "0\n", "ipv6/conf/default/forwarding": "0\n"} {
		p := filepath.Join(dir, f)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(v), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// waitSysctl waits for a setting the reconciler writes right after the table.
func waitSysctl(t *testing.T, dir, f, want string) {
	t.Helper()
	testbed.WaitFor(t, 5*time.Second, f+" = "+want, func() error {
		if got := readSysctl(t, dir, f); got != want {
			return fmt.Errorf("%s = %s", f, got)
		}
		return nil
	})
}

func readSysctl(t *testing.T, dir, f string) string {
	b, err := os.ReadFile(filepath.Join(dir, f))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// The reconciler follows dockerd's events: the table is written at start and follows networks
// created and removed; forwarding is turned on for the IP versions in use; a broken event stream
// is reconnected; a failing network list keeps the rules. (The Interval is an hour here: every
// change below comes from an event.)
func TestReconcilerFollowsNetworks(t *testing.T) {
	requireNft(t)
	ns := newNetns(t)
	tbl := Table{Name: "eds_follow", NetNS: int(ns.Fd())}
	docker := &fakeDocker{nets: []network.Summary{userNet}}
	sysctls := sysctlDir(t)
	startReconciler(t, &Reconciler{Docker: docker, Table: tbl, Sysctls: Sysctls{Dir: sysctls}, Interval: time.Hour, KeepOnStop: true})

	waitTable(t, tbl, "the first network's rules", userNet)
	waitSysctl(t, sysctls, "ipv4/ip_forward", "1")
	if got := readSysctl(t, sysctls, "ipv6/conf/all/forwarding"); got != "0" {
		t.Errorf("IPv6 forwarding = %s without an IPv6 network, want 0 (untouched)", got)
	}
	docker.mu.Lock()
	since := docker.opts[0].Since
	docker.mu.Unlock()
	if since == "" {
		t.Error("the event subscription has no Since: a network created before the list could be missed")
	}

	docker.set(userNet, defaultBridge)
	docker.event(events.ActionCreate, "bridge")
	waitTable(t, tbl, "the created network's rules", userNet, defaultBridge)
	waitSysctl(t, sysctls, "ipv6/conf/all/forwarding", "1")

	docker.set(defaultBridge)
	docker.event(events.ActionDestroy, "web")
	waitTable(t, tbl, "the destroyed network's rules gone", defaultBridge)

	// dockerd restarting: the stream breaks, the reconciler subscribes again and reconciles.
	docker.breakStream()
	testbed.WaitFor(t, 5*time.Second, "a new event subscription", func() error {
		if n := docker.subscriptions(); n < 2 {
			return fmt.Errorf("%d subscriptions", n)
		}
		return nil
	})
	docker.set(defaultBridge, internalNet)
	docker.event(events.ActionCreate, "backend")
	waitTable(t, tbl, "rules after reconnecting", defaultBridge, internalNet)

	// The API failing says nothing about the networks: the rules stay.
	docker.mu.Lock()
	docker.listErr = errors.New("Cannot connect to the Docker daemon")
	docker.mu.Unlock()
	docker.event(events.ActionDestroy, "backend")
	docker.event(events.ActionDestroy, "bridge") // taken once the first event's reconcile is over
	waitTable(t, tbl, "rules kept while the network list fails", defaultBridge, internalNet)
}

// Every Interval, with no event, the reconciler puts back a table someone deleted or changed (a
// reload of the host's nftables.service begins with `flush ruleset`).
func TestReconcilerRepairsTheTable(t *testing.T) {
	requireNft(t)
	ns := newNetns(t)
	tbl := Table{Name: "eds_repair", NetNS: int(ns.Fd())}
	docker := &fakeDocker{nets: []network.Summary{defaultBridge}}
	startReconciler(t, &Reconciler{Docker: docker, Table: tbl, Sysctls: Sysctls{Dir: sysctlDir(t)}, Interval: 50 * time.Millisecond})
	waitTable(t, tbl, "rules", defaultBridge)
	if removed, err := tbl.Remove(); !removed || err != nil {
		t.Fatalf("removing the table from outside: %v, %v", removed, err)
	}
	waitTable(t, tbl, "the table restored after someone deleted it", defaultBridge)
	if err := tbl.Replace(Rules(Networks([]network.Summary{userNet}))); err != nil {
		t.Fatal(err)
	}
	waitTable(t, tbl, "the table restored after someone changed it", defaultBridge)
}

// Stopping removes the rules, or keeps them with KeepOnStop until the next start replaces them;
// the uninstall mark removes them and keeps them off, whatever KeepOnStop says; Off removes what
// an earlier run kept.
func TestReconcilerStopKeepUninstall(t *testing.T) {
	requireNft(t)
	ns := newNetns(t)
	tbl := Table{Name: "eds_stop", NetNS: int(ns.Fd())}
	docker := &fakeDocker{nets: []network.Summary{defaultBridge}}
	markDir := t.TempDir()
	newReconciler := func(keep bool) *Reconciler {
		return &Reconciler{Docker: docker, Table: tbl, Sysctls: Sysctls{Dir: sysctlDir(t)}, Interval: 50 * time.Millisecond, KeepOnStop: keep, MarkDir: markDir}
	}

	t.Run("removed on stop", func(t *testing.T) {
		run := startReconciler(t, newReconciler(false))
		waitTable(t, tbl, "rules", defaultBridge)
		run.halt(t)
		waitTable(t, tbl, "no table after stopping", nil...)
	})
	t.Run("kept on stop, replaced by the next start", func(t *testing.T) {
		run := startReconciler(t, newReconciler(true))
		waitTable(t, tbl, "rules", defaultBridge)
		run.halt(t)
		if have, exists, err := tbl.Current(); !exists || err != nil || !slices.Equal(have, Summary(Rules(Networks([]network.Summary{defaultBridge})))) {
			t.Fatalf("after a stop with KeepOnStop: exists=%v err=%v\n%s", exists, err, strings.Join(have, "\n"))
		}
		docker.set(defaultBridge, userNet) // changed while the server was down
		startReconciler(t, newReconciler(true))
		waitTable(t, tbl, "rules of the networks found at the next start", defaultBridge, userNet)
	})
	t.Run("uninstall mark", func(t *testing.T) {
		run := startReconciler(t, newReconciler(true))
		waitTable(t, tbl, "rules", defaultBridge, userNet)
		if err := MarkUninstalled(markDir); err != nil {
			t.Fatal(err)
		}
		// What the installer does besides: remove the table at once.
		if _, err := tbl.Remove(); err != nil {
			t.Fatal(err)
		}
		docker.event(events.ActionCreate, "another") // would restore the rules without the mark
		docker.event(events.ActionCreate, "another") // taken once the first event's reconcile is over
		waitTable(t, tbl, "no table while marked", nil...)
		run.halt(t)
		waitTable(t, tbl, "no table after a stop with KeepOnStop while marked", nil...)
		if _, err := ClearUninstalled(markDir); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("off removes what an earlier run kept", func(t *testing.T) {
		run := startReconciler(t, newReconciler(true))
		waitTable(t, tbl, "rules", defaultBridge, userNet)
		run.halt(t)
		off := newReconciler(true)
		off.Off = true
		startReconciler(t, off)
		waitTable(t, tbl, "no table with Off", nil...)
	})
}
