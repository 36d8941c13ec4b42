package idle

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/envoy-docker-shim/envoy-docker-shim/internal/buildinfo"
	"github.com/envoy-docker-shim/envoy-docker-shim/internal/mapping"
	"github.com/envoy-docker-shim/envoy-docker-shim/internal/shimlink"
	"github.com/envoy-docker-shim/envoy-docker-shim/shim/shimtest"
)

// The fast start writes and reads the link's messages from its words, without package shimlink:
// the Open it composes must decode to the Open the shim in Go sends (with Serving and
// WantsServed), and what it looks for in the answer must be how shimlink spells a Ready.
func TestFastStartWords(t *testing.T) {
	for _, tc := range []struct{ host, container string }{
		{"127.0.0.1:8080", "172.17.0.2:80"},
		{"[::]:8080", "172.17.0.2:80"},
		{"[::1]:443", "[fd00::2]:8443"},
	} {
		host, container := netip.MustParseAddrPort(tc.host), netip.MustParseAddrPort(tc.container)
		composed := startOpen + tc.host + startContainer + tc.container + startPID + "4242" + startVersion + startDev + startServing
		got, err := shimlink.Decode([]byte(composed))
		want := &shimlink.Open{Mapping: mapping.Mapping{Key: mapping.Key{Proto: mapping.TCP, HostIP: host.Addr(), HostPort: host.Port()},
			ContainerIP: container.Addr(), ContainerPort: container.Port()}, PID: 4242, Version: "dev", Serving: true, WantsServed: true}
		if o, ok := got.(*shimlink.Open); err != nil || !ok || *o != *want {
			t.Errorf("the fast start's Open %q decodes to %+v, %v; want %+v", composed, got, err, want)
		}
	}
	if *versionRef != buildinfo.Version {
		t.Error("versionRef is not buildinfo.Version")
	}
	ready := string(shimlink.Encode(&shimlink.Ready{Service: "web", Mode: "http", ConnectRetryWindow: 1500 * time.Millisecond}))
	for _, pair := range []string{startReady, startRetry + "1500"} {
		if !strings.HasPrefix(ready, pair) && !strings.Contains(ready, "&"+pair) {
			t.Errorf("a Ready, %q, has no pair %q", ready, pair)
		}
	}
	if failed := string(shimlink.Encode(&shimlink.Failed{Reason: "x"})); strings.Contains(failed, startReady) {
		t.Errorf("a Failed, %q, holds %q", failed, startReady)
	}
	for got, want := range map[string]string{
		startStatusReady: "0\n", startStatusStopped: "1\n" + StoppedBeforeReady,
		startExe: "/proc/self/exe\x00", startMaxProcs: "GOMAXPROCS=1\x00",
		startResumeEnv: ResumeEnv + "=", startRetryEnv: RetryWindowEnv + "=", startStartedEnv: StartedEnv + "=",
		startSocketEnv: startEnvPrefix + "SOCKET=", startSocket: shimlink.DefaultSocket,
		startIPv6Any: netip.IPv6Unspecified().String(), startIPv6Loopback: netip.IPv6Loopback().String(),
	} {
		if got != want {
			t.Errorf("%q, want %q", got, want)
		}
	}
	// dockerd's argv, as shimtest.Args (and the contract) spell it: the flags where the fast start
	// looks for them.
	argv := append([]string{"envoy-docker-shim"}, shimtest.Args("tcp", netip.MustParseAddrPort("127.0.0.1:80"), netip.MustParseAddrPort("172.17.0.2:80"), true)...)
	if len(argv) != 12 {
		t.Fatalf("argv %q", argv)
	}
	for i, flag := range startFlags {
		if argv[startFlagAt[i]] != flag {
			t.Errorf("argv[%d] is %q, the fast start looks for %q", startFlagAt[i], argv[startFlagAt[i]], flag)
		}
	}
}
