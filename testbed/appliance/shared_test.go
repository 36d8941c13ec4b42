package appliance

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
)

// TestMain tears down what the tests of this process shared (appliances started once and used by
// every run of a test under -count=N, the images' archive) once all of them are done.
func TestMain(m *testing.M) {
	code := m.Run()
	if !process.close() && code == 0 {
		code = 1
	}
	os.Exit(code)
}

// process is the testing.TB of what outlives one test.
var process = &sharedTB{}

// sharedTB is the testing.TB of fixtures that outlive one test: an appliance started once per
// process, reused by each run of a test under -count=N. Logs and failures go to the test using
// the fixture at that moment (see use); cleanups run in TestMain once every test is done, where a
// failure (a teardown's) fails the process.
type sharedTB struct {
	testing.TB // the test using the fixtures now; nil between tests

	mu       sync.Mutex
	cleanups []func()
	failed   bool // some test failed while using the fixtures, or a teardown did
	dirs     int
}

// errSharedFatal stops a cleanup that called Fatal outside any test.
var errSharedFatal = errors.New("fatal error in a shared fixture's cleanup")

// use makes t the test that logs and failures go to until t ends.
func (s *sharedTB) use(t *testing.T) {
	t.Helper()
	s.mu.Lock()
	s.TB = t
	s.mu.Unlock()
	t.Cleanup(func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		if t.Failed() {
			s.failed = true
		}
		s.TB = nil
	})
}

func (s *sharedTB) current() testing.TB {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.TB
}

func (s *sharedTB) Helper()                  {}
func (s *sharedTB) Name() string             { return "shared" }
func (s *sharedTB) Context() context.Context { return context.Background() }

func (s *sharedTB) Cleanup(f func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.cleanups = append(s.cleanups, f)
}

func (s *sharedTB) TempDir() string {
	s.mu.Lock()
	s.dirs++
	n := s.dirs
	s.mu.Unlock()
	dir, err := os.MkdirTemp("", fmt.Sprintf("eds-appliance-shared%d-", n))
	if err != nil {
		s.Fatal(err)
	}
	s.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}

func (s *sharedTB) Failed() bool {
	if t := s.current(); t != nil && t.Failed() {
		return true
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.failed
}

func (s *sharedTB) Log(args ...any) { s.Logf("%s", fmt.Sprint(args...)) }
func (s *sharedTB) Logf(format string, args ...any) {
	if t := s.current(); t != nil {
		t.Logf(format, args...)
		return
	}
	fmt.Fprintf(os.Stderr, "shared fixture: "+format+"\n", args...)
}

func (s *sharedTB) Error(args ...any) { s.Errorf("%s", fmt.Sprint(args...)) }
func (s *sharedTB) Errorf(format string, args ...any) {
	if t := s.current(); t != nil {
		t.Errorf(format, args...)
		return
	}
	s.Logf("ERROR: "+format, args...)
	s.Fail()
}

func (s *sharedTB) Fail() {
	if t := s.current(); t != nil {
		t.Fail()
		return
	}
	s.mu.Lock()
	s.failed = true
	s.mu.Unlock()
}

func (s *sharedTB) Fatal(args ...any) { s.Fatalf("%s", fmt.Sprint(args...)) }
func (s *sharedTB) Fatalf(format string, args ...any) {
	if t := s.current(); t != nil {
		t.Fatalf(format, args...)
		return
	}
	s.Errorf(format, args...)
	panic(errSharedFatal)
}

func (s *sharedTB) FailNow() {
	if t := s.current(); t != nil {
		t.FailNow()
		return
	}
	s.Fail()
	panic(errSharedFatal)
}

func (s *sharedTB) Skip(args ...any) { s.Skipf("%s", fmt.Sprint(args...)) }
func (s *sharedTB) SkipNow()         { s.Skipf("skipped") }
func (s *sharedTB) Skipf(format string, args ...any) {
	if t := s.current(); t != nil {
		t.Skipf(format, args...)
		return
	}
	s.Fatalf("skip outside a test: "+format, args...)
}

// close runs the cleanups, last registered first, and reports whether everything shared went well.
func (s *sharedTB) close() bool {
	s.mu.Lock()
	cleanups := s.cleanups
	s.cleanups = nil
	s.mu.Unlock()
	for i := len(cleanups) - 1; i >= 0; i-- {
		func() {
			defer func() {
				if r := recover(); r != nil && r != errSharedFatal {
					s.Errorf("panic in a shared fixture's cleanup: %v", r)
				}
			}()
			cleanups[i]()
		}()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return !s.failed
}

// images is the archive of the appliance's images, built on the first daemon of the process
// that needs them and loaded by every other (see Options.Images).
var images struct {
	sync.Mutex
	path string
}

// startShared is Start with the process's images: built (and archived) the first time, loaded
// after that.
func startShared(t testing.TB, opts Options) *Appliance {
	t.Helper()
	images.Lock()
	defer images.Unlock()
	opts.Images = images.path
	a := Start(t, opts)
	if images.path == "" {
		path := filepath.Join(process.TempDir(), "images.tar")
		a.SaveImages(t, path)
		images.path = path
	}
	return a
}

// sharedAppliances are the appliances started once per process and daemon generation, for tests
// that only need one running (TestE2EApplianceRestarts). A failed start is remembered, so that
// each later run fails at once instead of starting another.
var sharedAppliances struct {
	sync.Mutex
	byGen  map[testbed.Generation]*restartFixture
	failed map[testbed.Generation]bool
}

// sharedFixture returns the generation's restart fixture, starting it on first use. t becomes the
// test the shared fixtures report to.
func sharedFixture(t *testing.T, gen testbed.Generation) *restartFixture {
	t.Helper()
	process.use(t)
	sharedAppliances.Lock()
	defer sharedAppliances.Unlock()
	if f := sharedAppliances.byGen[gen]; f != nil {
		return f
	}
	if sharedAppliances.failed[gen] {
		t.Fatalf("the shared %s appliance failed to start in an earlier run", gen)
	}
	if sharedAppliances.byGen == nil {
		sharedAppliances.byGen = map[testbed.Generation]*restartFixture{}
		sharedAppliances.failed = map[testbed.Generation]bool{}
	}
	started := false
	defer func() {
		if !started && !t.Skipped() {
			sharedAppliances.failed[gen] = true
		}
	}()
	f := newRestartFixture(process, gen)
	sharedAppliances.byGen[gen] = f
	started = true
	return f
}
