// Command envoy-entrypoint is the Envoy container's entrypoint: it renders the bootstrap from the
// environment and replaces itself with Envoy, so Envoy is PID 1's child-free successor and gets
// the container's signals directly.
package main

import (
	"fmt"
	"net"
	"net/http"
	"os"
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
	argv := append([]string{cfg.Binary}, bootstrap.Args(cfg, cfg.ConfigPath)...)
	argv = append(argv, os.Args[1:]...) // extra Envoy flags given to the container
	if err := syscall.Exec(cfg.Binary, argv, os.Environ()); err != nil {
		return fmt.Errorf("exec %s: %w", cfg.Binary, err)
	}
	return nil
}
