#!/usr/bin/env bash
# Provisions the Vagrant testbed VM; testbed/Vagrantfile runs it as root. The steps below are the
# machine setup CI uses (testbed/provision.sh), then the appliance's own install steps as the
# README's Quick start gives them, on the VM's system dockerd, then a labelled demo container.
# The README's "Try it in a VM" lists the same lines, and testbed/vagrant's test fails when they
# differ.
#
# EDS_VAGRANT_OFFLINE=true: the VM has no network (the box `make testbed-box` builds carries what
# would be downloaded), so the images are built from stand-ins of their base images, made the way
# the end-to-end tests make them. Otherwise compose pulls the official base images.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export EDS_VAGRANT_OFFLINE="${EDS_VAGRANT_OFFLINE:-false}"
# Compose v2 when the plugin is there, else Debian's docker-compose 1.29, as the Makefile picks.
# shellcheck disable=SC2034 # the steps use it
if docker compose version >/dev/null 2>&1; then COMPOSE="docker compose"; else COMPOSE=docker-compose; fi

total=$SECONDS
# Each line is one step, run as written (base-images.sh is sourced: it sets the build arguments
# of the compose steps after it); stdin is not the list, so no step can swallow the rest.
while IFS= read -r -u 3 step; do
	echo "==> $step"
	start=$SECONDS
	if ! eval "$step" </dev/null; then
		echo "==> failed: $step" >&2
		if [ "$EDS_VAGRANT_OFFLINE" = true ]; then
			echo "    The VM has no network: everything a step needs must be in the box. A box built" >&2
			echo "    before testbed/provision.sh or go.mod last changed lacks what they add now: rebuild" >&2
			echo "    it on the host (sudo make testbed-box), then: sudo make testbed-destroy testbed-up" >&2
		fi
		exit 1
	fi
	echo "    done in $((SECONDS - start))s"
done 3<<'STEPS'
testbed/vagrant/go.sh
testbed/provision.sh
. testbed/vagrant/base-images.sh
$COMPOSE build
EDS_CONFIGURE_DOCKERD=true $COMPOSE run --rm installer
systemctl restart docker
ENVOY_UI_ADDRESS=0.0.0.0 EDS_HEALTHCHECK_TIMEOUT=30s $COMPOSE up -d
testbed/vagrant/demo.sh
STEPS
echo "==> provisioned in $((SECONDS - total))s; check it with: make testbed-smoke"
