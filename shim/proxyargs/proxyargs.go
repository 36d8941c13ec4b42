// Package proxyargs parses the command line dockerd gives its userland proxy:
//
//	-proto tcp|udp|sctp -host-ip IP -host-port N -container-ip IP -container-port N [-use-listen-fd]
//
// with Go flag syntax (one or two dashes, the value as the next argument or after '='), plus
// -version (-v) and -help (-h). It owns the rules for what a valid mapping is and the wording of
// every argument error, which dockerd shows to the user of `docker run`.
//
// It must never reject a flag it does not know: a daemon newer than the shim may append one, and
// a proxy that exits on it breaks every published port of that daemon. Unknown flags are returned
// in Result.Ignored for the caller to log.
package proxyargs

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/envoy-docker-shim/envoy-docker-shim/internal/mapping"
)

// Args renders m as dockerd would pass it (without the program name).
func Args(m mapping.Mapping, useListenFD bool) []string {
	args := []string{
		"-proto", string(m.Proto),
		"-host-ip", m.HostIP.String(),
		"-host-port", strconv.Itoa(int(m.HostPort)),
		"-container-ip", m.ContainerIP.String(),
		"-container-port", strconv.Itoa(int(m.ContainerPort)),
	}
	if useListenFD {
		args = append(args, "-use-listen-fd")
	}
	return args
}

// Result is a parsed command line.
type Result struct {
	Mapping mapping.Mapping
	// UseListenFD is set by daemons 28.0 and later: fd 4 is the host socket, already bound (and
	// listening, for TCP). Without it, fd 4 belongs to someone else and must not be touched.
	UseListenFD bool
	// Version and Help ask for information only; the Mapping is then not validated.
	Version bool
	Help    bool
	// Ignored lists unknown flags (with their values) and stray arguments, in order.
	Ignored []string
}

// ErrUsage marks errors in the command line (as opposed to failures at run time).
var ErrUsage = errors.New("usage")

type usageError struct{ msg string }

func (e *usageError) Error() string        { return e.msg }
func (e *usageError) Is(target error) bool { return target == ErrUsage }

func usagef(format string, a ...any) error { return &usageError{fmt.Sprintf(format, a...)} }

// Usage describes the flags, for -help.
const Usage = `Usage: envoy-docker-shim -proto tcp|udp|sctp -host-ip IP -host-port PORT -container-ip IP -container-port PORT [-use-listen-fd]
       envoy-docker-shim -version

A drop-in replacement for Docker's docker-proxy (dockerd --userland-proxy-path): it hands the
published port to Envoy through envoy-docker-server and proxies UDP itself.
`

const (
	flagProto         = "proto"
	flagHostIP        = "host-ip"
	flagHostPort      = "host-port"
	flagContainerIP   = "container-ip"
	flagContainerPort = "container-port"
	flagUseListenFD   = "use-listen-fd"
)

func isValueFlag(name string) bool {
	switch name {
	case flagProto, flagHostIP, flagHostPort, flagContainerIP, flagContainerPort:
		return true
	}
	return false
}

func isBoolFlag(name string) bool {
	switch name {
	case flagUseListenFD, "version", "v", "help", "h":
		return true
	}
	return false
}

// Parse reads args (without the program name). A flag given twice keeps its last value, as with
// Go's flag package, which docker-proxy uses. Errors wrap ErrUsage and read well after
// "error starting userland proxy: ".
func Parse(args []string) (Result, error) {
	var r Result
	values := map[string]string{}
	for i := 0; i < len(args); i++ {
		arg := args[i]
		if arg == "--" {
			r.Ignored = append(r.Ignored, args[i+1:]...)
			break
		}
		if len(arg) < 2 || arg[0] != '-' {
			r.Ignored = append(r.Ignored, arg)
			continue
		}
		name := strings.TrimPrefix(arg[1:], "-")
		value, hasValue := "", false
		if j := strings.IndexByte(name, '='); j >= 0 {
			name, value, hasValue = name[:j], name[j+1:], true
		}
		switch {
		case name == "" || name[0] == '-':
			return r, usagef("bad flag syntax: %s", arg)
		case isValueFlag(name):
			if !hasValue {
				if i+1 >= len(args) {
					return r, usagef("flag needs an argument: -%s", name)
				}
				i++
				value = args[i]
			}
			values[name] = value
		case isBoolFlag(name):
			on := true
			if hasValue {
				b, err := strconv.ParseBool(value)
				if err != nil {
					return r, usagef("invalid boolean value %q for -%s", value, name)
				}
				on = b
			}
			switch name {
			case flagUseListenFD:
				r.UseListenFD = on
			case "version", "v":
				r.Version = on
			case "help", "h":
				r.Help = on
			}
		default:
			// A flag from a daemon newer than us. Without knowing its type, take the next
			// argument as its value unless that looks like a flag: docker-proxy has no
			// positional arguments, so nothing else could be meant by it.
			if !hasValue && i+1 < len(args) && !strings.HasPrefix(args[i+1], "-") {
				i++
				arg += " " + args[i]
			}
			r.Ignored = append(r.Ignored, arg)
		}
	}
	if r.Version || r.Help {
		return r, nil
	}
	err := setMapping(&r.Mapping, values)
	return r, err
}

func setMapping(m *mapping.Mapping, values map[string]string) error {
	proto, ok := values[flagProto]
	if !ok {
		proto = string(mapping.TCP) // docker-proxy's default
	}
	p, err := mapping.ParseProtocol(proto)
	if err != nil {
		return usagef("unsupported protocol %q for -%s: want tcp, udp or sctp", proto, flagProto)
	}
	m.Proto = p
	hostIP, ok := values[flagHostIP]
	if !ok {
		hostIP = "0.0.0.0" // docker-proxy's default
	}
	if m.HostIP, err = parseIP(flagHostIP, hostIP); err != nil {
		return err
	}
	if m.HostPort, err = parsePort(values, flagHostPort); err != nil {
		return err
	}
	containerIP, ok := values[flagContainerIP]
	if !ok {
		return usagef("missing -%s", flagContainerIP)
	}
	if m.ContainerIP, err = parseIP(flagContainerIP, containerIP); err != nil {
		return err
	}
	if m.ContainerIP.IsUnspecified() {
		return usagef("invalid -%s %q: the container's address cannot be unspecified", flagContainerIP, containerIP)
	}
	if m.ContainerPort, err = parsePort(values, flagContainerPort); err != nil {
		return err
	}
	return nil
}

func parseIP(flag, s string) (netip.Addr, error) {
	ip, err := netip.ParseAddr(s)
	if err != nil || ip.Zone() != "" {
		return netip.Addr{}, usagef("invalid -%s %q: not an IP address", flag, s)
	}
	// docker-proxy treats an IPv4-mapped IPv6 address as IPv4 (net.IP.To4), and so do we.
	return ip.Unmap(), nil
}

func parsePort(values map[string]string, flag string) (uint16, error) {
	s, ok := values[flag]
	if !ok {
		return 0, usagef("missing -%s", flag)
	}
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil && !errors.Is(err, strconv.ErrRange) {
		return 0, usagef("invalid -%s %q: not a port number", flag, s)
	}
	if err != nil || n < 1 || n > 65535 {
		return 0, usagef("invalid -%s %q: port out of range (1-65535)", flag, s)
	}
	return uint16(n), nil
}
