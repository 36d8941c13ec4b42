// Package standin makes local stand-ins for the appliance images' base images, for builds that
// cannot reach a registry: the end-to-end tests (testbed/appliance) and the offline Vagrant VM
// (testbed/vagrant). The Dockerfiles take every base image as a build argument, so a build gets
// these instead of the official images without any change to the Dockerfiles.
//
// Stand-ins are root filesystems made from what the machine has and imported with `docker
// import` (see ImportArgs):
//
//   - Go: a stand-in for golang:1.26-bookworm: the machine's Go toolchain at /usr/local/go (tests
//     and docs left out), a static busybox as /bin/sh for RUN, the project's module zips as a file
//     module proxy at /goproxy (the build gets GOPROXY=file:///goproxy, so `go mod download` runs
//     for real, verified against go.sum, without a network), and a Go build cache warmed with the
//     project's dependencies. The warm cache is what keeps four image builds at seconds instead of
//     minutes: with -trimpath, compile cache keys do not depend on directory paths, so packages
//     compiled here are hits inside the build container (same toolchain, same flags).
//   - Envoy: FROM-scratch stand-in for envoyproxy/envoy: the Envoy binary at /usr/local/bin/envoy
//     with the shared libraries ldd lists and the dynamic loader.
//
// Tarballs are cached across runs outside the repository (EDS_STANDIN_CACHE, default
// /var/cache/envoy-docker-shim/standins), keyed by what they are made from, so a tarball made once
// (in a box build, say) is found again by every later run with the same inputs. It never writes
// into the repository and never talks to a network: modules come from the machine's module cache,
// or else from the module proxy the machine's go command uses.
package standin

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"time"
)

// recipe changes whenever the content of a stand-in changes, to invalidate cached tarballs.
const recipe = "standin-v2"

// goEnv is the Go stand-in's environment, as the official golang image sets it.
var goEnv = []string{
	"PATH=/usr/local/go/bin:/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
	"GOPATH=/go",
	"GOTOOLCHAIN=local",
	"HOME=/root",
}

// GoProxy is the GOPROXY build argument that makes the Dockerfiles' `go mod download` use the Go
// stand-in's module zips.
const GoProxy = "file:///goproxy"

// goCacheMtimeInterval is the go command's: it refreshes the mtime of a build cache entry it uses
// only when the mtime is older than this.
const goCacheMtimeInterval = time.Hour

// cmdPackages are the binaries the images build; the warm cache covers their dependencies.
var cmdPackages = []string{"./services/cmd/...", "./envoy/cmd/...", "./shim/cmd/..."}

// ErrNoStaticBusybox means the machine has no statically linked busybox for the Go stand-in's
// shell (Debian package busybox-static).
var ErrNoStaticBusybox = errors.New("no statically linked busybox at /bin/busybox (Debian package busybox-static)")

// Logf reports progress; testing.TB's Logf fits, and so does a log/slog adapter.
type Logf func(format string, args ...any)

// CacheDir is where tarballs are kept: $EDS_STANDIN_CACHE, or /var/cache/envoy-docker-shim/standins.
func CacheDir() string {
	if d := os.Getenv("EDS_STANDIN_CACHE"); d != "" {
		return d
	}
	return "/var/cache/envoy-docker-shim/standins"
}

