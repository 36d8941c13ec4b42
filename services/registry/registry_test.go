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

func (r *recorder) Upsert(e Entry) error {
	if r.fail != nil {
		return r.fail
	}
	r.events = append(r.events, "upsert "+e.Key.String())
	return nil
}
func (r *recorder) Delete(e Entry) { r.events = append(r.events, "delete "+e.Key.String()) }

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
		if err := r.Claim(e); err != nil {
			t.Fatal(err)
		}
	}
	if r.Release(ea.Key, b) {
		t.Fatal("a non-owner released an entry")
	}
	if !r.Release(ea.Key, a) {
		t.Fatal("the owner could not release its entry")
	}
	want := []string{"upsert 127.0.0.1:8080/tcp", "upsert [::]:8080/tcp", "delete 127.0.0.1:8080/tcp"}
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
	if err := r.Claim(e); err != nil {
		t.Fatal(err)
	}

	other := e
	other.Owner = second
	other.ContainerIP = netip.MustParseAddr("172.17.0.3")
	other.ContainerID = "c2"
	var conflict *ConflictError
	if err := r.Claim(other); !errors.As(err, &conflict) || !strings.Contains(err.Error(), "already published") {
		t.Fatalf("Claim of a held host port for another container = %v, want a ConflictError", err)
	}

	// The same mapping from a reconnected shim takes the entry over; the old stream's end no longer removes it.
	again := e
	again.Owner = second
	if err := r.Claim(again); err != nil {
		t.Fatalf("takeover: %v", err)
	}
	if r.Release(e.Key, first) {
		t.Fatal("the previous owner released an entry taken over by a reconnected shim")
	}
	if got, _ := r.Get(e.Key); got.Owner != second {
		t.Fatalf("owner = %d, want %d", got.Owner, second)
	}
}

func TestClaimRollsBackWhenObserverFails(t *testing.T) {
	r := New(&recorder{fail: errors.New("boom")})
	if err := r.Claim(Entry{Mapping: tcpMapping("127.0.0.1", 1, "10.0.0.1"), Owner: r.NewOwner()}); err == nil {
		t.Fatal("Claim succeeded although the observer failed")
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
		if err := r.Claim(e); err != nil {
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
