package installer

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"
)

// Done lists what the run changed (or found unchanged), one line each.
func (r Result) Done() []string {
	var out []string
	if r.Uninstall {
		switch {
		case r.DaemonChanged && r.DaemonCreated:
			out = append(out, fmt.Sprintf("%s: removed; the installer had created it (backup: %s)", r.DaemonJSON, r.Backup))
		case r.DaemonChanged:
			out = append(out, fmt.Sprintf("%s: restored the values it had before the install (backup: %s)", r.DaemonJSON, r.Backup))
		}
		for _, k := range r.Kept {
			out = append(out, fmt.Sprintf("%s: %q was changed after the install; left as it is", r.DaemonJSON, k))
		}
		if r.ShimChanged {
			out = append(out, "removed "+r.ShimPath)
		} else {
			out = append(out, r.ShimPath+" was not installed")
		}
		switch {
		case r.TableRemoved:
			out = append(out, fmt.Sprintf("removed the nftables table inet %s: containers' outbound NAT, forwarding and isolation rules (dockerd makes its own again once it restarts with iptables on)", r.NftTable))
		case r.TableChecked:
			out = append(out, fmt.Sprintf("no nftables table inet %s to remove", r.NftTable))
		}
		return out
	}
	if r.ShimChanged {
		out = append(out, fmt.Sprintf("installed %s (%s)", r.ShimPath, r.Version))
	} else {
		out = append(out, fmt.Sprintf("%s is up to date (%s)", r.ShimPath, r.Version))
	}
	switch {
	case r.DaemonChanged:
		var parts []string
		for _, p := range r.Set {
			was := "absent"
			if p.Present {
				was = compact(p.Value)
			}
			parts = append(parts, fmt.Sprintf("%q: %s (was %s)", p.Key, compact(r.wantValue(p.Key)), was))
		}
		verb := "set"
		if r.DaemonCreated {
			verb = "created with"
		}
		line := fmt.Sprintf("%s: %s %s", r.DaemonJSON, verb, strings.Join(parts, ", "))
		if r.Backup != "" {
			line += fmt.Sprintf("; backup: %s", r.Backup)
		}
		out = append(out, line)
	case r.ConfigureAsked:
		out = append(out, r.DaemonJSON+": already makes dockerd run the shim; not changed")
	case r.Configured:
		out = append(out, r.DaemonJSON+": already makes dockerd run the shim (EDS_CONFIGURE_DOCKERD is not true, so it was not touched)")
	default:
		out = append(out, r.DaemonJSON+": not changed (EDS_CONFIGURE_DOCKERD is not true)")
	}
	if r.MarkCleared {
		out = append(out, fmt.Sprintf("envoy-docker-server restores its netfilter rules again (nftables table inet %s): the mark of an earlier uninstall is gone", r.NftTable))
	}
	if !r.ShimChanged && !r.DaemonChanged && r.Configured {
		out = append(out, "nothing changed: nothing to restart")
	}
	return out
}

func (r Result) wantValue(key string) json.RawMessage {
	for _, w := range wanted(r.ShimPath) {
		if w.key == key {
			return w.want
		}
	}
	return nil
}

// Next lists what the operator has to do, in order: exactly what to restart and what that does to
// running containers.
func (r Result) Next() []string {
	if r.Uninstall {
		return r.nextUninstall()
	}
	restart := "Restart dockerd so that it reads daemon.json, which it reads only when it starts: systemctl restart docker."
	var next []string
	switch {
	case r.DaemonChanged:
		next = append(next,
			restart+" If dockerd's command line sets --userland-proxy-path, --iptables, --ip6tables or --userland-proxy (see systemctl cat docker), remove them there first: dockerd refuses to start when a setting is both a flag and in daemon.json.",
			r.restartEffect())
		if r.IPTablesChanged {
			next = append(next, "dockerd leaves behind the iptables rules it made while \"iptables\" was on: after the restart, list them with iptables -t nat -S DOCKER and delete the DNAT rules of published ports (or reboot), because such a rule sends a port's outside traffic past Envoy.")
		}
		if r.IP6TablesChanged {
			next = append(next, "Docker 27 and later also leave the IPv6 rules they made while \"ip6tables\" was on (its default there): list them with ip6tables -t nat -S DOCKER and delete the DNAT rules of published ports (or reboot).")
		}
		next = append(next, "Keep the appliance running (docker compose up -d): with the shim configured, docker run -p fails while envoy-docker-server is down.")
	case r.Configured && r.ShimChanged:
		next = append(next, "No restart needed: dockerd runs the new shim for every port published from now on. Ports published earlier keep their current shim process until their container restarts.")
	case r.Configured:
		// Nothing changed; Done says so.
	default:
		next = append(next,
			fmt.Sprintf("To make dockerd use the shim, run the installer again with EDS_CONFIGURE_DOCKERD=true, or add to %s: %q: %q, %q: false, %q: false.", r.DaemonJSON, KeyProxyPath, r.ShimPath, KeyIPTables, KeyIP6Tables),
			restart,
			r.restartEffect())
	}
	return next
}

// restartEffect says what restarting dockerd does to the containers running now.
func (r Result) restartEffect() string {
	if r.LiveRestore {
		return "live-restore is on: running containers keep running through the dockerd restart, and their published ports stay on docker-proxy (and its iptables rules) until each container is restarted (docker restart NAME). Ports published after the restart go through the shim and Envoy."
	}
	return "Restarting dockerd stops every running container. Containers with restart policy always or unless-stopped (the appliance's server and envoy among them) are started again by dockerd; start the others with docker start. Their ports then go through the shim and Envoy."
}

func (r Result) nextUninstall() []string {
	switch {
	case r.DaemonChanged:
		next := []string{
			fmt.Sprintf("Restart dockerd so that it goes back to docker-proxy: systemctl restart docker. Until then it still runs %s, which is gone, for every port published, so docker run -p fails.", r.ShimPath),
		}
		if r.LiveRestore {
			next = append(next, "live-restore is on: running containers keep running through the restart with their shim processes, which need the appliance, until each container is restarted (docker restart NAME).")
		} else {
			next = append(next, "Restarting dockerd stops every running container; the ones started again (restart policy, or docker start) publish their ports through docker-proxy.")
		}
		return append(next, fmt.Sprintf("Then stop the appliance: docker compose down (once pgrep -f %s finds no shim left).", r.ShimPath))
	case r.Configured:
		return []string{fmt.Sprintf("%s still names %s as %q, which this installer did not set: remove that key (and \"iptables\": false, if it was set for the shim), then restart dockerd: systemctl restart docker. Until then docker run -p fails.", r.DaemonJSON, r.ShimPath, KeyProxyPath)}
	default:
		return []string{"dockerd was not configured by this installer: nothing to restart. Stop the appliance with docker compose down."}
	}
}

func compact(raw json.RawMessage) string {
	var b bytes.Buffer
	if json.Compact(&b, raw) != nil {
		return string(raw)
	}
	return b.String()
}

func jsonMarshalIndent(v any) ([]byte, error) {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

func jsonUnmarshalStrict(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	return dec.Decode(v)
}
