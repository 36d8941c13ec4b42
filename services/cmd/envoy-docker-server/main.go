// Command envoy-docker-server keeps Envoy's configuration in step with the ports that
// envoy-docker-shim registers. Configuration: environment variables (see the README).
//
//	envoy-docker-server               serve
//	envoy-docker-server -version      print the version
//	envoy-docker-server -healthcheck  exit 0 if the server on EDS_SOCKET answers (container healthcheck)
package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/internal/buildinfo"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/server"
)

func main() {
	if len(os.Args) > 2 {
		fmt.Fprintln(os.Stderr, "usage: envoy-docker-server [-version | -healthcheck]")
		os.Exit(2)
	}
	cfg, err := server.ConfigFromEnv()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	if len(os.Args) == 2 {
		switch os.Args[1] {
		case "-version", "--version":
			fmt.Println(buildinfo.String())
			return
		case "-healthcheck", "--healthcheck":
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			defer cancel()
			if err := server.Probe(ctx, cfg.Socket); err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(1)
			}
			return
		default:
			fmt.Fprintf(os.Stderr, "unknown argument %q\nusage: envoy-docker-server [-version | -healthcheck]\n", os.Args[1])
			os.Exit(2)
		}
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
