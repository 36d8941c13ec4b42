// Command echoserver is the workload of the end-to-end tests: a static binary that runs as the only
// process of a FROM-scratch image and tells the caller which container answered.
//
// It serves HTTP (JSON describing the request and the container), raw TCP echo and UDP echo, on
// port lists taken from the environment so one container can stand behind a published port range.
// Echo is byte-exact so tests can count bytes through a proxy; the only exception is the WHOAMI
// probe, which must be the very first bytes of a TCP stream or a whole UDP datagram. For bulk
// transfers, HTTP GET /bytes/N answers N bytes (at most 64 GiB) from one reused buffer, so the
// server costs little per byte and benchmarks measure the path, not the source. The query
// parameters status=N (100-599) and delay=D (a Go duration up to 1 s) make an HTTP answer carry
// that status, or come that much later, for tests of error rates and latency.
//
// HTTP answers name the headers the request arrived with, so a test sees what a proxy added
// (X-Forwarded-For, trace context). ECHO_PROXY_PORTS lists TCP ports whose connections must open
// with a PROXY protocol header (v1 or v2, as a proxy sends it in front of the client's bytes): the
// server answers one line, "PROXY v<version> <source> <destination>\n", then echoes the rest; a
// connection without a valid header gets "ERR <reason>\n" and is closed.
//
// ECHO_LISTEN_DELAY (a Go duration, e.g. 300ms) makes it wait that long before it binds any port,
// like an application that takes a while to start: a request that arrives meanwhile finds nothing
// listening in the container, which is what the soak suite's first requests race against.
//
// As PID 1 in a container it gets no default signal handling, so it handles SIGTERM and SIGINT
// itself and exits 0 at once: a slow exit would make every `docker stop` in the suite wait.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/pires/go-proxyproto"
)

// whoami is the probe that asks for the server's name instead of an echo.
const whoami = "WHOAMI"

type config struct {
	name     string
	hostname string
	http     []int
	tcp      []int
	udp      []int
	proxy    []int         // TCP echo behind a PROXY protocol header
	delay    time.Duration // before binding any port
}

// maxListenDelay bounds ECHO_LISTEN_DELAY: a longer start would only be a typo that makes every
// test using the container wait.
const maxListenDelay = time.Minute

func main() {
	log.SetFlags(0)
	log.SetPrefix("echoserver: ")
	cfg, err := loadConfig(os.LookupEnv)
	if err != nil {
		log.Fatal(err)
	}

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)

	if cfg.delay > 0 {
		log.Printf("%s waiting %v before listening", cfg.name, cfg.delay)
		select {
		case sig := <-stop:
			log.Printf("%v: exiting", sig)
			os.Exit(0)
		case <-time.After(cfg.delay):
		}
	}

	errs := make(chan error, 1)
	for _, p := range cfg.http {
		ln, err := net.Listen("tcp", ":"+strconv.Itoa(p))
		if err != nil {
			log.Fatalf("http port %d: %v", p, err)
		}
		srv := &http.Server{Handler: httpHandler(cfg), ReadHeaderTimeout: 10 * time.Second}
		go func() { errs <- fmt.Errorf("http port %d: %w", p, srv.Serve(ln)) }()
	}
	for _, p := range cfg.tcp {
		ln, err := net.Listen("tcp", ":"+strconv.Itoa(p))
		if err != nil {
			log.Fatalf("tcp port %d: %v", p, err)
		}
		go func() { errs <- fmt.Errorf("tcp port %d: %w", p, serveTCP(ln, cfg.name)) }()
	}
	for _, p := range cfg.udp {
		pc, err := net.ListenPacket("udp", ":"+strconv.Itoa(p))
		if err != nil {
			log.Fatalf("udp port %d: %v", p, err)
		}
		go func() { errs <- fmt.Errorf("udp port %d: %w", p, serveUDP(pc, cfg.name)) }()
	}
	for _, p := range cfg.proxy {
		ln, err := net.Listen("tcp", ":"+strconv.Itoa(p))
		if err != nil {
			log.Fatalf("proxy-protocol port %d: %v", p, err)
		}
		go func() { errs <- fmt.Errorf("proxy-protocol port %d: %w", p, serveProxyProtocol(ln)) }()
	}
	log.Printf("%s serving http %v, tcp %v, udp %v, proxy-protocol %v", cfg.name, cfg.http, cfg.tcp, cfg.udp, cfg.proxy)

	select {
	case sig := <-stop:
		log.Printf("%v: exiting", sig)
		os.Exit(0)
	case err := <-errs:
		log.Fatal(err)
	}
}

