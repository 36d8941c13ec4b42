package resync

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	pb "github.com/envoy-docker-shim/envoy-docker-shim/services/registration/registrationpb"
)

func fakeProc(t *testing.T, procs map[string]string) string {
	t.Helper()
	root := t.TempDir()
	for pid, cmdline := range procs {
		dir := filepath.Join(root, pid)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "cmdline"), []byte(cmdline), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// Not processes: must be ignored.
	_ = os.MkdirAll(filepath.Join(root, "self"), 0o755)
	_ = os.WriteFile(filepath.Join(root, "uptime"), []byte("1 1"), 0o644)
	return root
}

func argv(args ...string) string { return strings.Join(args, "\x00") + "\x00" }

func TestFindShimsAndRequest(t *testing.T) {
	root := fakeProc(t, map[string]string{
		"10":  argv("/usr/local/bin/envoy-docker-shim", "-proto", "tcp", "-host-ip", "0.0.0.0", "-host-port", "8080", "-container-ip", "172.17.0.2", "-container-port", "80"),
		"11":  argv("/usr/local/bin/envoy-docker-shim", "-proto", "udp", "-host-ip", "::", "-host-port", "53", "-container-ip", "172.17.0.3", "-container-port", "53", "-use-listen-fd"),
		"12":  argv("/usr/sbin/docker-proxy", "-proto", "tcp", "-host-ip", "0.0.0.0", "-host-port", "9", "-container-ip", "172.17.0.4", "-container-port", "9"),
		"13":  argv("envoy-docker-shim", "-proto", "tcp", "-host-port", "nope"),
		"14":  "",
		"200": argv("/usr/local/bin/envoy-docker-shim", "-version"),
	})
	shims, err := FindShims(root, "envoy-docker-shim")
	if err != nil {
		t.Fatal(err)
	}
	var pids []int
	for _, s := range shims {
		pids = append(pids, s.PID)
	}
	if len(pids) != 4 || pids[0] != 10 || pids[1] != 11 || pids[2] != 13 || pids[3] != 200 {
		t.Fatalf("found pids %v, want [10 11 13 200]", pids)
	}
	req, skipped := Request(shims)
	if len(req.GetShims()) != 2 || len(skipped) != 2 {
		t.Fatalf("request %v, skipped %v", req, skipped)
	}
	tcp, udp := req.GetShims()[0], req.GetShims()[1]
	if tcp.GetMapping().GetProto() != pb.Protocol_PROTOCOL_TCP || tcp.GetMapping().GetHostPort() != 8080 || tcp.GetShim().GetPid() != 10 || tcp.GetShim().GetProxiesItself() {
		t.Errorf("tcp %v", tcp)
	}
	if udp.GetMapping().GetProto() != pb.Protocol_PROTOCOL_UDP || udp.GetMapping().GetHostIp() != "::" || !udp.GetShim().GetProxiesItself() {
		t.Errorf("udp %v", udp)
	}
}

func TestFindShimsMissingProc(t *testing.T) {
	if _, err := FindShims(filepath.Join(t.TempDir(), "nope"), "envoy-docker-shim"); err == nil {
		t.Fatal("no error for a missing process table")
	}
}
