package logging

import (
	"errors"
	"net"
	"os"
	"strconv"
	"sync"
	"time"
)

// syslogWriter sends records to the local syslog daemon as log/syslog does (RFC 3164 framing on
// /dev/log), reconnecting once when a write fails (the daemon was restarted).
type syslogWriter struct {
	mu   sync.Mutex
	tag  string
	conn *net.UnixConn
}

// syslogSockets are where local syslog daemons listen, in log/syslog's order.
var syslogSockets = []string{"/dev/log", "/var/run/syslog", "/var/run/log"}

func dialSyslog(tag string) (*syslogWriter, error) {
	w := &syslogWriter{tag: tag}
	if err := w.connect(); err != nil {
		return nil, err
	}
	return w, nil
}

func (w *syslogWriter) connect() error {
	for _, path := range syslogSockets {
		for _, network := range []string{"unixgram", "unix"} {
			if c, err := net.DialUnix(network, nil, &net.UnixAddr{Name: path, Net: network}); err == nil {
				w.conn = c
				return nil
			}
		}
	}
	return errors.New("no local syslog daemon")
}

// Facility daemon; severities err, warning, info, debug.
const facilityDaemon = 3 << 3

func severity(l Level) int {
	switch {
	case l >= LevelError:
		return 3
	case l >= LevelWarn:
		return 4
	case l >= LevelInfo:
		return 6
	}
	return 7
}

func (w *syslogWriter) write(level Level, line []byte) {
	w.mu.Lock()
	defer w.mu.Unlock()
	msg := make([]byte, 0, len(line)+64)
	msg = append(msg, '<')
	msg = strconv.AppendInt(msg, int64(facilityDaemon|severity(level)), 10)
	msg = append(msg, '>')
	msg = time.Now().AppendFormat(msg, time.Stamp)
	msg = append(msg, ' ')
	msg = append(msg, w.tag...)
	msg = append(msg, '[')
	msg = strconv.AppendInt(msg, int64(os.Getpid()), 10)
	msg = append(msg, "]: "...)
	msg = append(msg, trimNewline(line)...)
	msg = append(msg, '\n') // stream sockets need it; datagram daemons strip it
	if w.conn != nil {
		if _, err := w.conn.Write(msg); err == nil {
			return
		}
		w.conn.Close()
		w.conn = nil
	}
	if w.connect() == nil {
		w.conn.Write(msg)
	}
}

func (w *syslogWriter) close() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.conn != nil {
		w.conn.Close()
		w.conn = nil
	}
}
