# shellcheck shell=bash
# Sourced by provision-vm.sh before the compose steps: the base images the appliance's images are
# built from.
#
# EDS_VAGRANT_OFFLINE=true: no registry can be reached, so stand-ins for golang:1.26-bookworm and
# envoyproxy/envoy are imported into the VM's dockerd (testbed/cmd/eds-standins; the box carries
# their tarballs, made from its Go toolchain, module cache and Envoy) and EDS_GO_IMAGE,
# EDS_ENVOY_IMAGE, GOPROXY and GOFLAGS are exported, the build arguments compose.yaml passes to
# the Dockerfiles. Otherwise nothing is set and compose pulls the official images.
if [ "${EDS_VAGRANT_OFFLINE:-false}" = true ]; then
	eds_standins=$(go run ./testbed/cmd/eds-standins)
	eval "$eds_standins"
	unset eds_standins
	echo "base images: stand-ins $EDS_GO_IMAGE and $EDS_ENVOY_IMAGE, modules from $GOPROXY"
else
	echo "base images: the official ones, pulled by compose"
fi