func loadConfig(lookup func(string) (string, bool)) (config, error) {
	var cfg config
	cfg.hostname, _ = os.Hostname()
	cfg.name = cfg.hostname
	if v, ok := lookup("ECHO_NAME"); ok && v != "" {
		cfg.name = v
	}
	for _, l := range []struct {
		env  string
		def  string
		dest *[]int
	}{
		{"ECHO_HTTP_PORTS", "80", &cfg.http},
		{"ECHO_TCP_PORTS", "7", &cfg.tcp},
		{"ECHO_UDP_PORTS", "7", &cfg.udp},
		{"ECHO_PROXY_PORTS", "", &cfg.proxy},
	} {
		v, ok := lookup(l.env)
		if !ok {
			v = l.def
		}
		ports, err := parsePorts(v)
		if err != nil {
			return config{}, fmt.Errorf("%s=%q: %w", l.env, v, err)
		}
		*l.dest = ports
	}
	if v, ok := lookup("ECHO_LISTEN_DELAY"); ok && v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < 0 || d > maxListenDelay {
			return config{}, fmt.Errorf("ECHO_LISTEN_DELAY=%q: want a duration from 0 to %v, e.g. 300ms", v, maxListenDelay)
		}
		cfg.delay = d
	}
	return cfg, nil
}

// parsePorts reads "80,8080-8082": items separated by commas, each a port or an inclusive range.
// An empty string means no port at all, so a variable set to "" turns that kind of listener off.
func parsePorts(s string) ([]int, error) {
	var ports []int
	for item := range strings.SplitSeq(s, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			continue
		}
		lo, hi, isRange := strings.Cut(item, "-")
		first, err := parsePort(lo)
		if err != nil {
			return nil, err
		}
		last := first
		if isRange {
			if last, err = parsePort(hi); err != nil {
				return nil, err
			}
			if last < first {
				return nil, fmt.Errorf("range %q runs backwards", item)
			}
		}
		for p := first; p <= last; p++ {
			ports = append(ports, p)
		}
	}
	return ports, nil
}

func parsePort(s string) (int, error) {
	p, err := strconv.Atoi(strings.TrimSpace(s))
	if err != nil || p < 1 || p > 65535 {
		return 0, fmt.Errorf("%q is not a port number", s)
	}
	return p, nil
}

type httpReply struct {
	Name     string      `json:"name"`
	Hostname string      `json:"hostname"`
	Path     string      `json:"path"`
	Method   string      `json:"method"`
	Remote   string      `json:"remote"`
	Port     string      `json:"port"`
	Headers  http.Header `json:"headers"`
}

// bulkPrefix is the path of bulk downloads: /bytes/N.
const bulkPrefix = "/bytes/"

// maxBulk bounds a bulk download, so a mistyped size cannot keep a connection busy for hours.
const maxBulk = 64 << 30

// bulkChunk is written over and over for a bulk download.
var bulkChunk = bytes.Repeat([]byte("0123456789abcdef"), 16<<10)

func httpHandler(cfg config) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if rest, ok := strings.CutPrefix(r.URL.Path, bulkPrefix); ok {
			serveBulk(w, rest)
			return
		}
		status, delay, err := shaping(r.URL.Query())
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		if delay > 0 {
			select {
			case <-time.After(delay):
			case <-r.Context().Done():
				return
			}
		}
		_, port, _ := net.SplitHostPort(r.Context().Value(http.LocalAddrContextKey).(net.Addr).String())
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		_ = json.NewEncoder(w).Encode(httpReply{
			Name:     cfg.name,
			Hostname: cfg.hostname,
			Path:     r.URL.Path,
			Method:   r.Method,
			Remote:   r.RemoteAddr,
			Port:     port,
			Headers:  r.Header,
		})
	})
}

// maxDelay bounds the delay parameter: a test wants latency, not a hung connection.
const maxDelay = time.Second

// shaping reads the status and delay parameters of an HTTP request.
func shaping(q url.Values) (status int, delay time.Duration, err error) {
	status = http.StatusOK
	if s := q.Get("status"); s != "" {
		if status, err = strconv.Atoi(s); err != nil || status < 100 || status > 599 {
			return 0, 0, fmt.Errorf("status=%q: want an HTTP status from 100 to 599", s)
		}
	}
	if d := q.Get("delay"); d != "" {
		if delay, err = time.ParseDuration(d); err != nil || delay < 0 || delay > maxDelay {
			return 0, 0, fmt.Errorf("delay=%q: want a duration from 0 to %v, e.g. 5ms", d, maxDelay)
		}
	}
	return status, delay, nil
}

