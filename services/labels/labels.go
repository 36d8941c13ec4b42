// Package labels turns a container's labels into the service a published port belongs to:
// its name in Envoy's stats (ServiceName-EnvironmentName), its tracing operation, its proxy mode,
// whether its traffic is access-logged and whether the container is sent PROXY protocol headers. It does no I/O; label values are outside input and every one is sanitised or rejected.
package labels

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/envoy-docker-shim/envoy-docker-shim/services/registry"
)

// The labels users put on containers, as the seed project named them.
const (
	ServiceNameLabel     = "ServiceName"
	EnvironmentNameLabel = "EnvironmentName"
	ProxyModeLabel       = "ProxyMode"
	AccessLogLabel       = "AccessLog"
	ProxyProtocolLabel   = "ProxyProtocol"
)

// maxNameLen keeps stat names readable and well under Envoy's limits.
const maxNameLen = 100

// Container is what the Docker API tells about the container behind a container IP.
type Container struct {
	ID     string
	Name   string
	Labels map[string]string
}

// ParseMode reads the ProxyMode label: empty means http (the default), otherwise http or tcp.
func ParseMode(value string) (registry.Mode, error) {
	switch strings.ToLower(strings.TrimSpace(value)) {
	case "", "http":
		return registry.ModeHTTP, nil
	case "tcp":
		return registry.ModeTCP, nil
	}
	return "", fmt.Errorf("label %s=%q is not supported: use %s=http (the default) or %s=tcp",
		ProxyModeLabel, value, ProxyModeLabel, ProxyModeLabel)
}

// ParseAccessLog reads the AccessLog label: empty follows the server's EDS_ACCESS_LOG, otherwise
// true or false.
func ParseAccessLog(value string) (registry.Choice, error) {
	switch strings.ToLower(strings.TrimSpace(value)) {
	case "":
		return registry.ChoiceDefault, nil
	case "true":
		return registry.ChoiceOn, nil
	case "false":
		return registry.ChoiceOff, nil
	}
	return "", fmt.Errorf("label %s=%q is not supported: use %s=true to log every request (http) or connection (tcp) of this container, or %s=false",
		AccessLogLabel, value, AccessLogLabel, AccessLogLabel)
}

// ParseProxyProtocol reads the ProxyProtocol label: empty sends no header, v1 or v2 makes Envoy
// send that version of the PROXY protocol header to the container, which only a container in TCP
// mode can use (an HTTP-mode container already sees the client in X-Forwarded-For).
func ParseProxyProtocol(value string, mode registry.Mode) (registry.ProxyProtocol, error) {
	var version registry.ProxyProtocol
	switch strings.ToLower(strings.TrimSpace(value)) {
	case "":
		return registry.ProxyProtocolNone, nil
	case "v1", "1":
		version = registry.ProxyProtocolV1
	case "v2", "2":
		version = registry.ProxyProtocolV2
	default:
		return "", fmt.Errorf("label %s=%q is not supported: use %s=v1 (text header) or %s=v2 (binary header) to send the client's address to a container that reads the PROXY protocol, or leave it out",
			ProxyProtocolLabel, value, ProxyProtocolLabel, ProxyProtocolLabel)
	}
	if mode != registry.ModeTCP {
		return "", fmt.Errorf("label %s=%s needs %s=tcp: add the label %s=tcp (the container must then read the PROXY header), or drop %s: in http mode the container sees the client's address in X-Forwarded-For",
			ProxyProtocolLabel, value, ProxyModeLabel, ProxyModeLabel, ProxyProtocolLabel)
	}
	return version, nil
}

// Describe names the service of a mapping. c is nil when the container could not be found (the
// Docker API is down or slow): the port is still served, named after the container IP.
func Describe(c *Container, containerIP netip.Addr) (registry.Service, error) {
	if c == nil {
		name := Sanitize("container-" + containerIP.String())
		return registry.Service{Name: name, Operation: name, Mode: registry.ModeHTTP}, nil
	}
	mode, err := ParseMode(c.Labels[ProxyModeLabel])
	if err != nil {
		return registry.Service{}, err
	}
	accessLog, err := ParseAccessLog(c.Labels[AccessLogLabel])
	if err != nil {
		return registry.Service{}, err
	}
	proxyProtocol, err := ParseProxyProtocol(c.Labels[ProxyProtocolLabel], mode)
	if err != nil {
		return registry.Service{}, err
	}
	containerName := strings.TrimPrefix(c.Name, "/")
	base := c.Labels[ServiceNameLabel]
	if strings.TrimSpace(base) == "" {
		base = containerName
	}
	if base == "" {
		base = "container-" + containerIP.String()
	}
	full := base
	if env := c.Labels[EnvironmentNameLabel]; strings.TrimSpace(env) != "" {
		full = base + "-" + env
	}
	return registry.Service{
		Name:          Sanitize(full),
		Operation:     Sanitize(base),
		ContainerID:   c.ID,
		ContainerName: containerName,
		Mode:          mode,
		AccessLog:     accessLog,
		ProxyProtocol: proxyProtocol,
	}, nil
}

// Sanitize makes s safe as an Envoy stat name segment and a Prometheus label: letters, digits,
// '-' and '_' are kept, every other rune becomes '_' ('.' would split the stat name, ':' and
// spaces break exporters), runs of '_' collapse, and the result is never empty.
func Sanitize(s string) string {
	var b strings.Builder
	lastUnderscore := false
	for _, r := range s {
		keep := r == '-' || r == '_' || (r >= 'a' && r <= 'z') || (r >= 'A' && r <= 'Z') || (r >= '0' && r <= '9')
		if !keep {
			r = '_'
		}
		if r == '_' {
			if lastUnderscore {
				continue
			}
			lastUnderscore = true
		} else {
			lastUnderscore = false
		}
		b.WriteRune(r)
		if b.Len() >= maxNameLen {
			break
		}
	}
	out := strings.Trim(b.String(), "_")
	if out == "" {
		return "unnamed"
	}
	return out
}
