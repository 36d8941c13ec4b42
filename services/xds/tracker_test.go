package xds

import (
	"context"
	"errors"
	"testing"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/genproto/googleapis/rpc/status"

	"github.com/envoy-docker-shim/envoy-docker-shim/services/registry"
)

func exp(typeURL, name, version string) registry.Expected {
	return registry.Expected{TypeURL: typeURL, Name: name, Version: version}
}

func newTestTracker() *Tracker { return NewTracker(NewMetrics(nil)) }

func deltaResponse(nonce, typeURL string, versions map[string]string, removed ...string) *discovery.DeltaDiscoveryResponse {
	r := &discovery.DeltaDiscoveryResponse{Nonce: nonce, TypeUrl: typeURL, RemovedResources: removed}
	for name, v := range versions {
		r.Resources = append(r.Resources, &discovery.Resource{Name: name, Version: v})
	}
	return r
}

func waitNow(t *Tracker, wants []registry.Expected) error {
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	return t.Wait(ctx, wants)
}

func TestTrackerDeltaAckAndNack(t *testing.T) {
	tr := newTestTracker()
	cb := tr.Callbacks()
	a := exp(resource.ListenerType, "tcp_127.0.0.1_80", "v1")
	b := exp(resource.ListenerType, "tcp_127.0.0.1_81", "v1")

	if err := waitNow(tr, []registry.Expected{a}); !errors.Is(err, ErrEnvoyNotConnected) {
		t.Fatalf("no stream: Wait = %v, want ErrEnvoyNotConnected", err)
	}
	_ = cb.OnDeltaStreamOpen(context.Background(), 1, "")
	cb.OnStreamDeltaResponse(1, nil, deltaResponse("1", resource.ListenerType, map[string]string{a.Name: "v1", b.Name: "v1"}))
	if err := waitNow(tr, []registry.Expected{a}); err == nil || errors.Is(err, ErrEnvoyNotConnected) {
		t.Fatalf("before the ACK: Wait = %v, want a timeout", err)
	}

	// Envoy names the listener it could not add; the other one in the same response was applied.
	_ = cb.OnStreamDeltaRequest(1, &discovery.DeltaDiscoveryRequest{TypeUrl: resource.ListenerType, ResponseNonce: "1", ErrorDetail: &status.Status{
		Message: "Error adding/updating listener(s) tcp_127.0.0.1_81: cannot bind '127.0.0.1:81': Address already in use\n",
	}})
	if err := waitNow(tr, []registry.Expected{a}); err != nil {
		t.Fatalf("unblamed resource of a NACKed response: Wait = %v, want nil", err)
	}
	var rejected *RejectedError
	if err := waitNow(tr, []registry.Expected{b}); !errors.As(err, &rejected) || rejected.Reason != "cannot bind '127.0.0.1:81': Address already in use" {
		t.Fatalf("blamed resource: Wait = %v", err)
	}
	if !tr.Connected() {
		t.Fatal("a stream that acknowledged is not reported connected")
	}

	// A new version of the rejected listener is judged on its own acknowledgement.
	b2 := exp(b.TypeURL, b.Name, "v2")
	cb.OnStreamDeltaResponse(1, nil, deltaResponse("2", resource.ListenerType, map[string]string{b.Name: "v2"}))
	_ = cb.OnStreamDeltaRequest(1, &discovery.DeltaDiscoveryRequest{TypeUrl: resource.ListenerType, ResponseNonce: "2"})
	if err := waitNow(tr, []registry.Expected{b2}); err != nil {
		t.Fatalf("ACKed new version: Wait = %v", err)
	}
	if err := waitNow(tr, []registry.Expected{b}); err == nil {
		t.Fatal("an acknowledgement of v2 satisfied a wait for v1")
	}

	// A removal forgets the acknowledgement; a closed stream forgets everything.
	cb.OnStreamDeltaResponse(1, nil, deltaResponse("3", resource.ListenerType, nil, a.Name))
	_ = cb.OnStreamDeltaRequest(1, &discovery.DeltaDiscoveryRequest{TypeUrl: resource.ListenerType, ResponseNonce: "3"})
	if err := waitNow(tr, []registry.Expected{a}); err == nil {
		t.Fatal("a removed resource still counts as served")
	}
	cb.OnDeltaStreamClosed(1, nil)
	if err := waitNow(tr, []registry.Expected{b2}); !errors.Is(err, ErrEnvoyNotConnected) {
		t.Fatalf("after the stream closed: Wait = %v, want ErrEnvoyNotConnected", err)
	}
}

