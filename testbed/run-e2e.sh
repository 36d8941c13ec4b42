#!/usr/bin/env bash
# Runs the end-to-end suite by hand: provisions the machine if anything is missing, then
# `make e2e`. Needs root (it starts dockerd and creates bridges). Extra arguments go to make,
# e.g. testbed/run-e2e.sh GOFLAGS='-run=TestStockDockerProxy -v'.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "$(id -u)" -ne 0 ]; then
	exec sudo -E env "PATH=$PATH" "$0" "$@"
fi
testbed/provision.sh --check 2>/dev/null || testbed/provision.sh
eval "$(testbed/provision.sh --env)"
export ENVOY_BIN DOCKER29_DIR
exec make e2e "$@"
