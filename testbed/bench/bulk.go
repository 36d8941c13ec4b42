package bench

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
)

// BulkPath is the echo server's bulk endpoint: GET BulkPath+N answers N bytes.
const BulkPath = "/bytes/"

// bulkTimeout bounds one download: at 10 MB/s, 512 MiB take under a minute.
const bulkTimeout = 2 * time.Minute

// Download fetches size bytes from the echo server at addr (host:port) over one connection and
// returns the time from connecting to the last byte. ns, when set, is the network namespace
// (testbed.NewNetns) to connect from.
func Download(ctx context.Context, addr string, size int64, ns *os.File) (time.Duration, error) {
	if err := testbed.CheckTarget(addr); err != nil {
		return 0, err
	}
	ctx, cancel := context.WithTimeout(ctx, bulkTimeout)
	defer cancel()
	start := time.Now()
	conn, err := dialIn(ctx, ns, addr)
	if err != nil {
		return 0, fmt.Errorf("bulk download from %s: %w", addr, err)
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if _, err := fmt.Fprintf(conn, "GET %s%d HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n", BulkPath, size); err != nil {
		return 0, fmt.Errorf("bulk download from %s: %w", addr, err)
	}
	br := bufio.NewReaderSize(conn, 1<<20)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return 0, fmt.Errorf("bulk download from %s: %w", addr, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.ContentLength != size {
		return 0, fmt.Errorf("bulk download from %s: %s with %d bytes, want 200 with %d", addr, resp.Status, resp.ContentLength, size)
	}
	n, err := io.CopyBuffer(io.Discard, resp.Body, make([]byte, 1<<20))
	elapsed := time.Since(start)
	if err != nil {
		return 0, fmt.Errorf("bulk download from %s: after %d bytes: %w", addr, n, err)
	}
	if n != size {
		return 0, fmt.Errorf("bulk download from %s: %d bytes, want %d", addr, n, size)
	}
	return elapsed, nil
}

// dialIn connects to addr from the network namespace ns (the test process's own when nil): the
// socket belongs to ns for its whole life.
func dialIn(ctx context.Context, ns *os.File, addr string) (conn net.Conn, err error) {
	if ns == nil {
		return testbed.Dial(ctx, "tcp", addr)
	}
	err = testbed.InNetns(ns, func() (err error) {
		conn, err = testbed.Dial(ctx, "tcp", addr)
		return err
	})
	return conn, err
}