func TestTrackerUnattributedNackRejectsWholeResponse(t *testing.T) {
	tr := newTestTracker()
	cb := tr.Callbacks()
	_ = cb.OnDeltaStreamOpen(context.Background(), 7, "")
	cb.OnStreamDeltaResponse(7, nil, deltaResponse("1", resource.ClusterType, map[string]string{"c1": "x"}))
	_ = cb.OnStreamDeltaRequest(7, &discovery.DeltaDiscoveryRequest{ResponseNonce: "1", ErrorDetail: &status.Status{Message: "something odd"}})
	var rejected *RejectedError
	if err := waitNow(tr, []registry.Expected{exp(resource.ClusterType, "c1", "x")}); !errors.As(err, &rejected) || rejected.Reason != "something odd" {
		t.Fatalf("Wait = %v, want the whole response rejected", err)
	}
}

// TestTrackerRefusesStateOfTheWorld: the server speaks delta xDS only, and says so to an Envoy
// configured otherwise, instead of serving it silently wrong.
func TestTrackerRefusesStateOfTheWorld(t *testing.T) {
	tr := newTestTracker()
	if err := tr.Callbacks().OnStreamOpen(context.Background(), 3, resource.ListenerType); !errors.Is(err, ErrStateOfTheWorld) {
		t.Fatalf("OnStreamOpen = %v, want ErrStateOfTheWorld", err)
	}
}

// TestTrackerWakesWaiter: a waiter blocked before the ACK is released by it, not by polling.
func TestTrackerWakesWaiter(t *testing.T) {
	tr := newTestTracker()
	cb := tr.Callbacks()
	_ = cb.OnDeltaStreamOpen(context.Background(), 1, "")
	w := exp(resource.ClusterType, "c", "v")
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		done <- tr.Wait(ctx, []registry.Expected{w})
	}()
	time.Sleep(20 * time.Millisecond)
	cb.OnStreamDeltaResponse(1, nil, deltaResponse("1", resource.ClusterType, map[string]string{"c": "v"}))
	_ = cb.OnStreamDeltaRequest(1, &discovery.DeltaDiscoveryRequest{ResponseNonce: "1"})
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(time.Second):
		t.Fatal("waiter not woken by the ACK")
	}
}

// TestTrackerIgnoresAnswersToSupersededResponses: a port closed and re-opened with the same
// content must wait for Envoy's answer to the re-opening, not count an older ACK.
func TestTrackerIgnoresAnswersToSupersededResponses(t *testing.T) {
	tr := newTestTracker()
	cb := tr.Callbacks()
	_ = cb.OnDeltaStreamOpen(context.Background(), 1, "")
	x := exp(resource.ListenerType, "x", "v")
	cb.OnStreamDeltaResponse(1, nil, deltaResponse("1", x.TypeURL, map[string]string{"x": "v"}))
	cb.OnStreamDeltaResponse(1, nil, deltaResponse("2", x.TypeURL, nil, "x"))
	cb.OnStreamDeltaResponse(1, nil, deltaResponse("3", x.TypeURL, map[string]string{"x": "v"}))
	_ = cb.OnStreamDeltaRequest(1, &discovery.DeltaDiscoveryRequest{ResponseNonce: "1"})
	if err := waitNow(tr, []registry.Expected{x}); err == nil {
		t.Fatal("the ACK of a superseded response satisfied the wait")
	}
	_ = cb.OnStreamDeltaRequest(1, &discovery.DeltaDiscoveryRequest{ResponseNonce: "2"})
	_ = cb.OnStreamDeltaRequest(1, &discovery.DeltaDiscoveryRequest{ResponseNonce: "3"})
	if err := waitNow(tr, []registry.Expected{x}); err != nil {
		t.Fatalf("after the ACK of the latest response: %v", err)
	}
}

