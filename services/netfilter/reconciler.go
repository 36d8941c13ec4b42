package netfilter

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/docker/docker/api/types/events"
	"github.com/docker/docker/api/types/filters"
	"github.com/docker/docker/api/types/network"
)

// Docker is the part of the Docker Engine API the reconciler uses.
type Docker interface {
	NetworkList(ctx context.Context, options network.ListOptions) ([]network.Summary, error)
	Events(ctx context.Context, options events.ListOptions) (<-chan events.Message, <-chan error)
}

// Reconciler keeps the table in step with dockerd's bridge networks: at start, on every network
// created or destroyed, and every Interval, which also repairs a table someone flushed (a reload
// of the host's nftables.service starts with `flush ruleset`).
type Reconciler struct {
	Docker  Docker
	Table   Table
	Sysctls Sysctls
	// Off: the operator manages the firewall. Run only removes a table an earlier run left behind,
	// then waits.
	Off bool
	// KeepOnStop leaves the rules in place when Run ends, so that a restart or an upgrade neither
	// cuts containers' outbound connections nor opens the isolation between networks meanwhile.
	KeepOnStop bool
	// MarkDir is where the installer leaves its uninstall mark (see MarkUninstalled): while the
	// mark is there, the table is removed and never restored. Empty: no mark is looked for.
	MarkDir string
	// Interval between reconciles without events; default 30 s.
	Interval time.Duration
	Log      *slog.Logger
	Metrics  *Metrics

	applied bool   // this Run has written the table once: later reconciles write only on change
	lastErr string // the last error logged, so a lasting failure is not logged every Interval
}

const (
	defaultInterval = 30 * time.Second
	maxBackoff      = 30 * time.Second
)

// Run reconciles until ctx ends, then removes the table unless KeepOnStop (or keeps it).
func (r *Reconciler) Run(ctx context.Context) error {
	if r.Log == nil {
		r.Log = slog.New(slog.DiscardHandler)
	}
	if r.Off {
		if removed, err := r.Table.Remove(); err != nil {
			r.Log.Warn("EDS_NETFILTER=false: could not check for netfilter rules an earlier run kept", "table", r.Table.String(), "err", err)
		} else if removed {
			r.Log.Info("EDS_NETFILTER=false: removed the netfilter rules an earlier run kept", "table", r.Table.String())
		}
		<-ctx.Done()
		return nil
	}
	defer r.stop()
	backoff := time.Second
	for {
		started := time.Now()
		err := r.follow(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if time.Since(started) > maxBackoff {
			backoff = time.Second // the stream was healthy for a while: a fresh failure
		}
		r.Log.Warn("docker network events interrupted; keeping the netfilter rules as they are and reconnecting", "err", err, "retry_in", backoff.String())
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, maxBackoff)
	}
}

// follow subscribes to network events, reconciles, and reconciles again on every event and every
// Interval until the stream breaks or ctx ends.
func (r *Reconciler) follow(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// Events since just before the list: a network created between the subscription and the
	// list is then seen twice rather than missed. Reconciling twice changes nothing.
	since := time.Now().Add(-time.Second)
	msgs, errs := r.Docker.Events(ctx, events.ListOptions{
		Since: fmt.Sprintf("%d.%09d", since.Unix(), since.Nanosecond()),
		Filters: filters.NewArgs(
			filters.Arg("type", string(events.NetworkEventType)),
			filters.Arg("event", string(events.ActionCreate)),
			filters.Arg("event", string(events.ActionDestroy)),
		),
	})
	r.reconcile(ctx)
	interval := r.Interval
	if interval <= 0 {
		interval = defaultInterval
	}
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case m := <-msgs:
			r.Log.Debug("docker network event", "action", string(m.Action), "network", m.Actor.Attributes["name"])
			r.reconcile(ctx)
		case <-tick.C:
			r.reconcile(ctx)
		case err := <-errs:
			if err == nil {
				err = errors.New("event stream closed")
			}
			return fmt.Errorf("docker events: %w", err)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// reconcile makes the table match dockerd's networks, writing it only when it differs.
func (r *Reconciler) reconcile(ctx context.Context) {
	if r.MarkDir != "" && Uninstalled(r.MarkDir) {
		r.remove("uninstalled: removed the netfilter rules; they stay off until the installer runs again")
		return
	}
	list, err := r.Docker.NetworkList(ctx, network.ListOptions{})
	if err != nil {
		if ctx.Err() == nil {
			r.fail(fmt.Errorf("listing docker networks: %w; keeping the netfilter rules as they are", err))
		}
		return
	}
	nets := Networks(list)
	rules := Rules(nets)
	want := Summary(rules)
	have, exists, err := r.Table.Current()
	if err != nil {
		r.fail(err)
		return
	}
	if !r.applied || !exists || !slices.Equal(have, want) {
		if err := r.Table.Replace(rules); err != nil {
			r.fail(err)
			return
		}
		bridges := make([]string, len(nets))
		for i, n := range nets {
			bridges[i] = n.Bridge + " (" + n.Name + ")"
		}
		how := "written"
		if r.applied {
			how = "rewritten: networks changed, or the table was changed from outside"
		}
		r.Log.Info("netfilter rules "+how, "table", r.Table.String(), "networks", bridges, "rules", len(rules))
		r.applied = true
	}
	r.Metrics.setNetworks(len(nets))
	var v4, v6 bool
	for _, n := range nets {
		v4 = v4 || !n.Internal && len(n.IPv4.Subnets) > 0
		v6 = v6 || !n.Internal && len(n.IPv6.Subnets) > 0
	}
	changed, err := r.Sysctls.EnableForwarding(v4, v6)
	for _, c := range changed {
		r.Log.Info("turned on IP forwarding, which containers' traffic out of their networks needs (dockerd does the same unless run with --ip-forward=false)", "sysctl", c+"=1")
	}
	if err != nil {
		r.fail(err)
		return
	}
	r.lastErr = ""
}

func (r *Reconciler) fail(err error) {
	r.Metrics.countError()
	if msg := err.Error(); msg != r.lastErr {
		r.lastErr = msg
		r.Log.Error("netfilter: "+msg+" (retrying; EDS_NETFILTER=false turns this off)", "table", r.Table.String())
	}
}

func (r *Reconciler) stop() {
	switch {
	case r.MarkDir != "" && Uninstalled(r.MarkDir):
		r.remove("uninstalled: removed the netfilter rules")
	case r.KeepOnStop:
		if r.applied {
			r.Log.Info("stopping: the netfilter rules stay in place until the next start (EDS_NETFILTER_KEEP=true)", "table", r.Table.String())
		}
	default:
		r.remove("stopping: removed the netfilter rules (EDS_NETFILTER_KEEP=false)")
	}
}

func (r *Reconciler) remove(why string) {
	removed, err := r.Table.Remove()
	switch {
	case err != nil:
		r.fail(err)
	case removed:
		r.Log.Info(why, "table", r.Table.String())
		r.Metrics.setNetworks(0)
	}
	r.applied = false
}