// serveBulk answers size (a decimal byte count) bytes of a repeating pattern.
func serveBulk(w http.ResponseWriter, size string) {
	n, err := strconv.ParseInt(size, 10, 64)
	if err != nil || n < 0 || n > maxBulk {
		http.Error(w, fmt.Sprintf("want /bytes/N with N a byte count from 0 to %d", int64(maxBulk)), http.StatusBadRequest)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
	for n > 0 {
		chunk := bulkChunk[:min(n, int64(len(bulkChunk)))]
		if _, err := w.Write(chunk); err != nil {
			return
		}
		n -= int64(len(chunk))
	}
}

func serveTCP(ln net.Listener, name string) error {
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go func() {
			defer c.Close()
			if err := echoStream(c, name); err != nil && !errors.Is(err, net.ErrClosed) {
				log.Printf("tcp %s: %v", c.RemoteAddr(), err)
			}
			if tc, ok := c.(*net.TCPConn); ok {
				_ = tc.CloseWrite()
			}
		}()
	}
}

// echoStream copies rw back to itself, except that a stream opening with "WHOAMI\n" gets the name
// (and a newline) in place of those bytes. Bytes that might still turn into the probe are held
// back until they either complete it or stop matching, so a client sending fewer bytes than the
// probe still gets them echoed.
func echoStream(rw io.ReadWriter, name string) error {
	probe := []byte(whoami + "\n")
	var held []byte
	buf := make([]byte, 32*1024)
	for {
		n, err := rw.Read(buf)
		if n > 0 {
			held = append(held, buf[:n]...)
			switch {
			case len(held) >= len(probe) && bytes.Equal(held[:len(probe)], probe):
				if _, werr := rw.Write(append([]byte(name+"\n"), held[len(probe):]...)); werr != nil {
					return werr
				}
				return echoRest(rw, buf)
			case !bytes.HasPrefix(probe, held):
				if _, werr := rw.Write(held); werr != nil {
					return werr
				}
				return echoRest(rw, buf)
			}
		}
		if err == io.EOF {
			_, werr := rw.Write(held)
			return werr
		}
		if err != nil {
			return err
		}
	}
}

// echoRest hides the connection's ReaderFrom/WriterTo so that copying a socket onto itself stays
// a plain read/write loop rather than a splice from a socket into the same socket.
func echoRest(rw io.ReadWriter, buf []byte) error {
	_, err := io.CopyBuffer(struct{ io.Writer }{rw}, struct{ io.Reader }{rw}, buf)
	return err
}

// proxyHeaderTimeout bounds the wait for a PROXY protocol header: a proxy sends it at once.
const proxyHeaderTimeout = 10 * time.Second

func serveProxyProtocol(ln net.Listener) error {
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go func() {
			defer c.Close()
			if err := echoBehindProxyHeader(c); err != nil && !errors.Is(err, net.ErrClosed) {
				log.Printf("proxy-protocol %s: %v", c.RemoteAddr(), err)
			}
		}()
	}
}

// echoBehindProxyHeader reads the PROXY protocol header c must open with, tells the peer what it
// said, and echoes the rest of the stream.
func echoBehindProxyHeader(c net.Conn) error {
	br := bufio.NewReader(c)
	header, err := proxyproto.ReadHeaderTimeout(c, br, proxyHeaderTimeout)
	if err != nil {
		_, _ = fmt.Fprintf(c, "ERR no valid PROXY protocol header: %v\n", err)
		return err
	}
	if _, err := io.WriteString(c, proxyReply(header)); err != nil {
		return err
	}
	if err := echoRest(struct {
		io.Reader
		io.Writer
	}{br, c}, make([]byte, 32*1024)); err != nil {
		return err
	}
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.CloseWrite()
	}
	return nil
}

// proxyReply is the line that tells the peer what the PROXY header said.
func proxyReply(h *proxyproto.Header) string {
	return fmt.Sprintf("PROXY v%d %v %v\n", h.Version, h.SourceAddr, h.DestinationAddr)
}

func serveUDP(pc net.PacketConn, name string) error {
	buf := make([]byte, 65535)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return err
		}
		if _, err := pc.WriteTo(udpReply(buf[:n], name), from); err != nil {
			log.Printf("udp reply to %s: %v", from, err)
		}
	}
}

func udpReply(datagram []byte, name string) []byte {
	if string(bytes.TrimSuffix(datagram, []byte("\n"))) == whoami {
		return []byte(name)
	}
	return datagram
}
