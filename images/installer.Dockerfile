# The installer: copies the static envoy-docker-shim into a host directory mounted at /host/bin,
# optionally merges the shim's settings into the host's daemon.json (mounted at /host/etc/docker),
# and prints what to restart. See compose.yaml's installer service for the mounts and variables.
#
#   docker build -f images/installer.Dockerfile -t envoy-docker-shim/installer .   (from the repository root)
ARG GO_IMAGE=golang:1.26-bookworm
ARG RUNTIME_IMAGE=scratch

FROM ${GO_IMAGE} AS build
ARG GOPROXY
ARG GOFLAGS
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
# The shim lands on arbitrary hosts: it must not depend on any libc (CGO_ENABLED=0). On amd64 its
# entry point is its fast start (package idle; idle.LinkFlag).
RUN CGO_ENABLED=0 go build -trimpath \
      -ldflags "-s -w -X github.com/envoy-docker-shim/envoy-docker-shim/internal/buildinfo.Version=${VERSION} $(if [ "$(go env GOARCH)" = amd64 ]; then echo -E=_rt0_envoy_docker_shim; fi)" \
      -o /out/ ./shim/cmd/envoy-docker-shim && \
    CGO_ENABLED=0 go build -trimpath \
      -ldflags "-s -w -X github.com/envoy-docker-shim/envoy-docker-shim/internal/buildinfo.Version=${VERSION}" \
      -o /out/ ./shim/cmd/envoy-docker-shim-install
# Fail the build, not the install, if the shim does not run on its own.
RUN ["/out/envoy-docker-shim", "-version"]

FROM ${RUNTIME_IMAGE}
ARG VERSION=dev
LABEL org.opencontainers.image.title="envoy-docker-shim-installer" \
      org.opencontainers.image.description="Installs the static envoy-docker-shim on the Docker host and optionally points dockerd at it" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/envoy-docker-shim/envoy-docker-shim"
COPY --from=build /out/envoy-docker-shim /envoy-docker-shim
COPY --from=build /out/envoy-docker-shim-install /envoy-docker-shim-install
# root: it writes into the host's /usr/local/bin and /etc/docker.
USER 0:0
# A one-shot: no HEALTHCHECK; its exit code is its result.
ENTRYPOINT ["/envoy-docker-shim-install"]
