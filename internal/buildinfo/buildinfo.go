// Package buildinfo holds the version stamped into every binary at build time (see the Makefile).
package buildinfo

import "runtime/debug"

// Version is set with -ldflags "-X .../internal/buildinfo.Version=..." by `make build`.
var Version = ""

// String returns the stamped version, or the module version a plain `go build` records.
func String() string {
	if Version != "" {
		return Version
	}
	if info, ok := debug.ReadBuildInfo(); ok && info.Main.Version != "" {
		return info.Main.Version
	}
	return "dev"
}
