package installer

import (
	"bytes"
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"
)

const shimPath = "/usr/local/bin/envoy-docker-shim"

// decode turns JSON text into a comparable value; numbers stay as written.
func decode(t testing.TB, b []byte) map[string]any {
	t.Helper()
	if len(bytes.TrimSpace(b)) == 0 {
		return map[string]any{}
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var m map[string]any
	if err := dec.Decode(&m); err != nil {
		t.Fatalf("decoding %q: %v", b, err)
	}
	return m
}

func topKeys(t testing.TB, b []byte) []string {
	t.Helper()
	doc, err := parseDocument(b)
	if err != nil {
		t.Fatalf("parsing %q: %v", b, err)
	}
	var keys []string
	for _, m := range doc {
		keys = append(keys, m.key)
	}
	return keys
}

func TestMerge(t *testing.T) {
	nested := `{
	"log-driver": "json-file",
	"log-opts": {"max-size": "10m", "labels": "a,b"},
	"default-address-pools": [{"base": "10.10.0.0/16", "size": 24}],
	"iptables": true,
	"mtu": 1500.0,
	"big": 12345678901234567890,
	"note": "\u00e9 <&> \"q\""
}`
	for _, tc := range []struct {
		name     string
		orig     string
		want     string   // the merged document, compared by meaning
		wantKeys []string // top-level key order of the result
		wantPrev []Previous
	}{
		{
			name:     "missing file",
			orig:     "",
			want:     `{"userland-proxy-path": "/usr/local/bin/envoy-docker-shim", "iptables": false, "ip6tables": false}`,
			wantKeys: []string{KeyProxyPath, KeyIPTables, KeyIP6Tables},
			wantPrev: []Previous{{Key: KeyProxyPath}, {Key: KeyIPTables}, {Key: KeyIP6Tables}},
		},
		{
			name:     "whitespace only",
			orig:     " \n\t\n",
			want:     `{"userland-proxy-path": "/usr/local/bin/envoy-docker-shim", "iptables": false, "ip6tables": false}`,
			wantKeys: []string{KeyProxyPath, KeyIPTables, KeyIP6Tables},
			wantPrev: []Previous{{Key: KeyProxyPath}, {Key: KeyIPTables}, {Key: KeyIP6Tables}},
		},
		{
			name:     "empty object",
			orig:     "{}",
			want:     `{"userland-proxy-path": "/usr/local/bin/envoy-docker-shim", "iptables": false, "ip6tables": false}`,
			wantKeys: []string{KeyProxyPath, KeyIPTables, KeyIP6Tables},
			wantPrev: []Previous{{Key: KeyProxyPath}, {Key: KeyIPTables}, {Key: KeyIP6Tables}},
		},
		{
			name: "nested keys kept in place, values as written",
			orig: nested,
			want: `{
	"log-driver": "json-file",
	"log-opts": {"max-size": "10m", "labels": "a,b"},
	"default-address-pools": [{"base": "10.10.0.0/16", "size": 24}],
	"iptables": false,
	"mtu": 1500.0,
	"big": 12345678901234567890,
	"note": "\u00e9 <&> \"q\"",
	"userland-proxy-path": "/usr/local/bin/envoy-docker-shim",
	"ip6tables": false
}`,
			wantKeys: []string{"log-driver", "log-opts", "default-address-pools", KeyIPTables, "mtu", "big", "note", KeyProxyPath, KeyIP6Tables},
			wantPrev: []Previous{{Key: KeyProxyPath}, {Key: KeyIPTables, Present: true, Value: json.RawMessage("true")}, {Key: KeyIP6Tables}},
		},
		{
			name:     "another proxy path is replaced",
			orig:     `{"userland-proxy-path": "/usr/libexec/docker/docker-proxy", "iptables": false, "ip6tables": false}`,
			want:     `{"userland-proxy-path": "/usr/local/bin/envoy-docker-shim", "iptables": false, "ip6tables": false}`,
			wantKeys: []string{KeyProxyPath, KeyIPTables, KeyIP6Tables},
			wantPrev: []Previous{{Key: KeyProxyPath, Present: true, Value: json.RawMessage(`"/usr/libexec/docker/docker-proxy"`)}},
		},
		{
			name:     "userland-proxy false would bypass the shim",
			orig:     `{"userland-proxy": false, "debug": true}`,
			want:     `{"userland-proxy": true, "debug": true, "userland-proxy-path": "/usr/local/bin/envoy-docker-shim", "iptables": false, "ip6tables": false}`,
			wantKeys: []string{KeyUserlandProx, "debug", KeyProxyPath, KeyIPTables, KeyIP6Tables},
			wantPrev: []Previous{{Key: KeyProxyPath}, {Key: KeyIPTables}, {Key: KeyIP6Tables}, {Key: KeyUserlandProx, Present: true, Value: json.RawMessage("false")}},
		},
		{
			name:     "iptables null is not false",
			orig:     `{"iptables": null, "userland-proxy-path": "/usr/local/bin/envoy-docker-shim", "ip6tables": false}`,
			want:     `{"iptables": false, "userland-proxy-path": "/usr/local/bin/envoy-docker-shim", "ip6tables": false}`,
			wantKeys: []string{KeyIPTables, KeyProxyPath, KeyIP6Tables},
			wantPrev: []Previous{{Key: KeyIPTables, Present: true, Value: json.RawMessage("null")}},
		},
		{
			name:     "iptables as a string is not false",
			orig:     `{"iptables": "false", "ip6tables": false}`,
			want:     `{"iptables": false, "ip6tables": false, "userland-proxy-path": "/usr/local/bin/envoy-docker-shim"}`,
			wantKeys: []string{KeyIPTables, KeyIP6Tables, KeyProxyPath},
			wantPrev: []Previous{{Key: KeyProxyPath}, {Key: KeyIPTables, Present: true, Value: json.RawMessage(`"false"`)}},
		},
		{
			name:     "ip6tables on would DNAT IPv6 past Envoy (Docker 27+)",
			orig:     `{"userland-proxy-path": "/usr/local/bin/envoy-docker-shim", "iptables": false, "ip6tables": true}`,
			want:     `{"userland-proxy-path": "/usr/local/bin/envoy-docker-shim", "iptables": false, "ip6tables": false}`,
			wantKeys: []string{KeyProxyPath, KeyIPTables, KeyIP6Tables},
			wantPrev: []Previous{{Key: KeyIP6Tables, Present: true, Value: json.RawMessage("true")}},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, prev, changed, err := Merge([]byte(tc.orig), shimPath)
			if err != nil {
				t.Fatal(err)
			}
			if !changed {
				t.Fatal("changed = false, want true")
			}
			if got, want := decode(t, out), decode(t, []byte(tc.want)); !reflect.DeepEqual(got, want) {
				t.Errorf("merged:\n%s\nwant the meaning of:\n%s", out, tc.want)
			}
			if got := topKeys(t, out); !reflect.DeepEqual(got, tc.wantKeys) {
				t.Errorf("key order %q, want %q", got, tc.wantKeys)
			}
			if !reflect.DeepEqual(prev, tc.wantPrev) {
				t.Errorf("previous = %+v, want %+v", prev, tc.wantPrev)
			}
			if !bytes.HasSuffix(out, []byte("}\n")) {
				t.Errorf("output does not end with a newline: %q", out)
			}

			// Idempotent: merging the result changes nothing and returns the bytes as they are.
			again, prev2, changed2, err := Merge(out, shimPath)
			if err != nil || changed2 || len(prev2) != 0 || !bytes.Equal(again, out) {
				t.Errorf("second merge: changed=%v prev=%v err=%v, bytes equal=%v", changed2, prev2, err, bytes.Equal(again, out))
			}

			// Restore gives back the original meaning.
			restored, kept, changed3, err := Restore(out, shimPath, prev)
			if err != nil || !changed3 || len(kept) != 0 {
				t.Fatalf("restore: changed=%v kept=%v err=%v", changed3, kept, err)
			}
			if got, want := decode(t, restored), decode(t, []byte(tc.orig)); !reflect.DeepEqual(got, want) {
				t.Errorf("restored:\n%s\nwant the meaning of:\n%s", restored, tc.orig)
			}
		})
	}
}

