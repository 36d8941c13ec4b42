// Command envoy-docker-server keeps Envoy's configuration in step with the ports that
// envoy-docker-shim registers. Configuration: environment variables (see the README).
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/envoy-docker-shim/envoy-docker-shim/services/buildinfo"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/server"
)

func main() {
	if len(os.Args) > 1 && (os.Args[1] == "-version" || os.Args[1] == "--version") {
		fmt.Println(buildinfo.String())
		return
	}
	cfg, err := server.ConfigFromEnv()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	log := cfg.Logger()
	s, err := server.New(cfg, log, nil)
	if err != nil {
		log.Error("start", "err", err)
		os.Exit(1)
	}
	log.Info("envoy-docker-server starting", "version", buildinfo.String())
	if err := s.Run(context.Background()); err != nil {
		log.Error("stopped", "err", err)
		os.Exit(1)
	}
}
