package registrar

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/internal/mapping"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/labels"
	pb "github.com/envoy-docker-shim/envoy-docker-shim/services/registration/registrationpb"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/registry"
)

// Restore takes resync's list of live shims after a server restart. A mapping is restored only
// when its container is found on a Docker network right now: a container that stopped while the
// server was down must not come back. Restored entries have no stream; the shim's own
// re-registration takes them over, and the Docker watcher removes them when the container goes.
func (s *Server) Restore(ctx context.Context, req *pb.RestoreRequest) (*pb.RestoreResponse, error) {
	out := &pb.RestoreResponse{}
	for _, open := range req.GetShims() {
		res := &pb.Restored{Mapping: open.GetMapping()}
		out.Results = append(out.Results, res)
		outcome, reason := s.restore(ctx, open)
		res.Outcome, res.Reason = outcome, reason
		s.Log.Info("resync", "mapping", fmt.Sprint(open.GetMapping()), "shim_pid", open.GetShim().GetPid(), "outcome", outcome.String(), "reason", reason)
	}
	if s.OnRestored != nil {
		s.OnRestored()
	}
	return out, nil
}

func (s *Server) restore(ctx context.Context, open *pb.Open) (pb.Restored_Outcome, string) {
	m, err := open.GetMapping().Parse()
	if err != nil {
		return pb.Restored_OUTCOME_SKIPPED, fmt.Sprintf("invalid mapping: %v", err)
	}
	if e, ok := s.Registry.Get(m.Key); ok {
		if e.Mapping == m {
			return pb.Restored_OUTCOME_ALREADY_REGISTERED, ""
		}
		return pb.Restored_OUTCOME_SKIPPED, fmt.Sprintf("host port held by another mapping (container %s)", e.ContainerName)
	}
	c, err := s.Finder.FindByIP(ctx, m.ContainerIP)
	if err != nil {
		return pb.Restored_OUTCOME_SKIPPED, fmt.Sprintf("container not found, so not restored: %v", err)
	}
	service, err := labels.Describe(&c, m.ContainerIP)
	if err != nil {
		return pb.Restored_OUTCOME_SKIPPED, fmt.Sprintf("container %s: %v", c.Name, err)
	}
	if m.Proto != mapping.TCP || open.GetShim().GetProxiesItself() {
		service.Mode = registry.ModeProxiedByShim
	}
	_, err = s.Registry.Claim(registry.Entry{
		Mapping: m,
		Service: service,
		Shim:    registry.Shim{PID: open.GetShim().GetPid(), Version: open.GetShim().GetVersion()},
		Owner:   s.Registry.NewOwner(),
		ReadyAt: time.Now(),
	})
	var conflict *registry.ConflictError
	switch {
	case errors.As(err, &conflict):
		return pb.Restored_OUTCOME_SKIPPED, err.Error()
	case err != nil:
		return pb.Restored_OUTCOME_SKIPPED, fmt.Sprintf("restore: %v", err)
	}
	return pb.Restored_OUTCOME_RESTORED, ""
}
