# envoy-docker-server: the registry of published ports and Envoy's xDS control plane.
#
#   docker build -f images/server.Dockerfile -t envoy-docker-shim/server .   (from the repository root)
#
# Written for the classic builder too (DOCKER_BUILDKIT=0, docker-compose 1.29): no BuildKit-only
# syntax. Every base image is a build argument, so an offline build can pass local stand-ins;
# GOPROXY and GOFLAGS are build arguments so it can point `go` at a local module proxy.
ARG GO_IMAGE=golang:1.26-bookworm
ARG RUNTIME_IMAGE=scratch

FROM ${GO_IMAGE} AS build
ARG GOPROXY
ARG GOFLAGS
WORKDIR /src
# Modules first: this layer is reused while only the project's own sources change, and the four
# images share it.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath \
      -ldflags "-s -w -X github.com/envoy-docker-shim/envoy-docker-shim/internal/buildinfo.Version=${VERSION}" \
      -o /out/envoy-docker-server ./services/cmd/envoy-docker-server

# A static binary and nothing else.
FROM ${RUNTIME_IMAGE}
ARG VERSION=dev
LABEL org.opencontainers.image.title="envoy-docker-server" \
      org.opencontainers.image.description="Registry of Docker's published ports and xDS control plane for the host's Envoy (envoy-docker-shim appliance)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/envoy-docker-shim/envoy-docker-shim"
COPY --from=build /out/envoy-docker-server /envoy-docker-server
# root: the server serves the registration API on a root-only (0600) Unix socket under /run, which
# the shims (run by dockerd as root) reach, and reads the Docker socket, which is root's.
USER 0:0
# Healthy once the registration socket answers (before Envoy connects: resync waits for this).
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
  CMD ["/envoy-docker-server", "-healthcheck"]
ENTRYPOINT ["/envoy-docker-server"]