// TestTrackerInvalidate: once the cache changes a resource in a way that will be sent, an earlier
// answer about it — ACK or NACK — no longer counts until Envoy answers the new response; a change
// that cancels out (removed and re-added before anything was sent) sends nothing and waits for nothing.
func TestTrackerInvalidate(t *testing.T) {
	tr := newTestTracker()
	cb := tr.Callbacks()
	_ = cb.OnDeltaStreamOpen(context.Background(), 1, "")
	x := exp(resource.ListenerType, "x", "v")
	tr.Invalidate(x.TypeURL, "x", "v")
	cb.OnStreamDeltaResponse(1, nil, deltaResponse("1", x.TypeURL, map[string]string{"x": "v"}))
	_ = cb.OnStreamDeltaRequest(1, &discovery.DeltaDiscoveryRequest{ResponseNonce: "1", ErrorDetail: &status.Status{Message: "x: cannot bind"}})
	var rejected *RejectedError
	if err := waitNow(tr, []registry.Expected{x}); !errors.As(err, &rejected) {
		t.Fatalf("Wait = %v, want the rejection", err)
	}

	// Released after the rejection, then claimed again with the same content.
	tr.Invalidate(x.TypeURL, "x", "")
	if err := waitNow(tr, []registry.Expected{x}); errors.As(err, &rejected) || err == nil {
		t.Fatalf("after the release: Wait = %v, want a timeout", err)
	}
	cb.OnStreamDeltaResponse(1, nil, deltaResponse("2", x.TypeURL, nil, "x"))
	_ = cb.OnStreamDeltaRequest(1, &discovery.DeltaDiscoveryRequest{ResponseNonce: "2"})
	tr.Invalidate(x.TypeURL, "x", "v")
	if err := waitNow(tr, []registry.Expected{x}); err == nil {
		t.Fatal("claimed again: ready before the new content was sent")
	}
	cb.OnStreamDeltaResponse(1, nil, deltaResponse("3", x.TypeURL, map[string]string{"x": "v"}))
	_ = cb.OnStreamDeltaRequest(1, &discovery.DeltaDiscoveryRequest{ResponseNonce: "3"})
	if err := waitNow(tr, []registry.Expected{x}); err != nil {
		t.Fatalf("after the new ACK: %v", err)
	}

	// Removed and re-added before go-control-plane sent anything: nothing will be sent.
	tr.Invalidate(x.TypeURL, "x", "")
	tr.Invalidate(x.TypeURL, "x", "v")
	if err := waitNow(tr, []registry.Expected{x}); err != nil {
		t.Fatalf("a change that cancelled out: %v", err)
	}
}

// TestTrackerInitialVersions: an Envoy reconnecting to a restarted server says what it holds;
// unchanged resources are never sent again, so that statement is their acknowledgement.
func TestTrackerInitialVersions(t *testing.T) {
	tr := newTestTracker()
	cb := tr.Callbacks()
	_ = cb.OnDeltaStreamOpen(context.Background(), 1, "")
	_ = cb.OnStreamDeltaRequest(1, &discovery.DeltaDiscoveryRequest{TypeUrl: resource.ListenerType, InitialResourceVersions: map[string]string{"x": "v"}})
	if err := waitNow(tr, []registry.Expected{exp(resource.ListenerType, "x", "v")}); err != nil {
		t.Fatalf("resource Envoy already holds: %v", err)
	}
	if err := waitNow(tr, []registry.Expected{exp(resource.ListenerType, "x", "w")}); err == nil {
		t.Fatal("another version counted as held")
	}
}

