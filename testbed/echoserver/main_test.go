package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pires/go-proxyproto"
)

func TestParsePorts(t *testing.T) {
	tests := []struct {
		in      string
		want    []int
		wantErr bool
	}{
		{in: "80", want: []int{80}},
		{in: "", want: nil},
		{in: " 7 , 8 ", want: []int{7, 8}},
		{in: "8000-8003", want: []int{8000, 8001, 8002, 8003}},
		{in: "80,9000-9001", want: []int{80, 9000, 9001}},
		{in: "9001-9000", wantErr: true},
		{in: "0", wantErr: true},
		{in: "65536", wantErr: true},
		{in: "http", wantErr: true},
		{in: "80-", wantErr: true},
	}
	for _, tt := range tests {
		got, err := parsePorts(tt.in)
		if (err != nil) != tt.wantErr {
			t.Errorf("parsePorts(%q) error = %v, want error %v", tt.in, err, tt.wantErr)
			continue
		}
		if !slices.Equal(got, tt.want) {
			t.Errorf("parsePorts(%q) = %v, want %v", tt.in, got, tt.want)
		}
	}
}

func TestLoadConfig(t *testing.T) {
	env := map[string]string{"ECHO_NAME": "web-1", "ECHO_HTTP_PORTS": "", "ECHO_TCP_PORTS": "7000-7001"}
	cfg, err := loadConfig(func(k string) (string, bool) { v, ok := env[k]; return v, ok })
	if err != nil {
		t.Fatal(err)
	}
	if cfg.name != "web-1" || len(cfg.http) != 0 || !slices.Equal(cfg.tcp, []int{7000, 7001}) || !slices.Equal(cfg.udp, []int{7}) {
		t.Errorf("loadConfig = %+v", cfg)
	}
	if _, err := loadConfig(func(k string) (string, bool) { return "x", k == "ECHO_UDP_PORTS" }); err == nil {
		t.Error("loadConfig accepted ECHO_UDP_PORTS=x")
	}
}

func TestLoadConfigListenDelay(t *testing.T) {
	tests := []struct {
		in      string
		set     bool
		want    time.Duration
		wantErr bool
	}{
		{set: false, want: 0},
		{in: "", set: true, want: 0},
		{in: "300ms", set: true, want: 300 * time.Millisecond},
		{in: "0s", set: true, want: 0},
		{in: "1m", set: true, want: time.Minute},
		{in: "61s", set: true, wantErr: true},
		{in: "-1ms", set: true, wantErr: true},
		{in: "300", set: true, wantErr: true},
	}
	for _, tt := range tests {
		cfg, err := loadConfig(func(k string) (string, bool) {
			if k == "ECHO_LISTEN_DELAY" {
				return tt.in, tt.set
			}
			return "", false
		})
		if (err != nil) != tt.wantErr {
			t.Errorf("ECHO_LISTEN_DELAY=%q: error = %v, want error %v", tt.in, err, tt.wantErr)
			continue
		}
		if err == nil && cfg.delay != tt.want {
			t.Errorf("ECHO_LISTEN_DELAY=%q: delay = %v, want %v", tt.in, cfg.delay, tt.want)
		}
	}
}

// chunkedConn feeds the server its input in the given chunks, as a TCP stream may arrive.
type chunkedConn struct {
	chunks [][]byte
	out    bytes.Buffer
}

func (c *chunkedConn) Read(p []byte) (int, error) {
	if len(c.chunks) == 0 {
		return 0, io.EOF
	}
	n := copy(p, c.chunks[0])
	if c.chunks[0] = c.chunks[0][n:]; len(c.chunks[0]) == 0 {
		c.chunks = c.chunks[1:]
	}
	return n, nil
}

func (c *chunkedConn) Write(p []byte) (int, error) { return c.out.Write(p) }

