// Package wait holds the one way this repository sleeps inside a context: for as long as asked,
// or until the context ends (or a wake channel closes), whichever comes first. The shim links it, so it stays as light as
// context and time.
package wait

import (
	"context"
	"time"
)

// Sleep waits d, or less if ctx ends; it reports whether ctx is still live. A d of zero or less
// returns at once.
func Sleep(ctx context.Context, d time.Duration) bool { return SleepUnless(ctx, d, nil) }

// SleepUnless is Sleep cut short (reporting true) when wake is closed as well; a nil wake never is.
func SleepUnless(ctx context.Context, d time.Duration, wake <-chan struct{}) bool {
	if d <= 0 || ctx.Err() != nil {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	case <-wake:
		return true
	}
}