// cached returns the path of the tarball name-key.tar in the cache, making it with build (which
// writes the tarball it is given) if it is not there. Makers are serialised across processes, and
// older tarballs of the same name are removed.
func cached(logf Logf, name, key string, build func(staging, tarPath string) error) (string, error) {
	dir := CacheDir()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("stand-in cache: %w", err)
	}
	path := filepath.Join(dir, name+"-"+key+".tar")
	if _, err := os.Stat(path); err == nil {
		return path, nil
	}
	lock, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", fmt.Errorf("stand-in cache lock: %w", err)
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return "", fmt.Errorf("stand-in cache lock: %w", err)
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN)
	if _, err := os.Stat(path); err == nil {
		return path, nil // made by another process meanwhile
	}
	// Under the lock no other maker runs: a staging directory here is a killed maker's.
	stale, _ := filepath.Glob(filepath.Join(dir, "."+name+"-*"))
	for _, s := range stale {
		_ = os.RemoveAll(s)
	}
	staging, err := os.MkdirTemp(dir, "."+name+"-"+key+"-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(staging)
	start := time.Now()
	tmp := filepath.Join(staging, "image.tar")
	if err := build(staging, tmp); err != nil {
		return "", fmt.Errorf("making the %s stand-in: %w", name, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return "", err
	}
	fi, _ := os.Stat(path)
	logf("stand-in %s: made %s (%d MB) in %s", name, path, fi.Size()>>20, time.Since(start).Round(time.Second))
	old, _ := filepath.Glob(filepath.Join(dir, name+"-*.tar"))
	for _, o := range old {
		if o != path {
			_ = os.Remove(o)
		}
	}
	return path, nil
}

// hashFiles hashes each file's name and content. name gives the name to hash for a path: the
// path itself where it matters (a library's place), or less where the same file may be found in
// different places (the repository's go.mod, wherever the repository is).
func hashFiles(h io.Writer, name func(path string) string, paths ...string) error {
	for _, p := range paths {
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		fmt.Fprintf(h, "%s\n", name(p))
		_, err = io.Copy(h, f)
		f.Close()
		if err != nil {
			return err
		}
	}
	return nil
}

func goVars(ctx context.Context, names ...string) ([]string, error) {
	out, err := exec.CommandContext(ctx, "go", append([]string{"env"}, names...)...).Output()
	if err != nil {
		return nil, fmt.Errorf("go env: %w", err)
	}
	return strings.Split(strings.TrimRight(string(out), "\n"), "\n"), nil
}

// Go returns the cached tarball of the Go toolchain stand-in for the repository at repo, making it
// first if needed. It returns ErrNoStaticBusybox when the machine lacks a static busybox.
func Go(ctx context.Context, repo string, logf Logf) (string, error) {
	vals, err := goVars(ctx, "GOVERSION", "GOROOT", "GOMODCACHE", "GOPROXY")
	if err != nil {
		return "", err
	}
	version, goroot, hostModCache, hostProxy := vals[0], vals[1], vals[2], vals[3]
	busybox, err := staticBusybox()
	if err != nil {
		return "", err
	}
	key, err := goKey(version, goroot, repo, busybox)
	if err != nil {
		return "", err
	}
	return cached(logf, "go", key, func(staging, tarPath string) error {
		// The build cache persists across stand-ins (only makers use it, one at a time), so that a
		// change of go.sum recompiles only what changed; Go trims what goes unused for 5 days.
		modCache, goCache := filepath.Join(staging, "mod"), filepath.Join(CacheDir(), "gocache")
		warmStart := time.Now()
		// The same environment and flags as the Dockerfiles' build stage (CGO_ENABLED=0,
		// -trimpath, no go env file), so that the cache keys match inside the container. Modules
		// come from the machine's module cache, or else from the module proxy it uses.
		proxy := "file://" + filepath.Join(hostModCache, "cache", "download")
		if hostProxy != "" && hostProxy != "off" {
			proxy += "," + hostProxy
		}
		env := append(withoutGoVars(os.Environ()),
			"GOENV=off", "GOTOOLCHAIN=local", "GOFLAGS=-modcacherw -mod=readonly", "CGO_ENABLED=0",
			"GOMODCACHE="+modCache, "GOCACHE="+goCache, "GOPROXY="+proxy)
		for _, args := range [][]string{
			{"mod", "download"},
			append([]string{"build", "-trimpath"}, existingPackages(repo, cmdPackages)...),
		} {
			cmd := exec.CommandContext(ctx, "go", args...)
			cmd.Dir, cmd.Env = repo, env
			if out, err := cmd.CombinedOutput(); err != nil {
				return fmt.Errorf("go %s: %w: %s", strings.Join(args, " "), err, out)
			}
		}
		return writeTar(tarPath, func(tw *tarWriter) error {
			for _, d := range []string{"bin", "etc", "go", "go/bin", "go/src", "root", "root/.cache", "usr", "usr/local", "usr/local/bin"} {
				tw.dir(d, 0o755)
			}
			tw.dir("tmp", 0o1777)
			tw.file("etc/passwd", []byte("root:x:0:0:root:/root:/bin/sh\n"), 0o644)
			tw.file("etc/group", []byte("root:x:0:\n"), 0o644)
			tw.copyFile("bin/busybox", busybox, 0o755)
			tw.symlink("bin/sh", "busybox")
			tw.copyTree("usr/local/go", goroot, skipInGoroot)
			tw.copyTree("goproxy", filepath.Join(modCache, "cache", "download"), func(rel string, d fs.DirEntry) bool {
				return rel == "sumdb" || strings.HasSuffix(rel, ".lock") || strings.HasSuffix(rel, ".partial")
			})
			// Only the entries this warm-up used: Go refreshes an entry's mtime when it uses it,
			// unless the mtime is less than an hour old.
			used := warmStart.Add(-goCacheMtimeInterval - time.Minute)
			tw.copyTree("root/.cache/go-build", goCache, func(rel string, d fs.DirEntry) bool {
				if d.IsDir() {
					return false
				}
				info, err := d.Info()
				return err != nil || info.ModTime().Before(used)
			})
			return tw.err
		})
	})
}

// goKey is the cache key of a Go stand-in: what it is made from. The repository counts by the
// content of its go.mod and go.sum only, not by where it is, so that a stand-in made in one
// checkout (a box build's) serves every other with the same modules.
func goKey(version, goroot, repo, busybox string) (string, error) {
	h := sha256.New()
	fmt.Fprintf(h, "%s\n%s\n%s\n", recipe, version, goroot)
	inRepo := func(p string) string {
		if rel, err := filepath.Rel(repo, p); err == nil && !strings.HasPrefix(rel, "..") {
			return rel
		}
		return p
	}
	if err := hashFiles(h, inRepo, filepath.Join(repo, "go.mod"), filepath.Join(repo, "go.sum"), busybox); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil))[:16], nil
}

