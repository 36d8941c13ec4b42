// Package testbed is the end-to-end harness: it runs private dockerd instances with a chosen
// userland proxy, real Envoy processes, and containers of a small echo image, and it carries test
// traffic to them.
//
// It owns everything it starts: each dockerd or Envoy lives in an instance directory under
// EDS_TESTBED_ROOT (default /tmp/eds-testbed) that the test process keeps locked for the
// instance's life. Whatever is left of an instance whose lock is free (a test process killed
// midway) is removed the next time any test starts an instance, so a crash costs one run, never
// the machine.
//
// It must never touch what it did not start: not the host's own dockerd or containerd, not other
// bridges, not another live test process's instances. And it never sends traffic anywhere but
// loopback and the bridges of its own daemons (see [CheckTarget]).
package testbed
