#!/usr/bin/env bash
# Makes sure the VM has the Go toolchain go.mod names (testbed/provision.sh needs one, and Debian
# 12's golang is too old) at /usr/local/go, with go and gofmt on root's PATH. The offline box
# carries it; elsewhere it comes from the Go module proxy as the module golang.org/toolchain,
# which is what the go command itself downloads when it switches toolchains.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

want=$(sed -n 's/^toolchain go//p' go.mod)
[ -n "$want" ] || want=$(sed -n 's/^go //p' go.mod)
[ -n "$want" ] || { echo "go.sh: go.mod names no Go version" >&2; exit 1; }
have=$(/usr/local/go/bin/go env GOVERSION 2>/dev/null || true)

if [ "$have" != "go$want" ]; then
	if [ "${EDS_VAGRANT_OFFLINE:-false}" = true ]; then
		echo "go.sh: go.mod wants Go $want, the box has ${have:-none} and the VM has no network: rebuild the box (make testbed-box)" >&2
		exit 1
	fi
	arch=$(dpkg --print-architecture)
	for tool in curl unzip; do
		command -v "$tool" >/dev/null || { apt-get update -q && apt-get install -y -q "$tool"; }
	done
	tmp=$(mktemp -d)
	trap 'rm -rf "$tmp"' EXIT
	version="v0.0.1-go$want.linux-$arch"
	echo "go.sh: fetching golang.org/toolchain@$version from the Go module proxy"
	curl -fsSL --retry 3 --max-time 900 -o "$tmp/go.zip" "https://proxy.golang.org/golang.org/toolchain/@v/$version.zip"
	unzip -q "$tmp/go.zip" -d "$tmp"
	"$tmp/golang.org/toolchain@$version/bin/go" version >/dev/null
	rm -rf /usr/local/go
	mv "$tmp/golang.org/toolchain@$version" /usr/local/go
fi
ln -sf /usr/local/go/bin/go /usr/local/bin/go
ln -sf /usr/local/go/bin/gofmt /usr/local/bin/gofmt
echo "go.sh: $(go version)"
