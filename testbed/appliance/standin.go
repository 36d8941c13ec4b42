package appliance

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
	"github.com/envoy-docker-shim/envoy-docker-shim/testbed/standin"
)

// Stand-in base images: no registry can be reached, so the images' base build arguments get
// images made here from what the machine has (package standin). Tarballs are cached across runs;
// each test imports them into its own daemon.

// GoProxyInStandin is the GOPROXY build argument that makes the Dockerfiles' `go mod download`
// use the stand-in's module zips.
const GoProxyInStandin = standin.GoProxy

// GoStandin returns the cached tarball of the Go toolchain stand-in for the repository at repo.
func GoStandin(t testing.TB, repo string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	path, err := standin.Go(ctx, repo, t.Logf)
	if errors.Is(err, standin.ErrNoStaticBusybox) {
		t.Skipf("skipping: %v; run make provision", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	return path
}

// EnvoyStandin returns the cached tarball of the Envoy stand-in made from envoyBin.
func EnvoyStandin(t testing.TB, envoyBin string) string {
	t.Helper()
	path, err := standin.Envoy(envoyBin, t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	return path
}

// ImportStandins imports the stand-in tarballs into the daemon and returns their tags.
func ImportStandins(t testing.TB, d *testbed.Daemon, goTar, envoyTar string) (goImage, envoyImage string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	for _, imp := range []struct {
		kind standin.Kind
		tar  string
	}{{standin.KindGo, goTar}, {standin.KindEnvoy, envoyTar}} {
		start := time.Now()
		if _, err := d.Docker(ctx, standin.ImportArgs(imp.kind, imp.tar)...); err != nil {
			t.Fatal(err)
		}
		t.Logf("imported %s in %s", standin.Tag(imp.kind, imp.tar), time.Since(start).Round(100*time.Millisecond))
	}
	return standin.Tag(standin.KindGo, goTar), standin.Tag(standin.KindEnvoy, envoyTar)
}
