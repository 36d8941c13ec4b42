package shimlink

import (
	"errors"
	"io"
	"net/netip"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/internal/mapping"
)

func tcp(host, container string) mapping.Mapping {
	h, c := netip.MustParseAddrPort(host), netip.MustParseAddrPort(container)
	return mapping.Mapping{Key: mapping.Key{Proto: mapping.TCP, HostIP: h.Addr(), HostPort: h.Port()}, ContainerIP: c.Addr(), ContainerPort: c.Port()}
}

func TestRoundTrip(t *testing.T) {
	udp6 := tcp("[::]:53", "[fd00::2]:5353")
	udp6.Proto = mapping.UDP
	for _, m := range []Message{
		&Open{Mapping: tcp("127.0.0.1:8080", "172.17.0.2:80"), PID: 42, Version: "v1 (abc)"},
		&Open{Mapping: udp6, PID: 1, ProxiesItself: true, Serving: true},
		&Open{Mapping: tcp("[::1]:8080", "172.17.0.2:80"), PID: 7, Version: "dev", Serving: true, WantsServed: true},
		&Served{},
		&Ready{Service: "web-test", Mode: "http", ContainerID: "c0ffee", ContainerName: "web-1", Listener: "tcp_127.0.0.1_8080"},
		&Ready{Service: "dns-test", Mode: "shim", WantsStats: true},
		&Ready{Service: "web-test", Mode: "tcp", ConnectRetryWindow: 3 * time.Second},
		&Failed{Reason: "listen tcp4 0.0.0.0:80: bind: address already in use & more=odd"},
		&Log{Level: "WARN", Message: "msg=\"ünïcode\" n=1\nsecond line"},
		&Stats{InDatagrams: 1000, InBytes: 18890, OutDatagrams: 999, OutBytes: 18880, Flows: 2, FlowsTotal: 1 << 40},
		&Stats{},
	} {
		got, err := Decode(Encode(m))
		if err != nil || !reflect.DeepEqual(got, m) {
			t.Errorf("Decode(Encode(%+v)) = %+v, %v", m, got, err)
		}
	}
}

func TestDecodeRejects(t *testing.T) {
	for _, tc := range []struct{ packet, want string }{
		{"type=hello", "unknown message type"},
		{"reason=x", "unknown message type"},
		{"type=open&proto=icmp&host=127.0.0.1:1&container=10.0.0.1:1&pid=1", "unknown protocol"},
		{"type=open&proto=tcp&host=localhost:1&container=10.0.0.1:1&pid=1", "host address"},
		{"type=open&proto=tcp&host=127.0.0.1:1&container=0.0.0.0:1&pid=1", "unspecified"},
		{"type=open&proto=tcp&host=127.0.0.1:0&container=10.0.0.1:1&pid=1", "host port"},
		{"type=open&proto=tcp&host=127.0.0.1:1&container=10.0.0.1:1", "pid"},
		{"type=log&%zz", "malformed"},
		{"type=ready&connect_retry_ms=-5", "connect_retry_ms"},
		{"type=ready&connect_retry_ms=3s", "connect_retry_ms"},
		{"type=stats&in=1&in_bytes=2&out=3&out_bytes=4&flows=5", "flows_total"},
		{"type=stats&in=-1&in_bytes=2&out=3&out_bytes=4&flows=5&flows_total=6", "stats in"},
	} {
		if _, err := Decode([]byte(tc.packet)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Decode(%q) = %v, want an error containing %q", tc.packet, err, tc.want)
		}
	}
}

// FuzzDecode: no packet panics the server, and whatever decodes encodes to what decodes the same.
func FuzzDecode(f *testing.F) {
	f.Add(Encode(&Open{Mapping: tcp("127.0.0.1:8080", "172.17.0.2:80"), PID: 42}))
	f.Add(Encode(&Log{Level: "INFO", Message: "x"}))
	f.Add(Encode(&Stats{InDatagrams: 1, InBytes: 2, OutDatagrams: 3, OutBytes: 4, Flows: 5, FlowsTotal: 6}))
	f.Add([]byte("type=open&proto=udp&host=[::]:1&container=[::1]:2&pid=-1&serving=1"))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := Decode(b)
		if err != nil {
			return
		}
		again, err := Decode(Encode(m))
		if err != nil || !reflect.DeepEqual(again, m) {
			t.Fatalf("%q: %+v re-encoded as %+v, %v", b, m, again, err)
		}
	})
}

// TestConn: message boundaries kept, long log lines cut to fit, and the end of one side read as EOF.
func TestConn(t *testing.T) {
	path := filepath.Join(t.TempDir(), "shim.sock")
	l, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	accepted := make(chan *Conn, 1)
	go func() {
		uc, err := l.AcceptUnix()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- NewConn(uc)
	}()
	client, err := Dial(path)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	server := <-accepted
	defer server.Close()

	open := &Open{Mapping: tcp("127.0.0.1:1", "10.0.0.1:2"), PID: 3}
	long := &Log{Level: "INFO", Message: strings.Repeat("é", MaxMessage)}
	for _, m := range []Message{open, &Log{Level: "INFO", Message: "a"}, long} {
		if err := client.Send(m); err != nil {
			t.Fatal(err)
		}
	}
	if got, err := server.Recv(); err != nil || !reflect.DeepEqual(got, open) {
		t.Fatalf("first = %+v, %v", got, err)
	}
	if got, err := server.Recv(); err != nil || got.(*Log).Message != "a" {
		t.Fatalf("second = %+v, %v", got, err)
	}
	got, err := server.Recv()
	if err != nil || len(Encode(got)) > MaxMessage || !strings.HasPrefix(long.Message, got.(*Log).Message) || got.(*Log).Message == "" {
		t.Fatalf("long log line: %d bytes, %v", len(Encode(got)), err)
	}
	if err := client.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if _, err := server.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("after CloseWrite: %v, want EOF", err)
	}
	// The other way still works until the server closes.
	if err := server.Send(&Failed{Reason: "bye"}); err != nil {
		t.Fatal(err)
	}
	if got, err := client.Recv(); err != nil || got.(*Failed).Reason != "bye" {
		t.Fatalf("client got %+v, %v", got, err)
	}
	server.Close()
	if _, err := client.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("after the server closed: %v, want EOF", err)
	}
}
