// Package wait holds the one way this repository sleeps inside a context: for as long as asked,
// or until the context ends, whichever comes first. The shim links it, so it stays as light as
// context and time.
package wait

import (
	"context"
	"time"
)

// Sleep waits d, or less if ctx ends; it reports whether ctx is still live. A d of zero or less
// returns at once.
func Sleep(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
