package idle

// elfMachine is EM_X86_64.
const elfMachine = 62

// image is the idle program (image_amd64.s); never called, only copied.
//
//lint:ignore U1000 referenced from assembly (imageText)
func image()

// imageText is the shim's text from image on, maxProgram bytes; only up to the end marker is
// image's.
func imageText() []byte

// stopHandler is the stop signals' handler while Enter replaces the process (image_amd64.s);
// only the kernel calls it.
//
//lint:ignore U1000 referenced from assembly (stopHandlerPC)
func stopHandler()

// stopHandlerPC is stopHandler's address.
func stopHandlerPC() uintptr

// blockHandler is blockSignal's handler while Enter replaces the process (image_amd64.s); only
// the kernel calls it.
//
//lint:ignore U1000 referenced from assembly (blockHandlerPC)
func blockHandler()

// blockHandlerPC is blockHandler's address.
func blockHandlerPC() uintptr
