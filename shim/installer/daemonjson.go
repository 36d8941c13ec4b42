package installer

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path"
	"reflect"
	"slices"
	"strings"
)

// The daemon.json keys the installer manages.
const (
	KeyProxyPath    = "userland-proxy-path"
	KeyIPTables     = "iptables"
	KeyIP6Tables    = "ip6tables"
	KeyUserlandProx = "userland-proxy"
	keyLiveRestore  = "live-restore"
)

// maxDaemonJSON bounds what is read from daemon.json: it is outside input, and a real one is a
// few hundred bytes.
const maxDaemonJSON = 1 << 20

// ErrDaemonJSON marks a daemon.json the installer refuses to change; nothing is written then.
var ErrDaemonJSON = errors.New("daemon.json")

// member is one top-level key of daemon.json with its value exactly as written.
type member struct {
	key   string
	value json.RawMessage
}

// document is daemon.json as an ordered list of top-level members, so that rewriting it keeps the
// user's key order and every value byte for byte (only whitespace is normalised).
type document []member

// parseDocument reads a daemon.json. An empty (or all-whitespace) file is an empty object, as
// dockerd treats it. Anything but one JSON object is an error, and so is a key given twice:
// dockerd would silently take the last one, and guessing which one the user meant is not the
// installer's job.
func parseDocument(b []byte) (document, error) {
	if len(b) > maxDaemonJSON {
		return nil, fmt.Errorf("%w: %d bytes is more than the %d a daemon configuration can sensibly hold", ErrDaemonJSON, len(b), maxDaemonJSON)
	}
	if len(bytes.TrimSpace(b)) == 0 {
		return document{}, nil
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	tok, err := dec.Token()
	if err != nil {
		return nil, fmt.Errorf("%w: invalid JSON: %v", ErrDaemonJSON, err)
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, fmt.Errorf("%w: the top level must be a JSON object {...}, found %s", ErrDaemonJSON, describeToken(tok))
	}
	var doc document
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, fmt.Errorf("%w: invalid JSON: %v", ErrDaemonJSON, err)
		}
		key, ok := tok.(string)
		if !ok {
			return nil, fmt.Errorf("%w: invalid JSON: expected a key, found %s", ErrDaemonJSON, describeToken(tok))
		}
		var value json.RawMessage
		if err := dec.Decode(&value); err != nil {
			return nil, fmt.Errorf("%w: invalid JSON: value of %q: %v", ErrDaemonJSON, key, err)
		}
		if seen[key] {
			return nil, fmt.Errorf("%w: key %q appears more than once; keep one and run the installer again", ErrDaemonJSON, key)
		}
		seen[key] = true
		doc = append(doc, member{key: key, value: value})
	}
	if _, err := dec.Token(); err != nil { // the closing brace
		return nil, fmt.Errorf("%w: invalid JSON: %v", ErrDaemonJSON, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, fmt.Errorf("%w: invalid JSON: unexpected data after the top-level object", ErrDaemonJSON)
	}
	return doc, nil
}

func describeToken(tok json.Token) string {
	switch v := tok.(type) {
	case json.Delim:
		return fmt.Sprintf("%q", string(v))
	case string:
		return "a string"
	case nil:
		return "null"
	default:
		return fmt.Sprintf("%v", v)
	}
}

func (d document) get(key string) (json.RawMessage, bool) {
	for _, m := range d {
		if m.key == key {
			return m.value, true
		}
	}
	return nil, false
}

// set replaces key's value in place, or appends the key at the end.
func (d document) set(key string, value json.RawMessage) document {
	for i, m := range d {
		if m.key == key {
			d[i].value = value
			return d
		}
	}
	return append(d, member{key: key, value: value})
}

func (d document) remove(key string) document {
	return slices.DeleteFunc(d, func(m member) bool { return m.key == key })
}

// encode writes the document with two-space indentation and a final newline, the layout of
// Docker's own documentation.
func (d document) encode() []byte {
	var b bytes.Buffer
	if len(d) == 0 {
		return []byte("{}\n")
	}
	b.WriteString("{\n")
	for i, m := range d {
		b.WriteString("  ")
		b.Write(encodeString(m.key))
		b.WriteString(": ")
		var v bytes.Buffer
		if err := json.Indent(&v, m.value, "  ", "  "); err != nil {
			// Unreachable: every value was produced by the JSON decoder or by encodeValue.
			panic(fmt.Sprintf("installer: re-indenting the value of %q: %v", m.key, err))
		}
		b.Write(v.Bytes())
		if i < len(d)-1 {
			b.WriteByte(',')
		}
		b.WriteByte('\n')
	}
	b.WriteString("}\n")
	return b.Bytes()
}

func encodeString(s string) []byte {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(s) // a string always encodes
	return bytes.TrimSuffix(b.Bytes(), []byte("\n"))
}

func encodeValue(v any) json.RawMessage {
	switch v := v.(type) {
	case string:
		return encodeString(v)
	case bool:
		if v {
			return json.RawMessage("true")
		}
		return json.RawMessage("false")
	default:
		panic(fmt.Sprintf("installer: unexpected value type %T", v))
	}
}

// isString reports whether raw is the JSON string s.
func isString(raw json.RawMessage, s string) bool {
	var got string
	return json.Unmarshal(raw, &got) == nil && got == s
}

// isBool reports whether raw is the JSON literal true or false, as b. (Decoding into a bool would
// take null for false, and dockerd reads null as "keep the default".)
func isBool(raw json.RawMessage, b bool) bool {
	return bytes.Equal(bytes.TrimSpace(raw), encodeValue(b))
}

