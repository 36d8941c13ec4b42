package registrar

import (
	"fmt"
	"net/netip"

	"github.com/envoy-docker-shim/envoy-docker-shim/services/envoyconfig"
	pb "github.com/envoy-docker-shim/envoy-docker-shim/services/registration/registrationpb"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/registry"
)

var protocols = map[pb.Protocol]registry.Protocol{
	pb.Protocol_PROTOCOL_TCP:  registry.TCP,
	pb.Protocol_PROTOCOL_UDP:  registry.UDP,
	pb.Protocol_PROTOCOL_SCTP: registry.SCTP,
}

// ProtocolToProto is the inverse of the table above.
func ProtocolToProto(p registry.Protocol) pb.Protocol {
	for k, v := range protocols {
		if v == p {
			return k
		}
	}
	return pb.Protocol_PROTOCOL_UNSPECIFIED
}

// MappingFromProto validates a mapping received from a shim.
func MappingFromProto(m *pb.Mapping) (registry.Mapping, error) {
	if m == nil {
		return registry.Mapping{}, fmt.Errorf("mapping missing")
	}
	proto, ok := protocols[m.GetProto()]
	if !ok {
		return registry.Mapping{}, fmt.Errorf("unknown protocol %v", m.GetProto())
	}
	hostIP, err := netip.ParseAddr(m.GetHostIp())
	if err != nil {
		return registry.Mapping{}, fmt.Errorf("host IP: %w", err)
	}
	containerIP, err := netip.ParseAddr(m.GetContainerIp())
	if err != nil {
		return registry.Mapping{}, fmt.Errorf("container IP: %w", err)
	}
	if m.GetHostPort() > 65535 || m.GetContainerPort() > 65535 {
		return registry.Mapping{}, fmt.Errorf("port out of range: %d:%d", m.GetHostPort(), m.GetContainerPort())
	}
	out := registry.Mapping{
		Key:           registry.Key{Proto: proto, HostIP: hostIP.Unmap(), HostPort: uint16(m.GetHostPort())},
		ContainerIP:   containerIP.Unmap(),
		ContainerPort: uint16(m.GetContainerPort()),
	}
	return out, out.Validate()
}

// MappingToProto is the wire form of a mapping.
func MappingToProto(m registry.Mapping) *pb.Mapping {
	return &pb.Mapping{
		Proto:         ProtocolToProto(m.Proto),
		HostIp:        m.HostIP.String(),
		HostPort:      uint32(m.HostPort),
		ContainerIp:   m.ContainerIP.String(),
		ContainerPort: uint32(m.ContainerPort),
	}
}

var modes = map[registry.Mode]pb.Mode{
	registry.ModeHTTP: pb.Mode_MODE_HTTP,
	registry.ModeTCP:  pb.Mode_MODE_TCP,
	registry.ModeShim: pb.Mode_MODE_SHIM,
}

// ToProto is the wire form of a registry entry.
func ToProto(e registry.Entry) *pb.Registration {
	r := &pb.Registration{
		Mapping:       MappingToProto(e.Mapping),
		Shim:          &pb.Shim{Pid: e.Shim.PID, Version: e.Shim.Version, ProxiesItself: e.Mode == registry.ModeShim},
		ContainerId:   e.ContainerID,
		ContainerName: e.ContainerName,
		Service:       e.Service.Name,
		Mode:          modes[e.Mode],
	}
	if !e.ReadyAt.IsZero() {
		r.ReadyUnixMs = e.ReadyAt.UnixMilli()
	}
	if e.Mode != registry.ModeShim {
		r.Listener = envoyconfig.ListenerName(e.Key)
		r.Cluster = envoyconfig.ClusterName(e.Key)
	}
	return r
}