func TestEchoStream(t *testing.T) {
	tests := []struct {
		name   string
		chunks []string
		want   string
	}{
		{"plain echo", []string{"hello ", "world"}, "hello world"},
		{"whoami", []string{"WHOAMI\n"}, "web-1\n"},
		{"whoami split across reads", []string{"WHO", "AMI", "\nrest"}, "web-1\nrest"},
		{"whoami then data", []string{"WHOAMI\nabc"}, "web-1\nabc"},
		{"probe prefix only", []string{"WHO"}, "WHO"},
		{"probe not first", []string{"x", "WHOAMI\n"}, "xWHOAMI\n"},
		{"diverges from probe", []string{"WHOA", "!"}, "WHOA!"},
		{"empty", nil, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := &chunkedConn{}
			for _, s := range tt.chunks {
				c.chunks = append(c.chunks, []byte(s))
			}
			if err := echoStream(c, "web-1"); err != nil {
				t.Fatal(err)
			}
			if got := c.out.String(); got != tt.want {
				t.Errorf("echoStream wrote %q, want %q", got, tt.want)
			}
		})
	}
}

func TestUDPReply(t *testing.T) {
	tests := []struct{ in, want string }{
		{"WHOAMI", "web-1"},
		{"WHOAMI\n", "web-1"},
		{"whoami", "whoami"},
		{"payload", "payload"},
		{"", ""},
	}
	for _, tt := range tests {
		if got := string(udpReply([]byte(tt.in), "web-1")); got != tt.want {
			t.Errorf("udpReply(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func TestBulk(t *testing.T) {
	h := httpHandler(config{name: "web-1"})
	tests := []struct {
		path   string
		status int
		size   int
	}{
		{"/bytes/0", 200, 0},
		{"/bytes/1", 200, 1},
		{"/bytes/1000000", 200, 1000000}, // several chunks and a partial one
		{"/bytes/-1", 400, -1},
		{"/bytes/x", 400, -1},
		{"/bytes/68719476737", 400, -1}, // over 64 GiB
	}
	for _, tt := range tests {
		t.Run(tt.path, func(t *testing.T) {
			rec := httptest.NewRecorder()
			req := httptest.NewRequest(http.MethodGet, tt.path, nil)
			h.ServeHTTP(rec, req)
			if rec.Code != tt.status {
				t.Fatalf("status %d, want %d: %s", rec.Code, tt.status, rec.Body)
			}
			if tt.size < 0 {
				return
			}
			if got := rec.Header().Get("Content-Length"); got != strconv.Itoa(tt.size) {
				t.Errorf("Content-Length %q, want %d", got, tt.size)
			}
			body := rec.Body.Bytes()
			if len(body) != tt.size {
				t.Fatalf("body of %d bytes, want %d", len(body), tt.size)
			}
			pattern := []byte("0123456789abcdef")
			for i := 0; i < len(body); i += 4093 {
				if body[i] != pattern[i%len(pattern)] {
					t.Fatalf("byte %d is %q, want %q", i, body[i], pattern[i%len(pattern)])
				}
			}
		})
	}
}

// TestHTTPHeaders: the reply names the request's headers, so a test sees what a proxy added.
func TestHTTPHeaders(t *testing.T) {
	rec := httptest.NewRecorder()
	req := httptest.NewRequest(http.MethodGet, "/", nil)
	req = req.WithContext(context.WithValue(req.Context(), http.LocalAddrContextKey, &net.TCPAddr{IP: net.IPv4(172, 17, 0, 2), Port: 80}))
	req.Header.Set("X-Forwarded-For", "127.0.0.7")
	httpHandler(config{name: "web-1"}).ServeHTTP(rec, req)
	var got httpReply
	if err := json.Unmarshal(rec.Body.Bytes(), &got); err != nil {
		t.Fatal(err)
	}
	if got.Headers.Get("X-Forwarded-For") != "127.0.0.7" || got.Name != "web-1" || got.Port != "80" {
		t.Errorf("reply %+v, want the request's X-Forwarded-For", got)
	}
}

// TestProxyProtocol: a connection to a proxy-protocol port opens with a PROXY header (either
// version) and gets told what it said, then an echo; one without a valid header gets an error line.
func TestProxyProtocol(t *testing.T) {
	src := &net.TCPAddr{IP: net.ParseIP("127.0.0.7"), Port: 40001}
	dst := &net.TCPAddr{IP: net.ParseIP("127.0.0.1"), Port: 8080}
	src6 := &net.TCPAddr{IP: net.ParseIP("2001:db8::7"), Port: 40002}
	dst6 := &net.TCPAddr{IP: net.ParseIP("::1"), Port: 8080}
	header := func(version byte, src, dst net.Addr) []byte {
		proto := proxyproto.TCPv4
		if src.(*net.TCPAddr).IP.To4() == nil {
			proto = proxyproto.TCPv6
		}
		b, err := (&proxyproto.Header{Version: version, Command: proxyproto.PROXY, TransportProtocol: proto, SourceAddr: src, DestinationAddr: dst}).Format()
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	tests := []struct {
		name string
		in   []byte
		want string
	}{
		{"v1", append(header(1, src, dst), "hello"...), "PROXY v1 127.0.0.7:40001 127.0.0.1:8080\nhello"},
		{"v2", append(header(2, src, dst), "hello"...), "PROXY v2 127.0.0.7:40001 127.0.0.1:8080\nhello"},
		{"v2 ipv6", append(header(2, src6, dst6), "hi"...), "PROXY v2 [2001:db8::7]:40002 [::1]:8080\nhi"},
		{"no header", []byte("hello"), "ERR no valid PROXY protocol header"},
		{"broken v1", []byte("PROXY TCP4 nonsense\r\nhello"), "ERR no valid PROXY protocol header"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			client, server := net.Pipe()
			done := make(chan error, 1)
			go func() { done <- echoBehindProxyHeader(server); server.Close() }()
			go func() { _, _ = client.Write(tt.in) }()
			var got []byte
			buf := make([]byte, 256)
			_ = client.SetReadDeadline(time.Now().Add(5 * time.Second))
			for !strings.HasPrefix(string(got), tt.want) {
				n, err := client.Read(buf)
				got = append(got, buf[:n]...)
				if err != nil {
					break
				}
			}
			client.Close()
			<-done
			if !strings.HasPrefix(string(got), tt.want) {
				t.Errorf("got %q, want it to start with %q", got, tt.want)
			}
		})
	}
}

// status=N and delay=D shape an answer for tests of error rates and latency; bad values are a 400
// that says what to send.
func TestShaping(t *testing.T) {
	h := httpHandler(config{name: "web-1"})
	for _, tt := range []struct {
		query    string
		status   int
		atLeast  time.Duration
		contains string
	}{
		{"", 200, 0, `"name":"web-1"`},
		{"?status=503", 503, 0, `"name":"web-1"`},
		{"?status=404&delay=30ms", 404, 30 * time.Millisecond, `"name":"web-1"`},
		{"?delay=20ms", 200, 20 * time.Millisecond, `"name":"web-1"`},
		{"?status=99", 400, 0, "want an HTTP status from 100 to 599"},
		{"?status=x", 400, 0, "want an HTTP status"},
		{"?delay=2s", 400, 0, "want a duration from 0 to 1s"},
		{"?delay=-1ms", 400, 0, "want a duration"},
	} {
		rec := httptest.NewRecorder()
		start := time.Now()
		req := httptest.NewRequest(http.MethodGet, "/x"+tt.query, nil)
		req = req.WithContext(context.WithValue(req.Context(), http.LocalAddrContextKey, &net.TCPAddr{IP: net.IPv4(172, 17, 0, 2), Port: 80}))
		h.ServeHTTP(rec, req)
		took := time.Since(start)
		if rec.Code != tt.status || took < tt.atLeast || !bytes.Contains(rec.Body.Bytes(), []byte(tt.contains)) {
			t.Errorf("%q: %d after %v, %q; want %d after at least %v, containing %q", tt.query, rec.Code, took, rec.Body, tt.status, tt.atLeast, tt.contains)
		}
	}
}
