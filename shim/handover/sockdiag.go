package handover

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"syscall"

	"golang.org/x/sys/unix"
)

// The handover watches the sockets on one address through the kernel's sock_diag netlink
// interface (what ss(8) uses). Reading /proc/net/tcp instead walks and formats every socket of
// the host, TIME_WAIT included: seconds on a busy host, while sock_diag filters by state in the
// kernel.

const (
	tcpListen = 10

	sizeofDiagReq = 56 // struct inet_diag_req_v2
	sizeofDiagMsg = 72 // struct inet_diag_msg
)

// diagEntry is one socket from a sock_diag dump.
type diagEntry struct {
	state  int
	local  netip.AddrPort
	remote netip.AddrPort
	cookie uint64 // unique per socket (and per request socket) for its lifetime
	queued uint32 // a listening socket's accept queue: connections waiting for accept
	inode  uint32
}

// dump returns the TCP sockets of addr's family in the given states whose local address is addr.
func dump(addr netip.AddrPort, states ...int) ([]diagEntry, error) {
	family := uint8(unix.AF_INET6)
	if addr.Addr().Is4() {
		family = unix.AF_INET
	}
	var mask uint32
	for _, s := range states {
		mask |= 1 << s
	}
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return nil, fmt.Errorf("sock_diag: %w", err)
	}
	defer unix.Close(fd)

	req := make([]byte, unix.NLMSG_HDRLEN+sizeofDiagReq)
	ne := binary.NativeEndian
	ne.PutUint32(req[0:], uint32(len(req)))
	ne.PutUint16(req[4:], unix.SOCK_DIAG_BY_FAMILY)
	ne.PutUint16(req[6:], unix.NLM_F_REQUEST|unix.NLM_F_DUMP)
	ne.PutUint32(req[8:], 1) // sequence
	body := req[unix.NLMSG_HDRLEN:]
	body[0] = family
	body[1] = unix.IPPROTO_TCP
	ne.PutUint32(body[4:], mask)
	// id.idiag_sport: the kernel skips sockets on other local ports itself. While Envoy is away
	// every shim counts sockets a few times a second, and a host may have thousands of listeners.
	// Entries are still matched against addr below, so a kernel that ignored the field would
	// change nothing.
	binary.BigEndian.PutUint16(body[8:], addr.Port())
	if err := unix.Sendto(fd, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, fmt.Errorf("sock_diag: %w", err)
	}

	var out []diagEntry
	buf := make([]byte, 64<<10)
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("sock_diag: %w", err)
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return nil, fmt.Errorf("sock_diag: %w", err)
		}
		for _, m := range msgs {
			switch m.Header.Type {
			case unix.NLMSG_DONE:
				return out, nil
			case unix.NLMSG_ERROR:
				if len(m.Data) >= 4 {
					if errno := int32(ne.Uint32(m.Data)); errno != 0 {
						return nil, fmt.Errorf("sock_diag: %w", unix.Errno(-errno))
					}
				}
				return nil, errors.New("sock_diag: error message")
			}
			if len(m.Data) < sizeofDiagMsg {
				continue
			}
			e := parseDiagMsg(m.Data, family)
			if e.local == addr {
				out = append(out, e)
			}
		}
	}
}

func parseDiagMsg(d []byte, family uint8) diagEntry {
	ne := binary.NativeEndian
	// struct inet_diag_msg: family, state, timer, retrans, then struct inet_diag_sockid:
	// sport, dport (big endian), src[16], dst[16], if, cookie[2]; then expires, rqueue, wqueue, uid, inode.
	id := d[4:52]
	sport, dport := binary.BigEndian.Uint16(id[0:]), binary.BigEndian.Uint16(id[2:])
	var src, dst netip.Addr
	if family == unix.AF_INET {
		src, dst = netip.AddrFrom4([4]byte(id[4:8])), netip.AddrFrom4([4]byte(id[20:24]))
	} else {
		src, dst = netip.AddrFrom16([16]byte(id[4:20])), netip.AddrFrom16([16]byte(id[20:36]))
	}
	return diagEntry{
		state:  int(d[1]),
		local:  netip.AddrPortFrom(src, sport),
		remote: netip.AddrPortFrom(dst, dport),
		cookie: uint64(ne.Uint32(id[40:])) | uint64(ne.Uint32(id[44:]))<<32,
		queued: ne.Uint32(d[56:]), // idiag_rqueue, which for a listener is its accept backlog
		inode:  ne.Uint32(d[68:]),
	}
}

// peers counts the sockets listening on addr other than inode (ours).
func peers(addr netip.AddrPort, inode uint64) (int, error) {
	entries, err := dump(addr, tcpListen)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, e := range entries {
		if e.state == tcpListen && uint64(e.inode) != inode {
			n++
		}
	}
	return n, nil
}

// listening reports whether the socket inode still listens on addr.
func listening(addr netip.AddrPort, inode uint64) (bool, error) {
	entries, err := dump(addr, tcpListen)
	if err != nil {
		return false, err
	}
	for _, e := range entries {
		if e.state == tcpListen && uint64(e.inode) == inode {
			return true, nil
		}
	}
	return false, nil
}
