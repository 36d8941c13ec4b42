//go:build !amd64

package idle

// LinkFlag is empty: there is no fast start for this architecture.
const LinkFlag = ""
