// Command envoy-docker-shim-install is the installer container's entrypoint: it copies the static
// envoy-docker-shim onto the host, optionally points dockerd at it in daemon.json, and prints
// exactly what to restart. Configuration: environment variables (see shim/installer.Config).
//
//	envoy-docker-shim-install            install (EDS_UNINSTALL=true: uninstall)
//	envoy-docker-shim-install -version   print the version
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/envoy-docker-shim/envoy-docker-shim/internal/buildinfo"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/netfilter"
	"github.com/envoy-docker-shim/envoy-docker-shim/shim/installer"
)

func main() {
	if len(os.Args) > 1 {
		if os.Args[1] == "-version" || os.Args[1] == "--version" {
			fmt.Println(buildinfo.String())
			return
		}
		fmt.Fprintf(os.Stderr, "unknown argument %q\nusage: envoy-docker-shim-install [-version]; configure with environment variables\n", os.Args[1])
		os.Exit(2)
	}
	cfg, err := installer.ConfigFromEnv()
	if err != nil {
		fmt.Fprintln(os.Stderr, "envoy-docker-shim-install:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	fmt.Printf("envoy-docker-shim-install %s\n", buildinfo.String())
	removeTable := func(name string) (bool, error) { return netfilter.Table{Name: name}.Remove() }
	r, err := installer.Installer{Config: cfg, RemoveTable: removeTable}.Run(ctx)
	if err != nil {
		// Only the shim's line is known to be true after a failure; the error says the rest.
		if !r.Uninstall && r.Version != "" {
			fmt.Println(r.Done()[0])
		}
		fmt.Fprintln(os.Stderr, "envoy-docker-shim-install: error:", err)
		os.Exit(1)
	}
	r.Print(os.Stdout)
}
