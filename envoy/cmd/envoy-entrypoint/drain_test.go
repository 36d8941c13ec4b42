package main

import "testing"

func TestParseActiveConnections(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		want     int
		ok       bool
	}{
		{"listeners summed, admin and per-thread counts left out", `http.admin.downstream_cx_active: 1
http.ui.downstream_cx_active: 2
listener.127.0.0.1_28992.downstream_cx_active: 2
listener.127.0.0.1_28992.worker_0.downstream_cx_active: 0
listener.127.0.0.1_28992.worker_1.downstream_cx_active: 2
listener.[__1]_8080.downstream_cx_active: 3
listener.admin.downstream_cx_active: 1
listener.admin.main_thread.downstream_cx_active: 1
`, 5, true},
		{"no listener", "", 0, true},
		{"not a number", "listener.127.0.0.1_80.downstream_cx_active: many\n", 0, false},
	} {
		got, err := parseActiveConnections(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("%s: parseActiveConnections = %d, %v; want %d", tc.name, got, err, tc.want)
		}
	}
}
