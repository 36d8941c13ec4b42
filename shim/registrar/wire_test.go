package registrar

import (
	"net/netip"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	pb "github.com/envoy-docker-shim/envoy-docker-shim/services/registration/registrationpb"
	"github.com/envoy-docker-shim/envoy-docker-shim/shim/proxyargs"
)

// The hand-made encoding must be what the generated code reads, field for field.
func TestRequestsDecodeWithTheGeneratedCode(t *testing.T) {
	for _, tc := range []struct {
		name string
		open Open
		want *pb.Open
	}{
		{"tcp ipv4", Open{Mapping: proxyargs.Mapping{Proto: proxyargs.TCP, HostIP: netip.MustParseAddr("127.0.0.1"), HostPort: 8080, ContainerIP: netip.MustParseAddr("172.17.0.2"), ContainerPort: 80}, PID: 4242, Version: "v1.2.3 (abc)"},
			&pb.Open{Mapping: &pb.Mapping{Proto: pb.Protocol_PROTOCOL_TCP, HostIp: "127.0.0.1", HostPort: 8080, ContainerIp: "172.17.0.2", ContainerPort: 80}, Shim: &pb.Shim{Pid: 4242, Version: "v1.2.3 (abc)"}}},
		{"udp ipv6, proxies itself, top port", Open{Mapping: proxyargs.Mapping{Proto: proxyargs.UDP, HostIP: netip.MustParseAddr("::"), HostPort: 65535, ContainerIP: netip.MustParseAddr("fd00::2"), ContainerPort: 65535}, PID: 1, ProxiesItself: true},
			&pb.Open{Mapping: &pb.Mapping{Proto: pb.Protocol_PROTOCOL_UDP, HostIp: "::", HostPort: 65535, ContainerIp: "fd00::2", ContainerPort: 65535}, Shim: &pb.Shim{Pid: 1, ProxiesItself: true}}},
		{"re-registration of a serving port", Open{Mapping: proxyargs.Mapping{Proto: proxyargs.TCP, HostIP: netip.MustParseAddr("127.0.0.1"), HostPort: 8080, ContainerIP: netip.MustParseAddr("172.17.0.2"), ContainerPort: 80}, PID: 9, Serving: true},
			&pb.Open{Mapping: &pb.Mapping{Proto: pb.Protocol_PROTOCOL_TCP, HostIp: "127.0.0.1", HostPort: 8080, ContainerIp: "172.17.0.2", ContainerPort: 80}, Shim: &pb.Shim{Pid: 9, Serving: true}}},
		{"sctp, negative pid", Open{Mapping: proxyargs.Mapping{Proto: proxyargs.SCTP, HostIP: netip.MustParseAddr("0.0.0.0"), HostPort: 1, ContainerIP: netip.MustParseAddr("10.0.0.1"), ContainerPort: 1}, PID: -7},
			&pb.Open{Mapping: &pb.Mapping{Proto: pb.Protocol_PROTOCOL_SCTP, HostIp: "0.0.0.0", HostPort: 1, ContainerIp: "10.0.0.1", ContainerPort: 1}, Shim: &pb.Shim{Pid: -7}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got pb.RegisterRequest
			if err := proto.Unmarshal(marshalOpenRequest(tc.open), &got); err != nil {
				t.Fatal(err)
			}
			if want := (&pb.RegisterRequest{Request: &pb.RegisterRequest_Open{Open: tc.want}}); !proto.Equal(&got, want) {
				t.Errorf("got %v\nwant %v", &got, want)
			}
		})
	}
	var got pb.RegisterRequest
	if err := proto.Unmarshal(marshalLogRequest("WARN", "msg=\"ünïcode\" n=1"), &got); err != nil {
		t.Fatal(err)
	}
	if l := got.GetLog(); l.GetLevel() != "WARN" || l.GetMessage() != "msg=\"ünïcode\" n=1" {
		t.Errorf("log = %v", &got)
	}
}

