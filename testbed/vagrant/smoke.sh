#!/usr/bin/env bash
# Smoke check of the Vagrant testbed (make testbed-smoke runs both halves):
#
#   smoke.sh          in the VM, as root: the shim is dockerd's userland proxy for the demo's
#                     port, the demo answers through Envoy, Envoy counts it under the name its
#                     labels give (demo-vagrant), the UI answers
#   smoke.sh --host   on the host: the demo and the UI through the ports forwarded to 127.0.0.1
#
# Every request goes to 127.0.0.1 and is bounded in time; each check prints what it saw, and the
# first one that fails ends the run with exit status 1.
set -euo pipefail

DEMO=demo
SERVICE=demo-vagrant        # ServiceName-EnvironmentName
SHIM=/usr/local/bin/envoy-docker-shim
ADMIN=http://127.0.0.1:9901 # Envoy's admin interface (ENVOY_PORT), loopback in the VM
SERVER=http://127.0.0.1:18001
REQUESTS=5

fail() { echo "FAIL: $*" >&2; exit 1; }
ok() { echo "ok:   $*"; }
get() { curl -fsS --max-time 5 "$@"; }

# stat NAME prints an Envoy counter, or nothing if Envoy has no such counter.
stat() { get "$ADMIN/stats?filter=^$(printf '%s' "$1" | sed 's/\./\\./g')\$" | sed -n "s/^$1: //p"; }

# demo_requests URL COUNT: each answer must come from the demo container.
demo_requests() {
	local i body
	for ((i = 0; i < $2; i++)); do
		body=$(get "$1/smoke-$i") || fail "GET $1/smoke-$i failed"
		[[ $body == *"\"name\":\"$DEMO\""* ]] || fail "GET $1/smoke-$i was not answered by the demo container: $body"
	done
}

in_vm() {
	[ "$(id -u)" -eq 0 ] || fail "run as root in the VM (vagrant ssh -c 'sudo /vagrant/testbed/vagrant/smoke.sh')"

	# 1. dockerd runs the shim as its userland proxy, for the demo's published port.
	grep -q "\"userland-proxy-path\": *\"$SHIM\"" /etc/docker/daemon.json ||
		fail "/etc/docker/daemon.json does not name $SHIM as userland-proxy-path: $(cat /etc/docker/daemon.json)"
	local dockerd pid found=""
	dockerd=$(pidof dockerd) || fail "dockerd is not running"
	for pid in $(pgrep -P "$dockerd"); do
		[ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = "$SHIM" ] || continue
		if tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "-host-ip 0.0.0.0 -host-port 8080 "; then
			found=$pid
		fi
	done
	[ -n "$found" ] || fail "no child of dockerd ($dockerd) runs $SHIM for 0.0.0.0:8080; its children: $(pgrep -a -P "$dockerd" || true)"
	! pgrep -x docker-proxy >/dev/null || fail "docker-proxy runs: $(pgrep -a -x docker-proxy)"
	ok "dockerd ($dockerd) runs the shim for 0.0.0.0:8080 (pid $found: $(tr '\0' ' ' <"/proc/$found/cmdline")); no docker-proxy"

	# 2. Envoy serves the port, under the name the labels give.
	get "$ADMIN/listeners" | grep -qx "tcp_0.0.0.0_8080::0.0.0.0:8080" || fail "Envoy has no listener tcp_0.0.0.0_8080: $(get "$ADMIN/listeners")"
	get "$SERVER/registrations" | grep -q "\"service\": *\"$SERVICE\"" || fail "the server has no registration named $SERVICE: $(get "$SERVER/registrations")"
	ok "Envoy listens on 0.0.0.0:8080; the server registered it as $SERVICE"

	# 3. The demo answers through Envoy, and Envoy counts exactly those requests under its name.
	local before after upstream
	before=$(stat "http.$SERVICE.downstream_rq_total")
	[ -n "$before" ] || fail "Envoy has no counter http.$SERVICE.downstream_rq_total"
	demo_requests http://127.0.0.1:8080 "$REQUESTS"
	after=$(stat "http.$SERVICE.downstream_rq_total")
	[ "$after" -eq $((before + REQUESTS)) ] ||
		fail "http.$SERVICE.downstream_rq_total went from $before to $after after $REQUESTS requests"
	upstream=$(stat "cluster.$SERVICE.upstream_rq_total")
	if [ -z "$upstream" ] || [ "$upstream" -lt "$REQUESTS" ]; then
		fail "cluster.$SERVICE.upstream_rq_total is '$upstream', want at least $REQUESTS"
	fi
	ok "$REQUESTS requests answered by the demo; http.$SERVICE.downstream_rq_total $before -> $after, cluster.$SERVICE.upstream_rq_total $upstream"

	# 4. The UI.
	check_ui http://127.0.0.1:8081
}

# check_ui URL: the page, and the demo's counters through the UI's read-only /stats.
check_ui() {
	local page stats
	page=$(get "$1/") || fail "GET $1/ failed"
	[[ $page == *"<title>envoy-docker-shim</title>"* ]] || fail "$1/ is not the UI: ${page:0:300}"
	stats=$(get "$1/stats?filter=^http\.$SERVICE\.downstream_rq_total\$") || fail "GET $1/stats failed"
	[[ $stats == "http.$SERVICE.downstream_rq_total: "* ]] || fail "the UI's /stats lacks http.$SERVICE.downstream_rq_total: $stats"
	ok "the UI answers at $1/ (${stats})"
}

# ui_stat URL NAME prints an Envoy counter read through the UI's /stats.
ui_stat() { get "$1/stats?filter=^$(printf '%s' "$2" | sed 's/\./\\./g')\$" | sed -n "s/^$2: //p"; }

on_host() {
	local demo_port=${EDS_VAGRANT_DEMO_PORT:-8080} ui_port=${EDS_VAGRANT_UI_PORT:-8081} before after
	local ui="http://127.0.0.1:$ui_port" counter="http.$SERVICE.downstream_rq_total"
	check_ui "$ui"
	# The requests reach the VM's Envoy: its counter, read through the UI, goes up by them.
	before=$(ui_stat "$ui" "$counter")
	demo_requests "http://127.0.0.1:$demo_port" "$REQUESTS"
	after=$(ui_stat "$ui" "$counter")
	[ "$after" -eq $((before + REQUESTS)) ] || fail "$counter went from $before to $after after $REQUESTS requests from the host"
	ok "$REQUESTS requests to 127.0.0.1:$demo_port answered by the demo through the VM's Envoy ($counter $before -> $after)"
}

case "${1:-}" in
"") in_vm ;;
--host) on_host ;;
*) fail "usage: smoke.sh [--host]" ;;
esac
echo "smoke check passed"
