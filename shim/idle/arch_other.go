//go:build !amd64

package idle

// elfMachine 0: no idle program for this architecture.
const elfMachine = 0

func imageText() []byte { return nil }
