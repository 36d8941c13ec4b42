package registrationpb

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/envoy-docker-shim/envoy-docker-shim/internal/mapping"
)

// The one conversion between the wire's Mapping and mapping.Mapping, for the server and resync.

var protocols = map[Protocol]mapping.Protocol{
	Protocol_PROTOCOL_TCP:  mapping.TCP,
	Protocol_PROTOCOL_UDP:  mapping.UDP,
	Protocol_PROTOCOL_SCTP: mapping.SCTP,
}

// FromMapping is the wire form of m.
func FromMapping(m mapping.Mapping) *Mapping {
	proto := Protocol_PROTOCOL_UNSPECIFIED
	for k, v := range protocols {
		if v == m.Proto {
			proto = k
		}
	}
	return &Mapping{
		Proto:         proto,
		HostIp:        m.HostIP.String(),
		HostPort:      uint32(m.HostPort),
		ContainerIp:   m.ContainerIP.String(),
		ContainerPort: uint32(m.ContainerPort),
	}
}

// Parse validates a mapping received on the wire.
func (m *Mapping) Parse() (mapping.Mapping, error) {
	if m == nil {
		return mapping.Mapping{}, errors.New("mapping missing")
	}
	proto, ok := protocols[m.GetProto()]
	if !ok {
		return mapping.Mapping{}, fmt.Errorf("unknown protocol %v", m.GetProto())
	}
	hostIP, err := netip.ParseAddr(m.GetHostIp())
	if err != nil {
		return mapping.Mapping{}, fmt.Errorf("host IP: %w", err)
	}
	containerIP, err := netip.ParseAddr(m.GetContainerIp())
	if err != nil {
		return mapping.Mapping{}, fmt.Errorf("container IP: %w", err)
	}
	if m.GetHostPort() > 65535 || m.GetContainerPort() > 65535 {
		return mapping.Mapping{}, fmt.Errorf("port out of range: %d:%d", m.GetHostPort(), m.GetContainerPort())
	}
	out := mapping.Mapping{
		Key:           mapping.Key{Proto: proto, HostIP: hostIP.Unmap(), HostPort: uint16(m.GetHostPort())},
		ContainerIP:   containerIP.Unmap(),
		ContainerPort: uint16(m.GetContainerPort()),
	}
	return out, out.Validate()
}
