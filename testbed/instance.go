package testbed

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

const (
	rootEnv     = "EDS_TESTBED_ROOT"
	defaultRoot = "/tmp/eds-testbed"
	// markerEnv is put in the environment of every process the harness starts. Processes inherit
	// it (dockerd -> containerd -> shims, dockerd -> userland proxies), which is how the stale
	// cleaner finds a proxy or shim whose command line says nothing about the instance.
	markerEnv = "EDS_TESTBED_INSTANCE"
	// globalLockWait bounds how long one test process waits for another's allocation or stale
	// cleaning; both take seconds, so hitting this means a wedged process, worth failing on.
	globalLockWait = 3 * time.Minute
)

type instanceKind string

const (
	kindDaemon instanceKind = "d"
	kindEnvoy  instanceKind = "e"
)

// maxSlot bounds the slot numbers of each kind: a daemon's slot is an octet of its subnets.
var maxSlot = map[instanceKind]int{kindDaemon: 254, kindEnvoy: 999}

// instanceState is what the stale cleaner needs to undo an instance whose owner died, written
// before the instance creates the thing it records.
type instanceState struct {
	Kind         instanceKind `json:"kind"`
	Slot         int          `json:"slot"`
	Owner        int          `json:"owner"`
	Bridge       string       `json:"bridge,omitempty"`
	Subnet       string       `json:"subnet,omitempty"`
	Pool         string       `json:"pool,omitempty"`
	CgroupParent string       `json:"cgroupParent,omitempty"`
	Namespace    string       `json:"containerdNamespace,omitempty"`
	BaseID       int          `json:"baseId,omitempty"`
	// Pids are for a human looking into a stale instance. The cleaner finds processes by their
	// signs instead (see instanceProcs), which also covers their children and cannot hit a
	// recycled pid.
	Pids []int `json:"pids,omitempty"`
}

// instance is one locked directory under the testbed root.
type instance struct {
	dir   string
	lock  *os.File
	state instanceState
}

var instanceName = regexp.MustCompile(`^([de])([0-9]+)-[0-9a-f]{8}$`)

// parseInstanceName returns the kind and slot encoded in an instance directory's name.
func parseInstanceName(name string) (instanceKind, int, bool) {
	m := instanceName.FindStringSubmatch(name)
	if m == nil {
		return "", 0, false
	}
	slot, err := strconv.Atoi(m[2])
	if err != nil {
		return "", 0, false
	}
	return instanceKind(m[1]), slot, true
}

// testbedRoot is absolute, because instance paths are matched as strings against other
// processes' command lines.
func testbedRoot() string {
	if r := os.Getenv(rootEnv); r != "" {
		if abs, err := filepath.Abs(r); err == nil {
			return abs
		}
	}
	return defaultRoot
}

// withGlobalLock runs fn while holding the root's lock, which serialises allocation, stale
// cleaning and instance removal across every test process on the machine.
func withGlobalLock(fn func(root string) error) error {
	root := testbedRoot()
	if err := os.MkdirAll(root, 0o755); err != nil {
		return fmt.Errorf("creating testbed root: %w", err)
	}
	// Resolved, because the kernel shows a process's cwd and exe with symlinks resolved.
	root, err := filepath.EvalSymlinks(root)
	if err != nil {
		return fmt.Errorf("resolving testbed root: %w", err)
	}
	f, err := os.OpenFile(filepath.Join(root, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return fmt.Errorf("opening testbed lock: %w", err)
	}
	defer f.Close()
	deadline := time.Now().Add(globalLockWait)
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			break
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			return fmt.Errorf("locking %s: %w", f.Name(), err)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("another test process held %s for over %s", f.Name(), globalLockWait)
		}
		time.Sleep(50 * time.Millisecond)
	}
	defer syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
	return fn(root)
}

// tryLock takes an instance's lock without waiting. held reports that a live process owns it.
func tryLock(dir string) (f *os.File, held bool, err error) {
	f, err = os.OpenFile(filepath.Join(dir, "lock"), os.O_RDWR, 0)
	if err != nil {
		return nil, false, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, true, nil
		}
		return nil, false, fmt.Errorf("locking %s: %w", f.Name(), err)
	}
	return f, false, nil
}

// newInstance cleans whatever dead test processes left behind, then creates and locks a new
// instance directory of the given kind. choose picks a slot among the free ones (round robin from
// the last one handed out, so a just-released slot's kernel state has time to go) and fills in
// the state to record; it returns an error to reject a slot.
func newInstance(t testing.TB, kind instanceKind, choose func(slot int, st *instanceState) error) (*instance, error) {
	var inst *instance
	err := withGlobalLock(func(root string) error {
		live := sweepStale(root, t.Logf)
		taken := map[int]bool{}
		for _, st := range live {
			if st.Kind == kind {
				taken[st.Slot] = true
			}
		}
		counter := filepath.Join(root, ".next-"+string(kind))
		next := readCounter(counter)
		slots := maxSlot[kind]
		var reasons []string
		for i := range slots {
			slot := (next+i)%slots + 1
			if taken[slot] {
				continue
			}
			st := instanceState{Kind: kind, Slot: slot, Owner: os.Getpid()}
			if err := choose(slot, &st); err != nil {
				reasons = append(reasons, err.Error())
				continue
			}
			dir := filepath.Join(root, fmt.Sprintf("%s%d-%s", kind, slot, randomHex(4)))
			created, err := createInstanceDir(dir, st)
			if err != nil {
				return err
			}
			inst = created
			return os.WriteFile(counter, []byte(strconv.Itoa(slot)), 0o644)
		}
		if len(reasons) > 3 {
			reasons = reasons[:3]
		}
		return fmt.Errorf("no free %q slot among %d (%d live; e.g. %s)", kind, slots, len(taken), strings.Join(reasons, "; "))
	})
	return inst, err
}

func readCounter(path string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || n < 0 {
		return 0
	}
	return n
}

func createInstanceDir(dir string, st instanceState) (*instance, error) {
	if err := os.Mkdir(dir, 0o755); err != nil {
		return nil, fmt.Errorf("creating instance dir: %w", err)
	}
	f, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("creating instance lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("locking new instance %s: %w", dir, err)
	}
	inst := &instance{dir: dir, lock: f, state: st}
	if err := inst.save(); err != nil {
		f.Close()
		return nil, err
	}
	return inst, nil
}

// save writes the state atomically, so a crash never leaves the cleaner a half-written file.
func (in *instance) save() error {
	b, err := json.MarshalIndent(in.state, "", "  ")
	if err != nil {
		return fmt.Errorf("encoding instance state: %w", err)
	}
	tmp := filepath.Join(in.dir, "state.json.tmp")
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return fmt.Errorf("writing instance state: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(in.dir, "state.json")); err != nil {
		return fmt.Errorf("writing instance state: %w", err)
	}
	return nil
}

func (in *instance) recordPid(pid int) error {
	in.state.Pids = append(in.state.Pids, pid)
	return in.save()
}

// release removes everything of the instance, its directory last, and drops the lock. It runs
// under the global lock so that no other process can mistake the half-removed directory for a
// stale one and clean it at the same time.
func (in *instance) release(logf func(string, ...any)) error {
	return withGlobalLock(func(string) error {
		err := cleanInstance(in.dir, in.state, logf)
		in.lock.Close()
		return err
	})
}

func readState(dir string) (instanceState, error) {
	var st instanceState
	b, err := os.ReadFile(filepath.Join(dir, "state.json"))
	if err != nil {
		return st, err
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return st, fmt.Errorf("decoding %s/state.json: %w", dir, err)
	}
	return st, nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