func TestResponsesFromTheGeneratedCode(t *testing.T) {
	full := &pb.Registration{
		Mapping:     &pb.Mapping{Proto: pb.Protocol_PROTOCOL_TCP, HostIp: "127.0.0.1", HostPort: 8080, ContainerIp: "172.17.0.2", ContainerPort: 80},
		Shim:        &pb.Shim{Pid: 42, Version: "test", ProxiesItself: true},
		ContainerId: "0123abcd", ContainerName: "web-1", Service: "web-test", Mode: pb.Mode_MODE_HTTP,
		Listener: "tcp_127.0.0.1_8080", Cluster: "tcp_127.0.0.1_8080", ReadyUnixMs: 1_790_000_000_000,
	}
	for _, tc := range []struct {
		name string
		resp *pb.RegisterResponse
		want response
	}{
		{"ready, every field", &pb.RegisterResponse{Response: &pb.RegisterResponse_Ready{Ready: &pb.Ready{Registration: full}}},
			response{ready: &Registration{HostPort: 8080, PID: 42, ContainerID: "0123abcd", ContainerName: "web-1", Service: "web-test", Listener: "tcp_127.0.0.1_8080", Cluster: "tcp_127.0.0.1_8080"}}},
		{"ready, empty", &pb.RegisterResponse{Response: &pb.RegisterResponse_Ready{Ready: &pb.Ready{}}}, response{ready: &Registration{}}},
		{"failed", &pb.RegisterResponse{Response: &pb.RegisterResponse_Failed{Failed: &pb.Failed{Reason: "address already in use"}}},
			response{failed: &Failed{Reason: "address already in use"}}},
		{"failed, empty reason", &pb.RegisterResponse{Response: &pb.RegisterResponse_Failed{Failed: &pb.Failed{}}}, response{failed: &Failed{}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := proto.Marshal(tc.resp)
			if err != nil {
				t.Fatal(err)
			}
			got, err := unmarshalResponse(b)
			if err != nil {
				t.Fatal(err)
			}
			if (got.ready == nil) != (tc.want.ready == nil) || (got.failed == nil) != (tc.want.failed == nil) ||
				(got.ready != nil && *got.ready != *tc.want.ready) || (got.failed != nil && *got.failed != *tc.want.failed) {
				t.Errorf("got %+v / %+v, want %+v / %+v", got.ready, got.failed, tc.want.ready, tc.want.failed)
			}
		})
	}
}

func TestMalformedResponses(t *testing.T) {
	for _, b := range [][]byte{nil, {0x0a}, {0x0a, 0x05, 0x01}, {0x08}, {0x0b}, {0x00, 0x00}, {0x18, 0x01}} {
		if _, err := unmarshalResponse(b); err == nil || !strings.Contains(err.Error(), "malformed answer") {
			t.Errorf("%x: err = %v", b, err)
		}
	}
}

// FuzzResponse: any bytes from the server decode to an answer or a clear error, and whatever the
// generated code reads as Ready or Failed, so do we.
func FuzzResponse(f *testing.F) {
	for _, r := range []*pb.RegisterResponse{
		{Response: &pb.RegisterResponse_Ready{Ready: &pb.Ready{Registration: &pb.Registration{Service: "web-test", Mapping: &pb.Mapping{HostPort: 80}}}}},
		{Response: &pb.RegisterResponse_Failed{Failed: &pb.Failed{Reason: "no"}}},
	} {
		b, _ := proto.Marshal(r)
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		got, err := unmarshalResponse(b)
		var want pb.RegisterResponse
		if proto.Unmarshal(b, &want) != nil {
			return // the generated code refuses it too; ours may or may not, but must not panic
		}
		switch {
		case want.GetReady() != nil:
			if err != nil || got.ready == nil || got.ready.Service != want.GetReady().GetRegistration().GetService() ||
				got.ready.HostPort != want.GetReady().GetRegistration().GetMapping().GetHostPort() {
				t.Fatalf("generated code reads Ready %v; ours: %+v, %v", want.GetReady(), got.ready, err)
			}
		case want.GetFailed() != nil:
			if err != nil || got.failed == nil || got.failed.Reason != want.GetFailed().GetReason() {
				t.Fatalf("generated code reads Failed %v; ours: %+v, %v", want.GetFailed(), got.failed, err)
			}
		default:
			if err == nil {
				t.Fatalf("generated code reads no answer; ours: %+v", got)
			}
		}
	})
}
