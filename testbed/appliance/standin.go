package appliance

import (
	"archive/tar"
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
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
)

// Stand-in base images. No registry can be reached, so the images' base build arguments get
// images made here from what the machine has, with `docker import` of a tarball:
//
//   - Go: a stand-in for golang:1.26-bookworm: the host's Go toolchain at /usr/local/go (tests and
//     docs left out), a static busybox as /bin/sh for RUN, the project's module zips as a file
//     module proxy at /goproxy (the build gets GOPROXY=file:///goproxy, so `go mod download` runs
//     for real, verified against go.sum, without a network), and a Go build cache warmed with the
//     project's dependencies. The warm cache is what keeps four image builds at seconds instead of
//     minutes: with -trimpath, compile cache keys do not depend on directory paths, so packages
//     compiled on the host are hits inside the build container (same toolchain, same flags).
//   - Envoy: FROM-scratch stand-in for envoyproxy/envoy: the Envoy binary at /usr/local/bin/envoy
//     with the shared libraries ldd lists and the dynamic loader.
//
// Tarballs are cached across runs outside the repository (EDS_STANDIN_CACHE, default
// /var/cache/envoy-docker-shim/standins), keyed by what they are made from; each test imports
// them into its own daemon.

// standinRecipe changes whenever the content of a stand-in changes, to invalidate cached tarballs.
const standinRecipe = "standin-v2"

// goStandinEnv is the stand-in's environment, as the official golang image sets it.
var goStandinEnv = []string{
	"PATH=/usr/local/go/bin:/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
	"GOPATH=/go",
	"GOTOOLCHAIN=local",
	"HOME=/root",
}

// GoProxyInStandin is the GOPROXY build argument that makes the Dockerfiles' `go mod download`
// use the stand-in's module zips.
const GoProxyInStandin = "file:///goproxy"

// goCacheMtimeInterval is the go command's: it refreshes the mtime of a build cache entry it uses
// only when the mtime is older than this.
const goCacheMtimeInterval = time.Hour

// cmdPackages are the binaries the images build; the warm cache covers their dependencies.
var cmdPackages = []string{"./services/cmd/...", "./envoy/cmd/...", "./shim/cmd/..."}

func cacheDir() string {
	if d := os.Getenv("EDS_STANDIN_CACHE"); d != "" {
		return d
	}
	return "/var/cache/envoy-docker-shim/standins"
}

