package netfilter

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// Sysctls are the kernel's network settings, as files under Dir: /proc/sys/net on the host. In a
// container /proc/sys is read-only, so compose mounts the host's /proc/sys/net elsewhere for the
// server to write.
type Sysctls struct {
	Dir string
}

// EnableForwarding turns on forwarding for the IP versions whose networks send traffic out: nothing
// leaves a bridge without it. It never turns forwarding off (other things on the host may need it,
// and dockerd never does either). dockerd itself turns it on too, unless run with --ip-forward=false:
// 20.10 for IPv4, 27 and later also for IPv6 when a network has IPv6, setting all and default as
// here. It returns the settings it changed, as sysctl names them.
func (s Sysctls) EnableForwarding(ipv4, ipv6 bool) ([]string, error) {
	var files []string
	if ipv4 {
		files = append(files, "ipv4/ip_forward")
	}
	if ipv6 {
		// default first: all also sets default, but default is checked on its own too.
		files = append(files, "ipv6/conf/default/forwarding", "ipv6/conf/all/forwarding")
	}
	var changed []string
	var errs []error
	for _, f := range files {
		path := filepath.Join(s.Dir, f)
		name := "net." + strings.ReplaceAll(f, "/", ".")
		cur, err := os.ReadFile(path)
		if errors.Is(err, fs.ErrNotExist) && strings.HasPrefix(f, "ipv6/") {
			continue // IPv6 is off in this kernel: no IPv6 network can exist either
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("reading %s: %w", name, err))
			continue
		}
		if string(bytes.TrimSpace(cur)) != "0" {
			continue
		}
		if err := os.WriteFile(path, []byte("1\n"), 0o644); err != nil {
			errs = append(errs, fmt.Errorf("%s is 0 and could not be set to 1 (%w): containers cannot reach anything outside the host until it is; run sysctl -w %s=1 on the host", name, err, name))
			continue
		}
		changed = append(changed, name)
	}
	return changed, errors.Join(errs...)
}

// EnableTCPMigrateReq sets net.ipv4.tcp_migrate_req to 1: when a listening socket of a
// SO_REUSEPORT group closes, the kernel moves its accept queue and the handshakes in progress to
// another socket of the group instead of resetting them. Every published TCP port is such a group
// (the shim's socket beside Envoy's: package shim/handover), so what a stopping or killed Envoy
// had queued goes to the shim, which serves the port until Envoy is back. Only sockets in
// SO_REUSEPORT groups are affected; the setting is per network namespace (the host's, where the
// server runs). It never turns the setting off, and reports whether it changed it.
func (s Sysctls) EnableTCPMigrateReq() (bool, error) {
	const name = "net.ipv4.tcp_migrate_req"
	path := filepath.Join(s.Dir, "ipv4", "tcp_migrate_req")
	cur, err := os.ReadFile(path)
	if err != nil {
		return false, fmt.Errorf("reading %s (kernels before 5.14 lack it): %w", name, err)
	}
	if string(bytes.TrimSpace(cur)) != "0" {
		return false, nil
	}
	if err := os.WriteFile(path, []byte("1\n"), 0o644); err != nil {
		return false, fmt.Errorf("%s is 0 and could not be set to 1 (%w): a restarted Envoy may reset the few connections it had queued; run sysctl -w %s=1 on the host", name, err, name)
	}
	return true, nil
}
