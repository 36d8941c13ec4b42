//go:build !amd64

package idle

// elfMachine 0: no idle program for this architecture.
const elfMachine = 0

func imageText() []byte { return nil }

// stopHandlerPC is 0: Enter never gets as far as the stop signals' handler here.
func stopHandlerPC() uintptr { return 0 }

// blockHandlerPC is 0, as stopHandlerPC.
func blockHandlerPC() uintptr { return 0 }
