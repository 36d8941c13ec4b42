# Every target runs from a clean clone; .ci/run provisions the machine and then runs `make test`.
GO            ?= go
BIN           ?= bin
ENVOY_VERSION ?= 1.40.0
VERSION       ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS       := -s -w -X github.com/envoy-docker-shim/envoy-docker-shim/internal/buildinfo.Version=$(VERSION)
SHIM_LDFLAGS  := $(if $(filter amd64,$(shell $(GO) env GOARCH)),-E=_rt0_envoy_docker_shim)
# Test timeouts are generous ceilings, not targets: a hung daemon must fail the run, not eat CI's 90 minutes.
TEST_TIMEOUT  ?= 15m

.PHONY: all build test unit e2e soak lint generate bench bench-dataplane bench-ranges provision images up clean testbed-box testbed-up testbed-smoke testbed-destroy

all: build

# Static binaries: the shim is copied onto arbitrary hosts, so nothing may depend on the host's libc.
# The shim's entry point is its fast start on amd64 (package idle; idle.LinkFlag).
build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS) $(SHIM_LDFLAGS)' -o $(BIN)/ ./shim/cmd/envoy-docker-shim
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/ ./shim/cmd/envoy-docker-shim-install ./services/cmd/... ./envoy/cmd/...

# Everything CI runs: lint, unit tests and the end-to-end suite against a real dockerd and a real Envoy.
test: lint
	$(GO) test -timeout $(TEST_TIMEOUT) ./...

unit:
	$(GO) test -short ./...

# The end-to-end tests: the harness's own, and every TestE2E* of the other packages.
e2e:
	$(GO) test -timeout $(TEST_TIMEOUT) ./testbed/...
	$(GO) test -timeout $(TEST_TIMEOUT) -run 'E2E' ./services/... ./shim/... ./envoy/... ./deploy/...

# The soak: SOAK_CYCLES containers, SOAK_PARALLEL at a time, each started with -p, asked once the
# moment `docker run -d` returns (apps wait up to SOAK_DELAY_MAX before they listen) and removed,
# beside a steady keep-alive load; then the same cycles on stock docker-proxy. Fails on any failed
# start, failed first request, steady-load error or leftover of the shim's, or a server not back
# to its baseline. `make test` runs a short version (TestSoak's defaults). The side-by-side table
# goes to testbed/soak/results/ (not committed). About 10 minutes per 1,000 cycles and proxy.
SOAK_CYCLES     ?= 1000
SOAK_PARALLEL   ?= 4
SOAK_DELAY_MAX  ?= 300ms
SOAK_RACE       ?= true
SOAK_HOST_PORTS ?= leased
SOAK_TIMEOUT    ?= 2h

soak:
	SOAK_CYCLES=$(SOAK_CYCLES) SOAK_PARALLEL=$(SOAK_PARALLEL) SOAK_DELAY_MAX=$(SOAK_DELAY_MAX) \
	  SOAK_RACE=$(SOAK_RACE) SOAK_HOST_PORTS=$(SOAK_HOST_PORTS) SOAK_DOCKER_PROXY=true \
	  SOAK_RESULTS=$(CURDIR)/testbed/soak/results \
	  $(GO) test -count=1 -v -run '^TestSoak$$' -timeout $(SOAK_TIMEOUT) ./testbed/soak/

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt needed on:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) tool staticcheck ./...
	@$(GO) mod tidy -diff >/dev/null || { echo "go.mod/go.sum are not tidy: run go mod tidy and commit the result"; exit 1; }

# Regenerates the committed protobuf code; needs protoc (Debian: protobuf-compiler).
generate:
	PATH="$$(pwd)/$(BIN)/tools:$$PATH" && mkdir -p $(BIN)/tools && \
	  $(GO) build -o $(BIN)/tools/ google.golang.org/protobuf/cmd/protoc-gen-go google.golang.org/grpc/cmd/protoc-gen-go-grpc && \
	  protoc --proto_path=services/registration/proto \
	    --go_out=services/registration --go_opt=module=github.com/envoy-docker-shim/envoy-docker-shim/services/registration \
	    --go-grpc_out=services/registration --go-grpc_opt=module=github.com/envoy-docker-shim/envoy-docker-shim/services/registration \
	    services/registration/proto/registration.proto

# Benchmarks against the real stack; figures go in closing notes, never into assertions. Reports
# (markdown and a PNG chart) land in bench-results/, which git ignores.
bench:
	$(GO) test -p 1 -run '^$$' -bench . -benchtime 1x -timeout 60m ./...

# The data plane alone: one echo container served directly, by docker-proxy, nginx, ours (tcp and
# http mode) and iptables DNAT, then through the compose appliance. BENCH_ROUNDS=1
# BENCH_DURATION=2s BENCH_BULK_MIB=64 make a quick run.
bench-dataplane:
	$(GO) test -p 1 -run '^$$' -bench 'DataPlane' -benchtime 1x -timeout 60m ./testbed/e2e/ ./testbed/appliance/

# Port ranges: one container publishing N ports (BENCH_RANGE_PORTS, default 10,200,1000) under
# each generation's docker-proxy and ours: docker run and rm -f times, the proxies' RSS, PSS and
# USS, Envoy's and the server's growth per port, leftovers. BENCH_RANGE_PORTS=200 BENCH_ROUNDS=1
# make a quick run.
bench-ranges:
	$(GO) test -p 1 -run '^$$' -bench 'PortRange' -benchtime 1x -timeout 60m ./testbed/ranges/

# The appliance. Compose v2 when the plugin is there, else Debian's docker-compose 1.29.
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)

images:
	$(COMPOSE) build

# The main job: installs the shim on the host, starts server and Envoy, runs resync.
up:
	$(COMPOSE) up -d

# Installs what the tests need on a Debian host (also what a Vagrant VM runs).
provision:
	testbed/provision.sh

# The Vagrant testbed (testbed/Vagrantfile; README "Try it in a VM"), not part of `make test`.
# testbed-box: only without internet, once; it builds the box envoy-docker-shim/debian12.
testbed-box:
	testbed/vagrant/build-box.sh

# Vagrant's own version check (upstream packages; Debian's has none) asks a server on the internet.
testbed-box testbed-up testbed-smoke testbed-destroy: export VAGRANT_CHECKPOINT_DISABLE = 1

testbed-up:
	testbed/vagrant/host.sh
	cd testbed && vagrant up

# In the VM (with the current smoke.sh, copied in first), then through the forwarded ports.
testbed-smoke:
	cd testbed && vagrant rsync && vagrant ssh -c 'sudo /vagrant/testbed/vagrant/smoke.sh'
	testbed/vagrant/smoke.sh --host

testbed-destroy:
	cd testbed && vagrant destroy -f

clean:
	rm -rf $(BIN)
