// Package labels turns a container's labels into the service a published port belongs to:
// its name in Envoy's stats (ServiceName-EnvironmentName), its tracing operation, its proxy mode,
// whether its traffic is access-logged and whether the container is sent PROXY protocol headers. It does no I/O; label values are outside input and every one is sanitised or rejected.
package labels

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/netip"
	"strings"
	"unicode/utf8"

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
	Image  string
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
		name := ipName(containerIP)
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
	// The container's name stands in for a ServiceName that is missing or has nothing readable
	// in it (no letter or digit survives sanitising, e.g. 服务), and the container IP for both.
	standIn := containerName
	if !readable(clean(standIn)) {
		standIn = ipName(containerIP)
	}
	// Spaces around a value are a slip of the keyboard, not part of the name.
	base := strings.TrimSpace(c.Labels[ServiceNameLabel])
	if base == "" {
		base = standIn
	}
	env := strings.TrimSpace(c.Labels[EnvironmentNameLabel])
	return registry.Service{
		Name:             StatName(base, env, standIn),
		Operation:        StatName(base, "", standIn),
		ContainerID:      c.ID,
		ContainerName:    Display(containerName),
		Mode:             mode,
		AccessLog:        accessLog,
		ProxyProtocol:    proxyProtocol,
		ServiceLabel:     Display(c.Labels[ServiceNameLabel]),
		EnvironmentLabel: Display(c.Labels[EnvironmentNameLabel]),
		Image:            Display(c.Image),
	}, nil
}

// ipName names the service of a container known only by its IP. Its characters are replaced
// one for one, so two addresses never share a name.
func ipName(ip netip.Addr) string {
	return "container-" + strings.NewReplacer(".", "_", ":", "_").Replace(ip.Unmap().String())
}

// hashLen is the length of the suffix that keeps a changed name distinct: 8 hex digits of a
// SHA-256 of the label's value (one collision in 4 billion pairs).
const hashLen = 8

// StatName is the name Envoy's stats and Prometheus know a service by: service, and env after a
// '-' when set. A value kept as written is used as it is (web-prod). One that had to be changed,
// because it has characters a stat name cannot hold, or is longer than maxNameLen, gets a short
// hash of the original ("caf_-prod-1a2b3c4d" for café/prod), so that two services whose names
// sanitise alike (a.b and a_b) stay apart; where the service has nothing readable left (服务),
// standIn (the container's name) takes its place. The result is at most maxNameLen bytes of
// letters, digits, '-' and '_', and never empty.
func StatName(service, env, standIn string) string {
	original := service
	if env != "" {
		original += "-" + env
	}
	name := clean(service)
	if !readable(name) {
		name = clean(standIn)
	}
	if !readable(name) {
		name = "unnamed"
	}
	if e := clean(env); readable(e) {
		name += "-" + e
	}
	if name == original && len(name) <= maxNameLen {
		return name
	}
	sum := sha256.Sum256([]byte(original))
	keep := maxNameLen - 1 - hashLen
	if len(name) > keep {
		name = strings.TrimRight(name[:keep], "_-")
	}
	return name + "-" + hex.EncodeToString(sum[:])[:hashLen]
}

// maxDisplayLen bounds a label value kept for display (the service info metric): a long label
// is cut, at a character boundary, and marked with an ellipsis.
const maxDisplayLen = 256

// Display is a label value as an operator should see it: as written, but valid UTF-8 (Prometheus
// refuses anything else) and at most maxDisplayLen bytes.
func Display(s string) string {
	s = strings.ToValidUTF8(s, "\uFFFD")
	if len(s) <= maxDisplayLen {
		return s
	}
	const ellipsis = "…"
	cut := maxDisplayLen - len(ellipsis)
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + ellipsis
}

// Sanitize makes s safe as an Envoy stat name segment and a Prometheus label: letters, digits,
// '-' and '_' are kept, every other rune becomes '_' ('.' would split the stat name, ':' and
// spaces break exporters), runs of '_' collapse, it is cut to maxNameLen, and the result is never
// empty. Service names use StatName, which also keeps changed names distinct.
func Sanitize(s string) string {
	out := clean(s)
	if len(out) > maxNameLen {
		out = strings.TrimRight(out[:maxNameLen], "_")
	}
	if out == "" {
		return "unnamed"
	}
	return out
}

// clean replaces every rune but letters, digits, '-' and '_' with '_', collapses runs of '_' and
// trims them from both ends.
func clean(s string) string {
	var b strings.Builder
	lastUnderscore := false
	for _, r := range s {
		if !isNameRune(r) {
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
	}
	return strings.Trim(b.String(), "_")
}

func isNameRune(r rune) bool {
	return r == '-' || r == '_' || (r >= 'a' && r <= 'z') || (r >= 'A' && r <= 'Z') || (r >= '0' && r <= '9')
}

// readable says whether a cleaned name has a letter or digit: "-" or "_-_" names nothing.
func readable(s string) bool {
	return strings.ContainsFunc(s, func(r rune) bool { return r != '-' && r != '_' })
}