func TestMergeValuesKeptByteForByte(t *testing.T) {
	orig := `{"mtu": 1500.0, "big": 12345678901234567890, "note": "\u00e9 <&>", "opts": {"b": 1, "a": [1e3, -0.0]}}`
	out, _, _, err := Merge([]byte(orig), shimPath)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`1500.0`, `12345678901234567890`, `"\u00e9 <&>"`, `1e3`, `-0.0`, `"b": 1`} {
		if !strings.Contains(string(out), want) {
			t.Errorf("merged output lost %s:\n%s", want, out)
		}
	}
	if keys := topKeys(t, out); keys[3] != "opts" {
		t.Errorf("key order changed: %q", keys)
	}
}

func TestMergeAlreadyConfigured(t *testing.T) {
	for _, orig := range []string{
		`{"userland-proxy-path":"/usr/local/bin/envoy-docker-shim","iptables":false,"ip6tables":false}`,
		"{\n  \"debug\": true,\n  \"iptables\" :  false , \"userland-proxy-path\": \"/usr/local/bin/envoy-docker-shim\", \"userland-proxy\": true, \"ip6tables\":false}",
	} {
		out, prev, changed, err := Merge([]byte(orig), shimPath)
		if err != nil || changed || len(prev) != 0 || string(out) != orig {
			t.Errorf("Merge(%s) = %q, %v, %v, %v; want it unchanged", orig, out, prev, changed, err)
		}
		if ok, err := Configured([]byte(orig), shimPath); !ok || err != nil {
			t.Errorf("Configured(%s) = %v, %v", orig, ok, err)
		}
	}
}

