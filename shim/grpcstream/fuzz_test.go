package grpcstream

import (
	"io"
	"net"
	"testing"
	"time"
)

// FuzzServerBytes: whatever the server sends, the client neither panics nor hangs: once the
// connection ends, Recv returns.
func FuzzServerBytes(f *testing.F) {
	w := &frameWriter{}
	hdr := func(flags byte, kv ...string) []byte {
		b := w.block(kv...)
		return append([]byte{byte(len(b) >> 16), byte(len(b) >> 8), byte(len(b)), frameHeaders, flags, 0, 0, 0, 1}, b...)
	}
	ok := append(hdr(flagEndHeaders, ":status", "200", "content-type", "application/grpc"),
		0, 0, 7, frameData, 0, 0, 0, 0, 1, 0, 0, 0, 0, 2, 'h', 'i')
	f.Add(ok)
	f.Add(append(ok, hdr(flagEndHeaders|flagEndStream, "grpc-status", "0")...))
	f.Add([]byte{0, 0, 6, frameSettings, 0, 0, 0, 0, 0, 0, settingInitialWindowSize, 0, 0, 0, 0})
	f.Add([]byte{0, 0, 8, framePing, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8})
	f.Add([]byte{0, 0, 4, frameWindowUpdate, 0, 0, 0, 0, 1, 0x7f, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, data []byte) {
		client, server := net.Pipe()
		s := newStream(client)
		go s.readLoop()
		go io.Copy(io.Discard, server)
		server.SetWriteDeadline(time.Now().Add(time.Second))
		server.Write(data)
		server.Close()
		done := make(chan struct{})
		go func() {
			for {
				if _, err := s.Recv(); err != nil {
					close(done)
					return
				}
			}
		}()
		select {
		case <-done:
		case <-time.After(2 * time.Second):
			t.Fatal("Recv hung after the connection ended")
		}
		s.Close()
	})
}