// cached returns the path of the tarball name-key.tar in the cache, making it with build (which
// writes the tarball it is given) if it is not there. Makers are serialised across processes, and
// older tarballs of the same name are removed.
func cached(t testing.TB, name, key string, build func(staging, tarPath string) error) string {
	t.Helper()
	dir := cacheDir()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatalf("stand-in cache: %v", err)
	}
	path := filepath.Join(dir, name+"-"+key+".tar")
	if _, err := os.Stat(path); err == nil {
		return path
	}
	lock, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		t.Fatalf("stand-in cache lock: %v", err)
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		t.Fatalf("stand-in cache lock: %v", err)
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN)
	if _, err := os.Stat(path); err == nil {
		return path // made by another process meanwhile
	}
	// Under the lock no other maker runs: a staging directory here is a killed maker's.
	stale, _ := filepath.Glob(filepath.Join(dir, "."+name+"-*"))
	for _, s := range stale {
		_ = os.RemoveAll(s)
	}
	staging, err := os.MkdirTemp(dir, "."+name+"-"+key+"-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(staging)
	start := time.Now()
	tmp := filepath.Join(staging, "image.tar")
	if err := build(staging, tmp); err != nil {
		t.Fatalf("making the %s stand-in: %v", name, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
	fi, _ := os.Stat(path)
	t.Logf("stand-in %s: made %s (%d MB) in %s", name, path, fi.Size()>>20, time.Since(start).Round(time.Second))
	old, _ := filepath.Glob(filepath.Join(dir, name+"-*.tar"))
	for _, o := range old {
		if o != path {
			_ = os.Remove(o)
		}
	}
	return path
}

func hashFiles(h io.Writer, paths ...string) error {
	for _, p := range paths {
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		fmt.Fprintf(h, "%s\n", p)
		_, err = io.Copy(h, f)
		f.Close()
		if err != nil {
			return err
		}
	}
	return nil
}

func goEnv(ctx context.Context, names ...string) ([]string, error) {
	out, err := exec.CommandContext(ctx, "go", append([]string{"env"}, names...)...).Output()
	if err != nil {
		return nil, fmt.Errorf("go env: %w", err)
	}
	return strings.Split(strings.TrimRight(string(out), "\n"), "\n"), nil
}

// GoStandin returns the cached tarball of the Go toolchain stand-in for the repository at repo.
func GoStandin(t testing.TB, repo string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	vals, err := goEnv(ctx, "GOVERSION", "GOROOT", "GOMODCACHE", "GOPROXY")
	if err != nil {
		t.Fatal(err)
	}
	version, goroot, hostModCache, hostProxy := vals[0], vals[1], vals[2], vals[3]
	busybox, err := staticBusybox()
	if err != nil {
		t.Skipf("skipping: %v (Debian package busybox-static; run make provision)", err)
	}
	h := sha256.New()
	fmt.Fprintf(h, "%s\n%s\n%s\n", standinRecipe, version, goroot)
	if err := hashFiles(h, filepath.Join(repo, "go.mod"), filepath.Join(repo, "go.sum"), busybox); err != nil {
		t.Fatal(err)
	}
	key := hex.EncodeToString(h.Sum(nil))[:16]
	return cached(t, "go", key, func(staging, tarPath string) error {
		// The build cache persists across stand-ins (only makers use it, one at a time), so that a
		// change of go.sum recompiles only what changed; Go trims what goes unused for 5 days.
		modCache, goCache := filepath.Join(staging, "mod"), filepath.Join(cacheDir(), "gocache")
		warmStart := time.Now()
		// The same environment and flags as the Dockerfiles' build stage (CGO_ENABLED=0,
		// -trimpath, no go env file), so that the cache keys match inside the container. Modules
		// come from the host's module cache, or else from the module proxy the host uses.
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
	return "", errors.New("no statically linked busybox at /bin/busybox")
}

// EnvoyStandin returns the cached tarball of the Envoy stand-in made from envoyBin.
func EnvoyStandin(t testing.TB, envoyBin string) string {
	t.Helper()
	libs, err := sharedLibraries(envoyBin)
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	fmt.Fprintf(h, "%s\n", standinRecipe)
	if err := hashFiles(h, append([]string{envoyBin}, libs...)...); err != nil {
		t.Fatal(err)
	}
	key := hex.EncodeToString(h.Sum(nil))[:16]
	return cached(t, "envoy", key, func(_, tarPath string) error {
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

// ImportStandins imports the stand-in tarballs into the daemon and returns their tags.
func ImportStandins(t testing.TB, d *testbed.Daemon, goTar, envoyTar string) (goImage, envoyImage string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	tagOf := func(name, tarPath string) string {
		return "eds-standin/" + name + ":" + strings.TrimSuffix(strings.TrimPrefix(filepath.Base(tarPath), name+"-"), ".tar")
	}
	goImage, envoyImage = tagOf("go", goTar), tagOf("envoy", envoyTar)
	var goChanges []string
	for _, e := range goStandinEnv {
		goChanges = append(goChanges, "--change", "ENV "+e)
	}
	goChanges = append(goChanges, "--change", "WORKDIR /go")
	for _, imp := range []struct {
		tar, tag string
		changes  []string
	}{
		{goTar, goImage, goChanges},
		{envoyTar, envoyImage, []string{"--change", `ENTRYPOINT ["/usr/local/bin/envoy"]`, "--change", `CMD ["-c", "/etc/envoy/envoy.yaml"]`}},
	} {
		start := time.Now()
		args := append(append([]string{"import"}, imp.changes...), imp.tar, imp.tag)
		if _, err := d.Docker(ctx, args...); err != nil {
			t.Fatal(err)
		}
		t.Logf("imported %s in %s", imp.tag, time.Since(start).Round(100*time.Millisecond))
	}
	return goImage, envoyImage
}

// tarWriter writes an image root filesystem; the first error sticks and stops further writes.
type tarWriter struct {
	tw   *tar.Writer
	err  error
	dirs map[string]bool
}

func writeTar(path string, fill func(*tarWriter) error) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	bw := bufio.NewWriterSize(f, 1<<20)
	tw := &tarWriter{tw: tar.NewWriter(bw), dirs: map[string]bool{}}
	err = fill(tw)
	if err == nil {
		err = tw.tw.Close()
	}
	if err == nil {
		err = bw.Flush()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

func (w *tarWriter) header(h *tar.Header) {
	if w.err != nil {
		return
	}
	h.Uid, h.Gid, h.Uname, h.Gname = 0, 0, "root", "root"
	h.ModTime = time.Unix(0, 0)
	h.Format = tar.FormatPAX
	w.err = w.tw.WriteHeader(h)
}

func (w *tarWriter) dir(name string, mode int64) {
	if w.dirs[name] {
		return
	}
	w.dirs[name] = true
	w.header(&tar.Header{Typeflag: tar.TypeDir, Name: name + "/", Mode: mode})
}

// parents writes the directories leading to name that are not written yet.
func (w *tarWriter) parents(name string) {
	var chain []string
	for d := filepath.Dir(name); d != "."; d = filepath.Dir(d) {
		chain = append(chain, d)
	}
	for _, d := range slices.Backward(chain) {
		w.dir(d, 0o755)
	}
}

func (w *tarWriter) symlink(name, target string) {
	w.header(&tar.Header{Typeflag: tar.TypeSymlink, Name: name, Linkname: target, Mode: 0o777})
}

func (w *tarWriter) file(name string, data []byte, mode int64) {
	w.header(&tar.Header{Typeflag: tar.TypeReg, Name: name, Size: int64(len(data)), Mode: mode})
	if w.err == nil {
		_, w.err = w.tw.Write(data)
	}
}

// copyFile writes the content of src (symlinks followed) as name.
func (w *tarWriter) copyFile(name, src string, mode int64) {
	if w.err != nil {
		return
	}
	f, err := os.Open(src)
	if err != nil {
		w.err = err
		return
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		w.err = err
		return
	}
	w.header(&tar.Header{Typeflag: tar.TypeReg, Name: name, Size: fi.Size(), Mode: mode})
	if w.err == nil {
		_, w.err = io.Copy(w.tw, f)
	}
}

// copyTree writes the tree at src under name, keeping modes and symlinks; skip (given the path
// relative to src) leaves out a file or a whole directory.
func (w *tarWriter) copyTree(name, src string, skip func(rel string, d fs.DirEntry) bool) {
	if w.err != nil {
		return
	}
	w.parents(name + "/x")
	w.err = filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		if rel != "." && skip != nil && skip(filepath.ToSlash(rel), d) {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		target := filepath.ToSlash(filepath.Join(name, rel))
		info, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case d.IsDir():
			w.dir(target, int64(info.Mode().Perm()))
		case info.Mode()&fs.ModeSymlink != 0:
			link, err := os.Readlink(p)
			if err != nil {
				return err
			}
			w.symlink(target, link)
		case info.Mode().IsRegular():
			w.copyFile(target, p, int64(info.Mode().Perm()))
		}
		return w.err
	})
}
