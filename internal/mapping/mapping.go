// Package mapping is the one description of a published port shared by the shim, the server and
// resync: a host socket (protocol, address, port) and the container address it leads to, as
// dockerd hands it to its userland proxy. It imports nothing heavier than net/netip, so the shim,
// one process per published port, can use it.
package mapping

import (
	"errors"
	"fmt"
	"net/netip"
)

// Protocol is the transport of a published port, spelled as dockerd passes it in -proto.
type Protocol string

const (
	TCP  Protocol = "tcp"
	UDP  Protocol = "udp"
	SCTP Protocol = "sctp"
)

// ParseProtocol accepts exactly the names dockerd passes.
func ParseProtocol(s string) (Protocol, error) {
	switch p := Protocol(s); p {
	case TCP, UDP, SCTP:
		return p, nil
	}
	return "", fmt.Errorf("unknown protocol %q: want tcp, udp or sctp", s)
}

// Key identifies one host socket: dockerd never publishes two containers on the same one.
type Key struct {
	Proto    Protocol
	HostIP   netip.Addr
	HostPort uint16
}

func (k Key) String() string {
	return fmt.Sprintf("%s/%s", netip.AddrPortFrom(k.HostIP, k.HostPort), k.Proto)
}

// Host is the published host address and port.
func (k Key) Host() netip.AddrPort { return netip.AddrPortFrom(k.HostIP, k.HostPort) }

// Mapping is one published port: dockerd starts one proxy per host address, port and protocol.
type Mapping struct {
	Key
	ContainerIP   netip.Addr
	ContainerPort uint16
}

// Container is the container's address and port that traffic goes to.
func (m Mapping) Container() netip.AddrPort {
	return netip.AddrPortFrom(m.ContainerIP, m.ContainerPort)
}

func (m Mapping) String() string {
	return fmt.Sprintf("%s/%s -> %s", m.Host(), m.Proto, m.Container())
}

// Validate rejects what dockerd would never send, so nothing malformed reaches Envoy.
func (m Mapping) Validate() error {
	switch {
	case m.Proto != TCP && m.Proto != UDP && m.Proto != SCTP:
		return fmt.Errorf("unknown protocol %q: want tcp, udp or sctp", m.Proto)
	case !m.HostIP.IsValid():
		return errors.New("host IP missing")
	case m.HostPort == 0:
		return errors.New("host port must be 1-65535")
	case !m.ContainerIP.IsValid():
		return errors.New("container IP missing")
	case m.ContainerIP.IsUnspecified():
		return fmt.Errorf("container IP %s is unspecified", m.ContainerIP)
	case m.ContainerPort == 0:
		return errors.New("container port must be 1-65535")
	}
	return nil
}
