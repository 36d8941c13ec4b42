// Package resync rebuilds envoy-docker-server's registry after the server restarts: it finds every
// envoy-docker-shim still running on the host (the host's process table: the resync container
// runs with `pid: host`), reads the mapping from its command line (dockerd passes docker-proxy's
// arguments, parsed by the shim's own parser), and hands the list to the server's Restore call.
// It never decides what to restore: the server checks each container against the Docker API.
package resync

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"

	"github.com/kelseyhightower/envconfig"
	"google.golang.org/grpc"

	"github.com/envoy-docker-shim/envoy-docker-shim/internal/mapping"
	pb "github.com/envoy-docker-shim/envoy-docker-shim/services/registration/registrationpb"
	"github.com/envoy-docker-shim/envoy-docker-shim/shim/proxyargs"
)

// Config is every setting of resync.
type Config struct {
	Socket   string `envconfig:"EDS_SOCKET" default:"/run/envoy-docker-shim/server.sock" desc:"The server's gRPC API socket (EDS_SOCKET of the server)."`
	ProcRoot string `envconfig:"EDS_PROC_ROOT" default:"/proc" desc:"The host's process table (the resync container runs with pid: host)."`
	ShimName string `envconfig:"EDS_SHIM_NAME" default:"envoy-docker-shim" desc:"File name of the shim binary, as dockerd runs it."`
}

// ConfigFromEnv reads Config from the environment.
func ConfigFromEnv() (Config, error) {
	var c Config
	if err := envconfig.Process("", &c); err != nil {
		return Config{}, fmt.Errorf("configuration: %w", err)
	}
	return c, nil
}

// Shim is one running shim found in the process table.
type Shim struct {
	PID  int
	Args []string
}

// FindShims lists the processes under procRoot whose executable is named shimName, in PID order.
// Processes that vanish while being read are skipped.
func FindShims(procRoot, shimName string) ([]Shim, error) {
	entries, err := os.ReadDir(procRoot)
	if err != nil {
		return nil, fmt.Errorf("read process table %s: %w", procRoot, err)
	}
	var shims []Shim
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || !e.IsDir() {
			continue
		}
		raw, err := os.ReadFile(filepath.Join(procRoot, e.Name(), "cmdline"))
		if err != nil || len(raw) == 0 {
			continue
		}
		argv := splitCmdline(raw)
		if filepath.Base(argv[0]) != shimName {
			continue
		}
		shims = append(shims, Shim{PID: pid, Args: argv[1:]})
	}
	slices.SortFunc(shims, func(a, b Shim) int { return a.PID - b.PID })
	return shims, nil
}

func splitCmdline(raw []byte) []string {
	raw = bytes.TrimRight(raw, "\x00")
	parts := bytes.Split(raw, []byte{0})
	out := make([]string, len(parts))
	for i, p := range parts {
		out[i] = string(p)
	}
	return out
}

// Request turns running shims into the server's Restore request. Shims whose command line does
// not parse (another program of the same name, a future flag form) are returned as skipped.
func Request(shims []Shim) (*pb.RestoreRequest, []error) {
	req := &pb.RestoreRequest{}
	var skipped []error
	for _, s := range shims {
		parsed, err := proxyargs.Parse(s.Args)
		if err == nil && (parsed.Version || parsed.Help) {
			err = errors.New("not a proxy invocation")
		}
		if err != nil {
			skipped = append(skipped, fmt.Errorf("pid %d %q: %w", s.PID, s.Args, err))
			continue
		}
		m := parsed.Mapping
		req.Shims = append(req.Shims, &pb.Open{
			Mapping: pb.FromMapping(m),
			Shim:    &pb.Shim{Pid: int32(s.PID), ProxiesItself: m.Proto != mapping.TCP},
		})
	}
	return req, skipped
}

// Run finds the shims and asks the server to restore them.
func Run(ctx context.Context, cfg Config, client pb.RegistrarClient, opts ...grpc.CallOption) (*pb.RestoreResponse, []error, error) {
	shims, err := FindShims(cfg.ProcRoot, cfg.ShimName)
	if err != nil {
		return nil, nil, err
	}
	req, skipped := Request(shims)
	resp, err := client.Restore(ctx, req, opts...)
	if err != nil {
		return nil, skipped, fmt.Errorf("restore %d mappings at %s: %w", len(req.GetShims()), cfg.Socket, err)
	}
	return resp, skipped, nil
}
