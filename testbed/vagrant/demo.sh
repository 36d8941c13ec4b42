#!/usr/bin/env bash
# Runs the demo container on the VM's dockerd: the test suite's echo server (testbed/echoserver, a
# static binary in a FROM-scratch image built here, so no registry is needed), published on 8080
# with the labels its Envoy stats are named after (demo-vagrant):
#
#   docker run -d --name demo -p 8080:80 -l ServiceName=demo -l EnvironmentName=vagrant ...
#
# It waits for the appliance first: the shim reports a port published only once Envoy serves it,
# so `docker run -p` fails while Envoy is not connected. Rerunning it replaces the container.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
IMAGE=envoy-docker-shim/demo:dev
HEALTHZ="http://${EDS_HTTP_ADDR:-127.0.0.1:18001}/healthz"
WAIT_SECONDS=${EDS_DEMO_WAIT_SECONDS:-300}

deadline=$((SECONDS + WAIT_SECONDS))
until curl -fsS --max-time 2 -o /dev/null "$HEALTHZ"; do
	if [ "$SECONDS" -ge "$deadline" ]; then
		echo "demo.sh: envoy-docker-server did not report Envoy connected ($HEALTHZ) within ${WAIT_SECONDS}s" >&2
		docker ps -a >&2
		exit 1
	fi
	sleep 2
done

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
# Plain module settings: base-images.sh's GOPROXY points into the Go stand-in image, not here.
env -u GOPROXY -u GOFLAGS CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o "$ctx/echoserver" ./testbed/echoserver
cat >"$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY echoserver /echoserver
EXPOSE 80
STOPSIGNAL SIGTERM
ENTRYPOINT ["/echoserver"]
DOCKERFILE
docker build -q -t "$IMAGE" "$ctx"
docker rm -f demo >/dev/null 2>&1 || true
docker run -d --name demo --restart unless-stopped -p 8080:80 -e ECHO_NAME=demo \
	-l ServiceName=demo -l EnvironmentName=vagrant "$IMAGE"
