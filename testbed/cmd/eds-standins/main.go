// Command eds-standins makes the stand-ins for the appliance images' base images (package
// testbed/standin), imports them into a Docker daemon, and prints the build settings that make
// `docker compose build` use them, as shell exports:
//
//	eval "$(go run ./testbed/cmd/eds-standins)"   # then: docker compose up -d
//
// It is for machines with no registry: the offline Vagrant VM (testbed/vagrant/base-images.sh)
// and the box build, which makes the tarballs once so the VM only imports them. With a registry,
// do not use it: compose pulls the official base images.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/kelseyhightower/envconfig"

	"github.com/envoy-docker-shim/envoy-docker-shim/testbed/standin"
)

// Config is every setting, read from the environment.
type Config struct {
	Repo         string        `envconfig:"EDS_STANDIN_REPO" default:"." desc:"The repository the Go stand-in is made for (its go.mod and go.sum decide the modules it carries)."`
	EnvoyVersion string        `envconfig:"ENVOY_VERSION" default:"1.40.0" desc:"Envoy version; with ENVOY_BIN empty, the binary is where testbed/provision.sh installs this version."`
	EnvoyBin     string        `envconfig:"ENVOY_BIN" desc:"The Envoy binary the Envoy stand-in is made from."`
	Import       bool          `envconfig:"EDS_STANDIN_IMPORT" default:"true" desc:"Import the stand-ins into the Docker daemon the docker CLI talks to (DOCKER_HOST); false only makes the cached tarballs."`
	Timeout      time.Duration `envconfig:"EDS_STANDIN_TIMEOUT" default:"30m" desc:"Bound on making and importing both stand-ins."`
}

func main() {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	if err := run(log); err != nil {
		log.Error("eds-standins failed", "err", err)
		os.Exit(1)
	}
}

func run(log *slog.Logger) error {
	var c Config
	if err := envconfig.Process("", &c); err != nil {
		return fmt.Errorf("configuration: %w", err)
	}
	if c.EnvoyBin == "" {
		c.EnvoyBin = filepath.Join("/var/cache/envoy-docker-shim", "envoy-"+c.EnvoyVersion, "envoy")
	}
	repo, err := filepath.Abs(c.Repo)
	if err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(repo, "go.mod")); err != nil {
		return fmt.Errorf("EDS_STANDIN_REPO=%s is not the repository (no go.mod): run from the repository root", c.Repo)
	}
	if _, err := os.Stat(c.EnvoyBin); err != nil {
		return fmt.Errorf("no Envoy binary: %w; run testbed/provision.sh, or point ENVOY_BIN at one", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), c.Timeout)
	defer cancel()
	logf := func(format string, args ...any) { log.Info(fmt.Sprintf(format, args...)) }

	goTar, err := standin.Go(ctx, repo, logf)
	if errors.Is(err, standin.ErrNoStaticBusybox) {
		return fmt.Errorf("%w; run testbed/provision.sh", err)
	}
	if err != nil {
		return err
	}
	envoyTar, err := standin.Envoy(c.EnvoyBin, logf)
	if err != nil {
		return err
	}
	tars := map[standin.Kind]string{standin.KindGo: goTar, standin.KindEnvoy: envoyTar}
	if c.Import {
		for _, kind := range []standin.Kind{standin.KindGo, standin.KindEnvoy} {
			if err := importOnce(ctx, log, kind, tars[kind]); err != nil {
				return err
			}
		}
	}
	fmt.Printf("export EDS_GO_IMAGE=%s\n", standin.Tag(standin.KindGo, goTar))
	fmt.Printf("export EDS_ENVOY_IMAGE=%s\n", standin.Tag(standin.KindEnvoy, envoyTar))
	fmt.Printf("export GOPROXY=%s\n", standin.GoProxy)
	fmt.Printf("export GOFLAGS=-mod=readonly\n")
	return nil
}

// importOnce imports the tarball unless the daemon already has its tag: the tag carries the cache
// key, so an image of that tag is this very stand-in.
func importOnce(ctx context.Context, log *slog.Logger, kind standin.Kind, tar string) error {
	tag := standin.Tag(kind, tar)
	if exec.CommandContext(ctx, "docker", "image", "inspect", tag).Run() == nil {
		log.Info("stand-in already imported", "image", tag)
		return nil
	}
	start := time.Now()
	out, err := exec.CommandContext(ctx, "docker", standin.ImportArgs(kind, tar)...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("docker import %s: %w: %s", tar, err, strings.TrimSpace(string(out)))
	}
	log.Info("stand-in imported", "image", tag, "took", time.Since(start).Round(100*time.Millisecond))
	return nil
}
