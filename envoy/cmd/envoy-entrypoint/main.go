// Command envoy-entrypoint is the Envoy container's entrypoint: it renders the bootstrap from the
// environment, runs Envoy, and relays the container's signals to it. It stays Envoy's parent
// (rather than exec'ing it) so that a stop is logged, drains first (see drain), and its outcome
// is the container's exit code.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/envoy/bootstrap"
)

func main() {
	if len(os.Args) > 1 && (os.Args[1] == "-healthcheck" || os.Args[1] == "--healthcheck") {
		if err := healthcheck(); err != nil {
			fmt.Fprintln(os.Stderr, "envoy-entrypoint:", err)
			os.Exit(1)
		}
		return
	}
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "envoy-entrypoint:", err)
		os.Exit(2)
	}
}

// healthcheck is the container healthcheck: Envoy's admin /ready answers 200 once Envoy has its
// first configuration and serves.
func healthcheck() error {
	cfg, err := bootstrap.FromEnv()
	if err != nil {
		return err
	}
	client := &http.Client{Timeout: 3 * time.Second}
	url := "http://" + net.JoinHostPort(cfg.AdminAddress, strconv.Itoa(cfg.AdminPort)) + "/ready"
	resp, err := client.Get(url)
	if err != nil {
		return fmt.Errorf("envoy admin: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s answered %s", url, resp.Status)
	}
	return nil
}

func run() error {
	cfg, err := bootstrap.FromEnv()
	if err != nil {
		return err
	}
	yaml, err := bootstrap.Render(cfg)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(cfg.ConfigPath), 0o755); err != nil {
		return fmt.Errorf("bootstrap directory: %w", err)
	}
	if err := os.WriteFile(cfg.ConfigPath, yaml, 0o644); err != nil {
		return fmt.Errorf("write bootstrap: %w", err)
	}
	args := append(bootstrap.Args(cfg, cfg.ConfigPath), os.Args[1:]...) // extra Envoy flags given to the container
	log := slog.New(slog.NewJSONHandler(os.Stderr, nil))
	var drainFn func(context.Context)
	if cfg.DrainTime > 0 {
		a := admin{base: "http://" + net.JoinHostPort(loopbackIfUnspecified(cfg.AdminAddress), strconv.Itoa(cfg.AdminPort)), client: &http.Client{Timeout: 2 * time.Second}}
		drainFn = func(ctx context.Context) { a.drain(ctx, cfg.DrainTime, log) }
	}
	return supervise(exec.Command(cfg.Binary, args...), drainFn, log)
}

func loopbackIfUnspecified(addr string) string {
	if ip := net.ParseIP(addr); ip != nil && ip.IsUnspecified() {
		return "127.0.0.1"
	}
	return addr
}

// supervise runs Envoy until it exits, relaying SIGHUP and SIGUSR1 (log reopening) to it. The
// first SIGINT or SIGTERM (a stop) runs drain, if not nil, and then stops Envoy (SIGTERM: Envoy
// exits 0); a second one stops Envoy at once.
func supervise(envoy *exec.Cmd, drain func(context.Context), log *slog.Logger) error {
	envoy.Stdin, envoy.Stdout, envoy.Stderr = os.Stdin, os.Stdout, os.Stderr
	signals := make(chan os.Signal, 4)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGUSR1)
	defer signal.Stop(signals)
	if err := envoy.Start(); err != nil {
		return fmt.Errorf("start %s: %w", envoy.Path, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- envoy.Wait() }()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var drained chan struct{} // closed when the drain is over; nil until it starts
	for {
		select {
		case sig := <-signals:
			stop := sig == syscall.SIGINT || sig == syscall.SIGTERM
			if stop && drain != nil && drained == nil {
				log.Info("stopping: draining first", "signal", sig.String(), "envoy_pid", envoy.Process.Pid)
				drained = make(chan struct{})
				go func() { defer close(drained); drain(ctx) }()
				continue
			}
			if stop {
				log.Info("stopping", "signal", sig.String(), "envoy_pid", envoy.Process.Pid)
				cancel()
			}
			_ = envoy.Process.Signal(sig)
		case <-drained:
			drained = make(chan struct{}) // never closed: a later stop signal stops Envoy at once
			_ = envoy.Process.Signal(syscall.SIGTERM)
		case err := <-exited:
			var exit *exec.ExitError
			if errors.As(err, &exit) {
				return fmt.Errorf("envoy exited: %s", exit.ProcessState)
			}
			if err != nil {
				return fmt.Errorf("envoy: %w", err)
			}
			log.Info("stopped: envoy exited 0")
			return nil
		}
	}
}
