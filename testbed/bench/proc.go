package bench

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// userHZ is the unit of utime and stime in /proc/PID/stat: USER_HZ, 100 on every Linux ABI.
const userHZ = 100

// CPUTime is the CPU time (user and system, all threads) the processes have used so far, from
// utime and stime in /proc/PID/stat.
func CPUTime(pids ...int) (time.Duration, error) {
	var total time.Duration
	for _, pid := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return 0, err
		}
		d, err := parseStatCPU(string(b))
		if err != nil {
			return 0, fmt.Errorf("/proc/%d/stat: %w", pid, err)
		}
		total += d
	}
	return total, nil
}

// statFields returns the fields of /proc/PID/stat after the command name, which may itself hold
// spaces and parentheses: the first of them is field 3 (state).
func statFields(stat string) ([]string, error) {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return nil, fmt.Errorf("malformed stat %q", stat)
	}
	return strings.Fields(stat[i+1:]), nil
}

func parseStatCPU(stat string) (time.Duration, error) {
	f, err := statFields(stat)
	if err != nil {
		return 0, err
	}
	if len(f) < 13 {
		return 0, fmt.Errorf("stat has %d fields after the name, want at least 13", len(f))
	}
	// utime and stime are fields 14 and 15.
	utime, err1 := strconv.ParseInt(f[11], 10, 64)
	stime, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("utime %q, stime %q", f[11], f[12])
	}
	return time.Duration(utime+stime) * time.Second / userHZ, nil
}

// RSS is the resident set size of a process in bytes (VmRSS).
func RSS(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	return parseRSS(string(b))
}

func parseRSS(status string) (int64, error) {
	for line := range strings.SplitSeq(status, "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(rest)
			if len(f) == 2 && f[1] == "kB" {
				kib, err := strconv.ParseInt(f[0], 10, 64)
				if err == nil {
					return kib << 10, nil
				}
			}
			return 0, fmt.Errorf("malformed %q", line)
		}
	}
	return 0, fmt.Errorf("no VmRSS line (a kernel thread, or the process exited)")
}

// Children lists the direct children of a process (of all its threads).
func Children(pid int) []int {
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	var out []int
	for _, t := range tasks {
		b, err := os.ReadFile(t)
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(b)) {
			if c, err := strconv.Atoi(f); err == nil {
				out = append(out, c)
			}
		}
	}
	return out
}

// PidsOf lists the processes whose executable's base name is name and whose command line
// mentions marker (empty: any).
func PidsOf(name, marker string) []int {
	return pidsWhere(func(dir string, cmdline string) bool {
		exe, err := os.Readlink(filepath.Join(dir, "exe"))
		return err == nil && filepath.Base(strings.TrimSuffix(exe, " (deleted)")) == name &&
			strings.Contains(cmdline, marker)
	})
}

// PidsRunning lists the processes whose command line starts with a program named name (the base
// of argv[0]) and contains marker (anything when empty). Unlike PidsOf it does not read
// /proc/PID/exe, which for a shim that went idle is a memfd, not the shim's binary.
func PidsRunning(name, marker string) []int {
	return pidsWhere(func(_ string, cmdline string) bool {
		argv0, _, _ := strings.Cut(cmdline, "\x00")
		return filepath.Base(argv0) == name && strings.Contains(cmdline, marker)
	})
}

// pidsWhere lists the processes for which match, given /proc/PID and the command line, is true.
func pidsWhere(match func(dir, cmdline string) bool) []int {
	entries, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		dir := filepath.Join("/proc", e.Name())
		cmdline, err := os.ReadFile(filepath.Join(dir, "cmdline"))
		if err != nil || !match(dir, string(cmdline)) {
			continue
		}
		out = append(out, pid)
	}
	return out
}

// Memory is what a process costs in memory, in bytes, from /proc/PID/smaps_rollup: RSS counts
// every resident page it maps, PSS divides each page by the processes that share it (what the
// host really pays for it), and USS counts only the pages no other process maps (what its exit
// frees).
type Memory struct {
	RSS, PSS, USS int64
}

// Add sums two figures.
func (m Memory) Add(o Memory) Memory { return Memory{m.RSS + o.RSS, m.PSS + o.PSS, m.USS + o.USS} }

// Sub is m less o.
func (m Memory) Sub(o Memory) Memory { return Memory{m.RSS - o.RSS, m.PSS - o.PSS, m.USS - o.USS} }

// MemoryOf reads a process's Memory.
func MemoryOf(pid int) (Memory, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return Memory{}, err
	}
	m, err := parseSmapsRollup(string(b))
	if err != nil {
		return Memory{}, fmt.Errorf("/proc/%d/smaps_rollup: %w", pid, err)
	}
	return m, nil
}

// MemoryOfAll sums the Memory of pids; a process that exited meanwhile counts nothing and is
// reported in gone.
func MemoryOfAll(pids []int) (total Memory, gone int) {
	for _, pid := range pids {
		m, err := MemoryOf(pid)
		if err != nil {
			gone++
			continue
		}
		total = total.Add(m)
	}
	return total, gone
}

func parseSmapsRollup(text string) (Memory, error) {
	fields := map[string]int64{}
	for line := range strings.SplitSeq(text, "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		f := strings.Fields(v)
		if len(f) != 2 || f[1] != "kB" {
			continue
		}
		kib, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return Memory{}, fmt.Errorf("malformed %q", line)
		}
		fields[k] = kib << 10
	}
	rss, ok1 := fields["Rss"]
	pss, ok2 := fields["Pss"]
	clean, ok3 := fields["Private_Clean"]
	dirty, ok4 := fields["Private_Dirty"]
	if !ok1 || !ok2 || !ok3 || !ok4 {
		return Memory{}, fmt.Errorf("no Rss, Pss, Private_Clean and Private_Dirty lines (a kernel thread, or the process exited)")
	}
	return Memory{RSS: rss, PSS: pss, USS: clean + dirty + fields["Private_Hugetlb"]}, nil
}
