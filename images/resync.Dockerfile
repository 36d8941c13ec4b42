# resync: the one-shot that restores envoy-docker-server's registry after a restart from the shims
# still running on the host. Run with pid: host and the registration socket's directory mounted
# (see compose.yaml).
#
#   docker build -f images/resync.Dockerfile -t envoy-docker-shim/resync .   (from the repository root)
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
RUN CGO_ENABLED=0 go build -trimpath \
      -ldflags "-s -w -X github.com/envoy-docker-shim/envoy-docker-shim/internal/buildinfo.Version=${VERSION}" \
      -o /out/resync ./services/cmd/resync

FROM ${RUNTIME_IMAGE}
ARG VERSION=dev
LABEL org.opencontainers.image.title="envoy-docker-shim-resync" \
      org.opencontainers.image.description="Restores envoy-docker-server's registry from the shims running on the host" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/envoy-docker-shim/envoy-docker-shim"
COPY --from=build /out/resync /resync
# root: the registration socket is root-only (0600), and the shims whose command lines it reads
# from the host's /proc are root's processes.
USER 0:0
# A one-shot: no HEALTHCHECK; its exit code is its result.
ENTRYPOINT ["/resync"]
