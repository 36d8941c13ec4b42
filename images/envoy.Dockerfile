# Envoy for the appliance: the official Envoy image plus envoy-entrypoint, which renders the
# bootstrap from environment variables (ENVOY_BASE_ID, ENVOY_PORT, EDS_XDS_ADDR, ...) and execs Envoy.
#
#   docker build -f images/envoy.Dockerfile -t envoy-docker-shim/envoy .   (from the repository root)
#
# ENVOY_IMAGE must hold Envoy at /usr/local/bin/envoy (the official image does; ENVOY_BINARY
# changes the path). Classic-builder syntax only, like the other images.
ARG GO_IMAGE=golang:1.26-bookworm
ARG ENVOY_IMAGE=envoyproxy/envoy:v1.40.0

FROM ${GO_IMAGE} AS build
ARG GOPROXY
ARG GOFLAGS
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath \
      -ldflags "-s -w -X github.com/envoy-docker-shim/envoy-docker-shim/internal/buildinfo.Version=${VERSION}" \
      -o /out/envoy-entrypoint ./envoy/cmd/envoy-entrypoint

FROM ${ENVOY_IMAGE}
ARG VERSION=dev
ARG ENVOY_IMAGE
LABEL org.opencontainers.image.title="envoy-docker-shim-envoy" \
      org.opencontainers.image.description="Envoy serving every port published with docker run -p, configured over xDS by envoy-docker-server" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/envoy-docker-shim/envoy-docker-shim" \
      org.opencontainers.image.base.name="${ENVOY_IMAGE}"
COPY --from=build /out/envoy-entrypoint /usr/local/bin/envoy-entrypoint
# root, deliberately (the official image would drop to the envoy user): Envoy binds every published
# port beside sockets that root-owned processes hold (the shim, and on daemons 28+ dockerd's own
# socket, handed over with SO_REUSEPORT), and the kernel lets a socket join a SO_REUSEPORT group
# only if it has the same owner. Published ports below 1024 need root as well.
USER 0:0
# Healthy once Envoy's admin /ready answers 200: Envoy has its first configuration and serves.
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/envoy-entrypoint", "-healthcheck"]
ENTRYPOINT ["/usr/local/bin/envoy-entrypoint"]
# Arguments given to the container are appended to Envoy's command line; none by default (and not
# the base image's CMD, which names its own bootstrap).
CMD []
