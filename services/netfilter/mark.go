package netfilter

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// markName is the installer's uninstall mark, in the server's run directory (that of EDS_SOCKET).
// Uninstall removes the table itself, but the server keeps running until the operator stops it
// after restarting dockerd, and would restore the rules at its next reconcile, then keep them when
// stopped: the mark tells it not to. The run directory is a tmpfs on the host, so a reboot forgets
// the mark as it forgets the rules.
const markName = "netfilter-uninstalled"

const markText = "envoy-docker-shim was uninstalled (EDS_UNINSTALL=true): envoy-docker-server keeps no netfilter rules while this file exists. Installing again removes it.\n"

// MarkUninstalled leaves the uninstall mark in dir.
func MarkUninstalled(dir string) error {
	if err := os.WriteFile(filepath.Join(dir, markName), []byte(markText), 0o644); err != nil {
		return fmt.Errorf("leaving the uninstall mark for envoy-docker-server: %w", err)
	}
	return nil
}

// ClearUninstalled removes the uninstall mark from dir and says whether there was one.
func ClearUninstalled(dir string) (bool, error) {
	err := os.Remove(filepath.Join(dir, markName))
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("removing the uninstall mark %s: %w", filepath.Join(dir, markName), err)
	}
	return true, nil
}

// Uninstalled reports whether dir holds the uninstall mark.
func Uninstalled(dir string) bool {
	_, err := os.Stat(filepath.Join(dir, markName))
	return err == nil
}