// Previous is a managed key's value before the installer changed it.
type Previous struct {
	Key     string          `json:"key"`
	Present bool            `json:"present"`
	Value   json.RawMessage `json:"value,omitempty"`
}

// wanted lists the settings that make dockerd run the shim for every published port:
//   - userland-proxy-path: the shim instead of docker-proxy;
//   - iptables false: with iptables on, dockerd DNATs outside traffic straight to the container,
//     past the userland proxy and so past Envoy;
//   - ip6tables false: Docker 27 and later keep it on when iptables is off (20.10's default is
//     off), and then DNAT IPv6 traffic to published ports past Envoy just the same;
//   - userland-proxy not false: false would mean no userland proxy at all. Only an explicit false
//     is changed; absent means true.
func wanted(shimPath string) []struct {
	key  string
	ok   func(raw json.RawMessage, present bool) bool
	want json.RawMessage
} {
	return []struct {
		key  string
		ok   func(raw json.RawMessage, present bool) bool
		want json.RawMessage
	}{
		{KeyProxyPath, func(raw json.RawMessage, present bool) bool { return present && isString(raw, shimPath) }, encodeValue(shimPath)},
		{KeyIPTables, func(raw json.RawMessage, present bool) bool { return present && isBool(raw, false) }, encodeValue(false)},
		{KeyIP6Tables, func(raw json.RawMessage, present bool) bool { return present && isBool(raw, false) }, encodeValue(false)},
		{KeyUserlandProx, func(raw json.RawMessage, present bool) bool { return !present || !isBool(raw, false) }, encodeValue(true)},
	}
}

// Merge returns daemon.json with the shim configured, and the previous values of the keys it
// changed. Every other key is kept, in its place, with its value as written. When the file already
// says what the shim needs, changed is false and out is orig itself: nothing to write, nothing to
// back up.
func Merge(orig []byte, shimPath string) (out []byte, prev []Previous, changed bool, err error) {
	if err := checkShimPath(shimPath); err != nil {
		return nil, nil, false, err
	}
	doc, err := parseDocument(orig)
	if err != nil {
		return nil, nil, false, err
	}
	for _, w := range wanted(shimPath) {
		raw, present := doc.get(w.key)
		if w.ok(raw, present) {
			continue
		}
		prev = append(prev, Previous{Key: w.key, Present: present, Value: raw})
		doc = doc.set(w.key, w.want)
	}
	if len(prev) == 0 {
		return orig, nil, false, nil
	}
	return doc.encode(), prev, true, nil
}

// Configured reports whether daemon.json already makes dockerd run the shim at shimPath.
func Configured(b []byte, shimPath string) (bool, error) {
	_, prev, changed, err := Merge(b, shimPath)
	return err == nil && !changed && len(prev) == 0, err
}

// LiveRestore reports whether daemon.json enables live-restore (containers survive a dockerd
// restart), which changes what restarting dockerd does to running containers.
func LiveRestore(b []byte) bool {
	doc, err := parseDocument(b)
	if err != nil {
		return false
	}
	raw, ok := doc.get(keyLiveRestore)
	return ok && isBool(raw, true)
}

// ProxyPath returns daemon.json's userland-proxy-path, if it has one.
func ProxyPath(b []byte) (string, bool) {
	doc, err := parseDocument(b)
	if err != nil {
		return "", false
	}
	raw, ok := doc.get(KeyProxyPath)
	var s string
	if !ok || json.Unmarshal(raw, &s) != nil {
		return "", false
	}
	return s, true
}

// Restore undoes Merge: each key in prev that still holds the value the installer set gets its
// previous value back (or is removed, if it was absent). A key the user changed since is left
// alone and named in kept. changed is false, and out is cur itself, when nothing needs to change.
func Restore(cur []byte, shimPath string, prev []Previous) (out []byte, kept []string, changed bool, err error) {
	doc, err := parseDocument(cur)
	if err != nil {
		return nil, nil, false, err
	}
	set := map[string]json.RawMessage{}
	for _, w := range wanted(shimPath) {
		set[w.key] = w.want
	}
	for _, p := range prev {
		ours, managed := set[p.Key]
		if !managed {
			return nil, nil, false, fmt.Errorf("installer state names %q, which the installer never changes", p.Key)
		}
		raw, present := doc.get(p.Key)
		if !present || !sameJSON(raw, ours) {
			if present || p.Present {
				kept = append(kept, p.Key)
			}
			continue
		}
		if p.Present {
			if !json.Valid(p.Value) {
				return nil, nil, false, fmt.Errorf("installer state: the previous value of %q is not valid JSON", p.Key)
			}
			doc = doc.set(p.Key, p.Value)
		} else {
			doc = doc.remove(p.Key)
		}
		changed = true
	}
	if !changed {
		return cur, kept, false, nil
	}
	return doc.encode(), kept, true, nil
}

// sameJSON compares two JSON values by meaning (so "false" equals " false").
func sameJSON(a, b json.RawMessage) bool {
	var x, y any
	if json.Unmarshal(a, &x) != nil || json.Unmarshal(b, &y) != nil {
		return false
	}
	return reflect.DeepEqual(x, y)
}

// checkShimPath rejects a path dockerd could not use: it must be absolute and clean.
func checkShimPath(p string) error {
	if !strings.HasPrefix(p, "/") || strings.ContainsAny(p, "\x00\n") || p != path.Clean(p) {
		return fmt.Errorf("shim path %q: want a clean absolute path such as /usr/local/bin/envoy-docker-shim", p)
	}
	return nil
}