func TestMergeRejects(t *testing.T) {
	for _, tc := range []struct{ name, orig, wantErr string }{
		{"trailing comma", `{"debug": true,}`, "invalid JSON"},
		{"truncated", `{"debug": `, "invalid JSON"},
		{"comment", "{\n  // no comments in JSON\n  \"debug\": true\n}", "invalid JSON"},
		{"array", `[1, 2]`, "must be a JSON object"},
		{"string", `"iptables"`, "must be a JSON object"},
		{"null", `null`, "must be a JSON object"},
		{"number", `42`, "must be a JSON object"},
		{"two objects", `{"a": 1} {"b": 2}`, "after the top-level object"},
		{"garbage after", `{"a": 1} x`, "invalid JSON"},
		{"duplicate key", `{"iptables": true, "iptables": false}`, `"iptables" appears more than once`},
		{"byte order mark", "\ufeff{}", "invalid JSON"},
		{"bare key", `{debug: true}`, "invalid JSON"},
		{"too big", `{"a": "` + strings.Repeat("x", maxDaemonJSON) + `"}`, "more than"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, prev, changed, err := Merge([]byte(tc.orig), shimPath)
			if err == nil {
				t.Fatalf("Merge accepted %q: %s", tc.orig, out)
			}
			if !errors.Is(err, ErrDaemonJSON) || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("error %q, want ErrDaemonJSON mentioning %q", err, tc.wantErr)
			}
			if out != nil || prev != nil || changed {
				t.Errorf("a failed merge returned output: %q %v %v", out, prev, changed)
			}
		})
	}
}

func TestMergeRejectsBadShimPath(t *testing.T) {
	for _, p := range []string{"", "envoy-docker-shim", "/usr/local/bin/../bin/envoy-docker-shim", "/usr/local/bin/", "/a\nb"} {
		if _, _, _, err := Merge([]byte("{}"), p); err == nil {
			t.Errorf("Merge accepted shim path %q", p)
		}
	}
}

func TestRestoreLeavesUserChanges(t *testing.T) {
	orig := `{"iptables": true, "debug": true}`
	merged, prev, _, err := Merge([]byte(orig), shimPath)
	if err != nil {
		t.Fatal(err)
	}
	// After the install, the user turns iptables back on and drops the proxy path by hand.
	doc, _ := parseDocument(merged)
	doc = doc.set(KeyIPTables, json.RawMessage("true")).remove(KeyProxyPath)
	edited := doc.encode()

	out, kept, changed, err := Restore(edited, shimPath, prev)
	if err != nil {
		t.Fatal(err)
	}
	// Only ip6tables, which the user left as the installer set it, goes back (it was absent).
	if want := `{"iptables": true, "debug": true}`; !changed || !reflect.DeepEqual(decode(t, out), decode(t, []byte(want))) {
		t.Errorf("Restore of a file whose iptables and path the user had changed: changed=%v\n%s\nwant the meaning of %s", changed, out, want)
	}
	if !reflect.DeepEqual(kept, []string{KeyIPTables}) {
		t.Errorf("kept = %q, want [iptables] (the path was absent before and is absent now)", kept)
	}
}

func TestRestoreRejectsForeignState(t *testing.T) {
	_, _, _, err := Restore([]byte(`{"debug": true}`), shimPath, []Previous{{Key: "debug", Present: true, Value: json.RawMessage("false")}})
	if err == nil {
		t.Fatal("Restore accepted a record naming a key the installer never changes")
	}
}

func TestLiveRestoreAndProxyPath(t *testing.T) {
	if !LiveRestore([]byte(`{"live-restore": true}`)) || LiveRestore([]byte(`{"live-restore": "true"}`)) || LiveRestore(nil) || LiveRestore([]byte(`{`)) {
		t.Error("LiveRestore misreads its input")
	}
	if p, ok := ProxyPath([]byte(`{"userland-proxy-path": "/x"}`)); !ok || p != "/x" {
		t.Errorf("ProxyPath = %q, %v", p, ok)
	}
	if _, ok := ProxyPath([]byte(`{"userland-proxy-path": 3}`)); ok {
		t.Error("ProxyPath took a number for a path")
	}
}