// skipInGoroot leaves out what building needs not: tests, test data, docs, the toolchain's own
// sources (its binaries are in pkg/tool).
func skipInGoroot(rel string, d fs.DirEntry) bool {
	switch rel {
	case "test", "api", "doc", "misc", "src/cmd", "pkg/obj", "lib/wasm":
		return true
	}
	base := d.Name()
	return (d.IsDir() && base == "testdata") || (!d.IsDir() && strings.HasSuffix(base, "_test.go"))
}

func withoutGoVars(env []string) []string {
	return slices.DeleteFunc(slices.Clone(env), func(kv string) bool {
		return strings.HasPrefix(kv, "GO") || strings.HasPrefix(kv, "CGO_")
	})
}

// existingPackages keeps the patterns whose directory exists: the shim may not be written yet.
func existingPackages(repo string, patterns []string) []string {
	var out []string
	for _, p := range patterns {
		if _, err := os.Stat(filepath.Join(repo, strings.TrimSuffix(p, "/..."))); err == nil {
			out = append(out, p)
		}
	}
	return out
}

// staticBusybox finds a statically linked busybox: the stand-ins have no libc for a dynamic one.
func staticBusybox() (string, error) {
	for _, p := range []string{"/bin/busybox", "/usr/bin/busybox"} {
		f, err := elf.Open(p)
		if err != nil {
			continue
		}
		static := true
		for _, prog := range f.Progs {
			static = static && prog.Type != elf.PT_INTERP
		}
		f.Close()
		if static {
			return p, nil
		}
	}
	return "", ErrNoStaticBusybox
}

// Envoy returns the cached tarball of the Envoy stand-in made from envoyBin, making it first if
// needed.
func Envoy(envoyBin string, logf Logf) (string, error) {
	libs, err := sharedLibraries(envoyBin)
	if err != nil {
		return "", err
	}
	h := sha256.New()
	fmt.Fprintf(h, "%s\n", recipe)
	if err := hashFiles(h, func(p string) string { return p }, append([]string{envoyBin}, libs...)...); err != nil {
		return "", err
	}
	key := hex.EncodeToString(h.Sum(nil))[:16]
	return cached(logf, "envoy", key, func(_, tarPath string) error {
		return writeTar(tarPath, func(tw *tarWriter) error {
			for _, d := range []string{"etc", "etc/envoy", "usr", "usr/local", "usr/local/bin"} {
				tw.dir(d, 0o755)
			}
			tw.dir("tmp", 0o1777)
			tw.copyFile("usr/local/bin/envoy", envoyBin, 0o755)
			for _, l := range libs {
				rel := strings.TrimPrefix(filepath.Clean(l), "/")
				tw.parents(rel)
				tw.copyFile(rel, l, 0o755)
			}
			return tw.err
		})
	})
}

var lddLine = regexp.MustCompile(`^\s*(?:\S+\s+=>\s+)?(/\S+)\s+\(0x[0-9a-f]+\)\s*$`)

// sharedLibraries lists the absolute paths ldd prints for bin: its libraries and the loader.
func sharedLibraries(bin string) ([]string, error) {
	out, err := exec.Command("ldd", bin).Output()
	if err != nil {
		return nil, fmt.Errorf("ldd %s: %w", bin, err)
	}
	var libs []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if m := lddLine.FindStringSubmatch(sc.Text()); m != nil {
			libs = append(libs, m[1])
		}
	}
	if len(libs) == 0 {
		return nil, fmt.Errorf("ldd %s listed no libraries: %s", bin, out)
	}
	return libs, nil
}

// Kind names a stand-in: what it stands in for decides how it is imported.
type Kind string

const (
	KindGo    Kind = "go"
	KindEnvoy Kind = "envoy"
)

// Tag is the image tag a stand-in tarball is imported as: its kind and cache key, so that a
// changed stand-in gets a new tag and a build never uses a stale one.
func Tag(kind Kind, tarPath string) string {
	key := strings.TrimSuffix(strings.TrimPrefix(filepath.Base(tarPath), string(kind)+"-"), ".tar")
	return "eds-standin/" + string(kind) + ":" + key
}

// ImportArgs are the arguments of `docker import` that turn the tarball into the image Tag
// names, with the configuration the official image has (environment, working directory,
// entrypoint).
func ImportArgs(kind Kind, tarPath string) []string {
	var changes []string
	switch kind {
	case KindGo:
		for _, e := range goEnv {
			changes = append(changes, "--change", "ENV "+e)
		}
		changes = append(changes, "--change", "WORKDIR /go")
	case KindEnvoy:
		changes = []string{"--change", `ENTRYPOINT ["/usr/local/bin/envoy"]`, "--change", `CMD ["-c", "/etc/envoy/envoy.yaml"]`}
	}
	return append(append([]string{"import"}, changes...), tarPath, Tag(kind, tarPath))
}
