// Command resync is the one-shot that restores envoy-docker-server's registry after a restart:
// it reports every envoy-docker-shim still running on the host to the server, which restores
// those whose containers still run and then starts answering Envoy. Exit 0 when done.
package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"google.golang.org/grpc"

	"github.com/envoy-docker-shim/envoy-docker-shim/internal/buildinfo"
	pb "github.com/envoy-docker-shim/envoy-docker-shim/services/registration/registrationpb"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/resync"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/server"
)

func main() {
	if len(os.Args) > 1 && (os.Args[1] == "-version" || os.Args[1] == "--version") {
		fmt.Println(buildinfo.String())
		return
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, nil))
	cfg, err := resync.ConfigFromEnv()
	if err != nil {
		log.Error("resync", "err", err)
		os.Exit(2)
	}
	conn, err := server.Dial(cfg.Socket)
	if err != nil {
		log.Error("resync", "err", err)
		os.Exit(1)
	}
	defer conn.Close()
	// docker stop or compose down while resync waits is a clean stop, not a failure.
	signalled, stopSignals := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stopSignals()
	// The server may still be starting: wait for it, but not forever.
	ctx, cancel := context.WithTimeout(signalled, 30*time.Second)
	defer cancel()
	log.Info("reporting the live shims to envoy-docker-server; waiting for it to answer", "socket", cfg.Socket)
	resp, skipped, err := resync.Run(ctx, cfg, pb.NewRegistrarClient(conn), grpc.WaitForReady(true))
	for _, s := range skipped {
		log.Warn("shim not reported", "err", s)
	}
	if signalled.Err() != nil {
		log.Info("stopping: signalled before resync finished")
		return
	}
	if err != nil {
		log.Error("resync failed: is envoy-docker-server running? (docker compose ps server)", "err", err)
		os.Exit(1)
	}
	counts := map[string]int{}
	for _, r := range resp.GetResults() {
		counts[r.GetOutcome().String()]++
		if r.GetOutcome() == pb.Restored_OUTCOME_SKIPPED {
			log.Info("not restored", "mapping", fmt.Sprint(r.GetMapping()), "reason", r.GetReason())
		}
	}
	log.Info("resync done", "shims", len(resp.GetResults()), "outcomes", counts)
}
