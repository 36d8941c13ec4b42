package installer

import (
	"bytes"
	"encoding/json"
	"errors"
	"reflect"
	"testing"
)

// FuzzMerge feeds outside input (any daemon.json a host may have) to Merge and Restore. Whatever
// the input: no panic; a rejected file is an ErrDaemonJSON with no output; an accepted one gives
// valid JSON that configures the shim, keeps every other key with its value, merges again to
// itself, and restores to the original's meaning.
//
//	go test -fuzz FuzzMerge ./shim/installer/
func FuzzMerge(f *testing.F) {
	for _, seed := range []string{
		``, `{}`, ` `, `null`, `[]`, `{"iptables": true}`, `{"iptables": null}`,
		`{"userland-proxy": false, "userland-proxy-path": "/x"}`,
		`{"log-opts": {"max-size": "10m"}, "default-address-pools": [{"base": "10.10.0.0/16", "size": 24}]}`,
		`{"a": 1, "a": 2}`, `{"a": 1,}`, `{"a": "\u00e9\ud800"}`, `{"n": 1e400}`, "{\"a\":\"\xff\"}",
		`{"userland-proxy-path": "/usr/local/bin/envoy-docker-shim", "iptables": false}`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, orig []byte) {
		out, prev, changed, err := Merge(orig, shimPath)
		if err != nil {
			if !errors.Is(err, ErrDaemonJSON) {
				t.Fatalf("error is not ErrDaemonJSON: %v", err)
			}
			if out != nil || prev != nil || changed {
				t.Fatal("a rejected file produced output")
			}
			return
		}
		if !json.Valid(out) {
			t.Fatalf("invalid JSON out of %q:\n%s", orig, out)
		}
		if !changed {
			if !bytes.Equal(out, orig) || len(prev) != 0 {
				t.Fatal("unchanged merge did not return its input")
			}
		}
		if ok, err := Configured(out, shimPath); !ok || err != nil {
			t.Fatalf("merged file does not configure the shim (%v):\n%s", err, out)
		}

		before, after := members(t, orig), members(t, out)
		for k, v := range before {
			if k == KeyProxyPath || k == KeyIPTables || k == KeyIP6Tables || k == KeyUserlandProx {
				continue
			}
			if !bytes.Equal(compactRaw(after[k]), compactRaw(v)) {
				t.Fatalf("key %q changed from %s to %s", k, v, after[k])
			}
		}
		for k := range after {
			if _, ok := before[k]; !ok && k != KeyProxyPath && k != KeyIPTables && k != KeyIP6Tables {
				t.Fatalf("key %q appeared", k)
			}
		}

		again, _, changed2, err := Merge(out, shimPath)
		if err != nil || changed2 || !bytes.Equal(again, out) {
			t.Fatalf("second merge not idempotent: changed=%v err=%v", changed2, err)
		}

		restored, kept, _, err := Restore(out, shimPath, prev)
		if err != nil || len(kept) != 0 {
			t.Fatalf("restore: kept=%v err=%v", kept, err)
		}
		if got, want := members(t, restored), members(t, orig); !sameMembers(got, want) {
			t.Fatalf("restore did not bring back the original:\norig %q\ngot  %s", orig, restored)
		}
	})
}

// members maps each top-level key to its value, as written.
func members(t *testing.T, b []byte) map[string]json.RawMessage {
	t.Helper()
	doc, err := parseDocument(b)
	if err != nil {
		t.Fatalf("re-parsing %q: %v", b, err)
	}
	m := map[string]json.RawMessage{}
	for _, e := range doc {
		m[e.key] = e.value
	}
	return m
}

func sameMembers(a, b map[string]json.RawMessage) bool {
	if len(a) != len(b) {
		return false
	}
	ca, cb := map[string]string{}, map[string]string{}
	for k, v := range a {
		ca[k] = string(compactRaw(v))
	}
	for k, v := range b {
		cb[k] = string(compactRaw(v))
	}
	return reflect.DeepEqual(ca, cb)
}

func compactRaw(raw json.RawMessage) []byte {
	var b bytes.Buffer
	if err := json.Compact(&b, raw); err != nil {
		return raw
	}
	return b.Bytes()
}