// TestTrackerReconnectAfterClaim is the restart race CI met: the restarted server's registry
// takes a shim's registration after Envoy's new stream opened but before Envoy said what it holds.
// The cache's version equals what Envoy holds, so go-control-plane never sends it, and Envoy's
// statement is the only acknowledgement the registration will get.
func TestTrackerReconnectAfterClaim(t *testing.T) {
	for _, tc := range []struct {
		name      string
		held      string // what Envoy says it holds
		wantReady bool
	}{
		{"same content", "v", true},
		{"other content: wait for the push", "old", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tr := newTestTracker()
			cb := tr.Callbacks()
			x := exp(resource.ListenerType, "x", "v")
			_ = cb.OnDeltaStreamOpen(context.Background(), 1, "")
			tr.Invalidate(x.TypeURL, x.Name, x.Version)
			_ = cb.OnStreamDeltaRequest(1, &discovery.DeltaDiscoveryRequest{TypeUrl: x.TypeURL, InitialResourceVersions: map[string]string{"x": tc.held}})
			err := waitNow(tr, []registry.Expected{x})
			if tc.wantReady && err != nil {
				t.Fatalf("Wait = %v, want ready at once", err)
			}
			if !tc.wantReady {
				if err == nil {
					t.Fatal("ready before the new content was pushed")
				}
				cb.OnStreamDeltaResponse(1, nil, deltaResponse("1", x.TypeURL, map[string]string{"x": "v"}))
				_ = cb.OnStreamDeltaRequest(1, &discovery.DeltaDiscoveryRequest{ResponseNonce: "1"})
				if err := waitNow(tr, []registry.Expected{x}); err != nil {
					t.Fatalf("after the push was acknowledged: %v", err)
				}
			}
		})
	}
}

// TestTrackerResponseOvertakenByChange: a response that carried an older version than the cache
// now holds leaves the resource changing, whatever order the callbacks ran in.
func TestTrackerResponseOvertakenByChange(t *testing.T) {
	tr := newTestTracker()
	cb := tr.Callbacks()
	_ = cb.OnDeltaStreamOpen(context.Background(), 1, "")
	tr.Invalidate(resource.ListenerType, "x", "v1")
	tr.Invalidate(resource.ListenerType, "x", "v2")
	cb.OnStreamDeltaResponse(1, nil, deltaResponse("1", resource.ListenerType, map[string]string{"x": "v1"}))
	_ = cb.OnStreamDeltaRequest(1, &discovery.DeltaDiscoveryRequest{ResponseNonce: "1"})
	if err := waitNow(tr, []registry.Expected{exp(resource.ListenerType, "x", "v1")}); err == nil {
		t.Fatal("v1 counted as settled while the cache holds v2")
	}
}

// Envoy's detail for a listener that fails proto validation spans lines and carries protobuf's
// debug marker: the reason is the whole message, on one line, without the marker.
func TestReasonFor(t *testing.T) {
	detail := "Error adding/updating listener(s) tcp_127.0.0.1_80: goo.gle/debugonly \n: Proto constraint validation failed (Literal: value length must be at least 1 characters)\n" +
		"tcp_127.0.0.1_81: cannot bind '127.0.0.1:81': Address already in use\n"
	for _, tc := range []struct{ name, want string }{
		{"tcp_127.0.0.1_80", "Proto constraint validation failed (Literal: value length must be at least 1 characters)"},
		{"tcp_127.0.0.1_81", "cannot bind '127.0.0.1:81': Address already in use"},
	} {
		if got, ok := reasonFor(detail, tc.name); !ok || got != tc.want {
			t.Errorf("reasonFor(%s) = %q, %v; want %q", tc.name, got, ok, tc.want)
		}
	}
	if _, ok := reasonFor(detail, "tcp_127.0.0.1_82"); ok {
		t.Error("a resource the detail does not name was blamed")
	}
}
