package main

import "testing"

func TestParseTotalConnections(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int
		ok   bool
	}{
		{"server.total_connections: 3\n", 3, true},
		{"cluster.x.y: 1\nserver.total_connections: 0\n", 0, true},
		{"", 0, false},
		{"server.total_connections: many\n", 0, false},
	} {
		got, err := parseTotalConnections(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("parseTotalConnections(%q) = %d, %v", tc.in, got, err)
		}
	}
}
