package registrar

import (
	"github.com/envoy-docker-shim/envoy-docker-shim/services/envoyconfig"
	pb "github.com/envoy-docker-shim/envoy-docker-shim/services/registration/registrationpb"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/registry"
)

var modes = map[registry.Mode]pb.Mode{
	registry.ModeHTTP:          pb.Mode_MODE_HTTP,
	registry.ModeTCP:           pb.Mode_MODE_TCP,
	registry.ModeProxiedByShim: pb.Mode_MODE_SHIM,
}

// ToProto is the wire form of a registry entry.
func ToProto(e registry.Entry) *pb.Registration {
	r := &pb.Registration{
		Mapping:       pb.FromMapping(e.Mapping),
		Shim:          &pb.Shim{Pid: e.Shim.PID, Version: e.Shim.Version, ProxiesItself: e.Mode == registry.ModeProxiedByShim},
		ContainerId:   e.ContainerID,
		ContainerName: e.ContainerName,
		Service:       e.Service.Name,
		Mode:          modes[e.Mode],
	}
	if !e.ReadyAt.IsZero() {
		r.ReadyUnixMs = e.ReadyAt.UnixMilli()
	}
	if e.Mode != registry.ModeProxiedByShim {
		r.Listener = envoyconfig.ListenerName(e.Key)
		r.Cluster = envoyconfig.ClusterName(e.Key)
	}
	return r
}
