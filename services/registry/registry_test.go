package registry

import (
	"errors"
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"github.com/envoy-docker-shim/envoy-docker-shim/internal/mapping"
)

type recorder struct {
	events []string
	fail   error
}

// recorder publishes every entry as one resource named after its key.
func (r *recorder) Publish(e Entry) ([]Expected, error) {
	if r.fail != nil {
		return nil, r.fail
	}
	r.events = append(r.events, "publish "+e.Key.String())
	return []Expected{{TypeURL: "t", Name: e.Key.String(), Version: "v"}}, nil
}

func (r *recorder) Withdraw(e Entry) []Expected {
	r.events = append(r.events, "withdraw "+e.Key.String())
	return []Expected{{TypeURL: "t", Name: e.Key.String()}}
}

func tcpMapping(hostIP string, hostPort uint16, containerIP string) mapping.Mapping {
	return mapping.Mapping{
		Key:           mapping.Key{Proto: mapping.TCP, HostIP: netip.MustParseAddr(hostIP), HostPort: hostPort},
		ContainerIP:   netip.MustParseAddr(containerIP),
		ContainerPort: 80,
	}
}

func TestClaimReleaseNotifiesInOrder(t *testing.T) {
	rec := &recorder{}
	r := New(rec)
	a, b := r.NewOwner(), r.NewOwner()
	ea := Entry{Mapping: tcpMapping("127.0.0.1", 8080, "172.17.0.2"), Owner: a}
	eb := Entry{Mapping: tcpMapping("::", 8080, "172.17.0.2"), Owner: b}
	for _, e := range []Entry{ea, eb} {
		expected, err := r.Claim(e)
		if err != nil {
			t.Fatal(err)
		}
		if want := []Expected{{TypeURL: "t", Name: e.Key.String(), Version: "v"}}; !reflect.DeepEqual(expected, want) {
			t.Fatalf("Claim returned %v, want what the publisher said: %v", expected, want)
		}
	}
	if _, ok := r.Release(ea.Key, b); ok {
		t.Fatal("a non-owner released an entry")
	}
	withdrawn, ok := r.Release(ea.Key, a)
	if !ok {
		t.Fatal("the owner could not release its entry")
	}
	if want := []Expected{{TypeURL: "t", Name: ea.Key.String()}}; !reflect.DeepEqual(withdrawn, want) {
		t.Fatalf("Release returned %v, want %v", withdrawn, want)
	}
	want := []string{"publish 127.0.0.1:8080/tcp", "publish [::]:8080/tcp", "withdraw 127.0.0.1:8080/tcp"}
	if !reflect.DeepEqual(rec.events, want) {
		t.Fatalf("events %v, want %v", rec.events, want)
	}
	if got := r.List(); len(got) != 1 || got[0].Key != eb.Key {
		t.Fatalf("List = %+v", got)
	}
}

func TestClaimConflictAndTakeover(t *testing.T) {
	r := New(nil)
	first, second := r.NewOwner(), r.NewOwner()
	e := Entry{Mapping: tcpMapping("0.0.0.0", 80, "172.17.0.2"), Service: Service{ContainerID: "c1"}, Shim: Shim{PID: 10}, Owner: first}
	if _, err := r.Claim(e); err != nil {
		t.Fatal(err)
	}

	other := e
	other.Owner = second
	other.ContainerIP = netip.MustParseAddr("172.17.0.3")
	other.ContainerID = "c2"
	var conflict *ConflictError
	if _, err := r.Claim(other); !errors.As(err, &conflict) || !strings.Contains(err.Error(), "already published") {
		t.Fatalf("Claim of a held host port for another container = %v, want a ConflictError", err)
	}

	// The same mapping from a reconnected shim takes the entry over; the old stream's end no longer removes it.
	again := e
	again.Owner = second
	if _, err := r.Claim(again); err != nil {
		t.Fatalf("takeover: %v", err)
	}
	if _, ok := r.Release(e.Key, first); ok {
		t.Fatal("the previous owner released an entry taken over by a reconnected shim")
	}
	if got, _ := r.Get(e.Key); got.Owner != second {
		t.Fatalf("owner = %d, want %d", got.Owner, second)
	}
}

func TestClaimRollsBackWhenPublishFails(t *testing.T) {
	r := New(&recorder{fail: errors.New("boom")})
	if _, err := r.Claim(Entry{Mapping: tcpMapping("127.0.0.1", 1, "10.0.0.1"), Owner: r.NewOwner()}); err == nil {
		t.Fatal("Claim succeeded although publishing failed")
	}
	if r.Len() != 0 {
		t.Fatal("a failed claim left an entry")
	}
}

func TestRemoveContainer(t *testing.T) {
	rec := &recorder{}
	r := New(rec)
	for i, c := range []string{"c1", "c2", "c1"} {
		e := Entry{Mapping: tcpMapping("127.0.0.1", uint16(8000+i), "10.0.0.1"), Service: Service{ContainerID: c}, Owner: r.NewOwner()}
		if _, err := r.Claim(e); err != nil {
			t.Fatal(err)
		}
	}
	removed := r.RemoveContainer("c1")
	if len(removed) != 2 || removed[0].HostPort != 8000 || removed[1].HostPort != 8002 {
		t.Fatalf("removed %+v", removed)
	}
	if r.Len() != 1 {
		t.Fatalf("left %d entries, want 1", r.Len())
	}
}

// A container's entries whose shims still hold their registrations are left to the shims'
// deregistration: dockerd stops those shims as it removes the container.
func TestRemoveContainerLeavesHeldEntries(t *testing.T) {
	r := New(nil)
	held, restored := r.NewOwner(), r.NewOwner()
	r.Hold(held)
	for _, e := range []Entry{
		{Mapping: tcpMapping("127.0.0.1", 8080, "172.17.0.2"), Service: Service{ContainerID: "c1"}, Owner: held},
		{Mapping: tcpMapping("127.0.0.1", 8081, "172.17.0.2"), Service: Service{ContainerID: "c1"}, Owner: restored},
	} {
		if _, err := r.Claim(e); err != nil {
			t.Fatal(err)
		}
	}
	removed := r.RemoveContainer("c1")
	if len(removed) != 1 || removed[0].HostPort != 8081 {
		t.Fatalf("removed %+v, want only the entry no shim holds (8081)", removed)
	}
	r.Unhold(held)
	if removed := r.RemoveContainer("c1"); len(removed) != 1 || removed[0].HostPort != 8080 {
		t.Fatalf("after its shim let go: removed %+v, want 8080", removed)
	}
}
