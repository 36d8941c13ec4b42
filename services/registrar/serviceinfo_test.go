package registrar

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/envoy-docker-shim/envoy-docker-shim/internal/mapping"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/labels"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/registry"
)

// TestServiceInfo: eds_service_info joins each live service's stat name to its labels as written,
// its container and its image: one series per service and container, however many ports it
// publishes, and none once its registrations are gone.
func TestServiceInfo(t *testing.T) {
	r := registry.New(nil)
	ip := netip.MustParseAddr("172.17.0.2")
	unicode, err := labels.Describe(&labels.Container{ID: "c1", Name: "/web1", Image: "nginx:1.27", Labels: map[string]string{"ServiceName": "服务", "EnvironmentName": "prød"}}, ip)
	if err != nil {
		t.Fatal(err)
	}
	plain, err := labels.Describe(&labels.Container{ID: "c2", Name: "/db", Image: "postgres:17", Labels: map[string]string{"ServiceName": "pg", "ProxyMode": "tcp"}}, ip)
	if err != nil {
		t.Fatal(err)
	}
	claim := func(port uint16, proto mapping.Protocol, s registry.Service) registry.Owner {
		owner := r.NewOwner()
		m := mapping.Mapping{Key: mapping.Key{Proto: proto, HostIP: netip.MustParseAddr("0.0.0.0"), HostPort: port}, ContainerIP: ip, ContainerPort: 80}
		if _, err := r.Claim(registry.Entry{Mapping: m, Service: s, Owner: owner}); err != nil {
			t.Fatal(err)
		}
		return owner
	}
	claim(8080, mapping.TCP, unicode)
	claim(8080, mapping.UDP, unicode) // a second port of the same container
	dbOwner := claim(5432, mapping.TCP, plain)

	want := `# HELP eds_service_info Services with a published port: service is the name in Envoy's stats (http.<service>.*, cluster.<service>.*, tcp.<service>.*); service_name and environment are the container's ServiceName and EnvironmentName labels as written (cut at 256 bytes); container and image are the container's.
# TYPE eds_service_info gauge
eds_service_info{container="db",environment="",image="postgres:17",service="pg",service_name="pg"} 1
eds_service_info{container="web1",environment="prød",image="nginx:1.27",service="web1-pr_d-06fcdea5",service_name="服务"} 1
`
	info := newServiceInfo(r)
	if err := testutil.CollectAndCompare(info, strings.NewReader(want)); err != nil {
		t.Error(err)
	}
	r.Release(mapping.Key{Proto: mapping.TCP, HostIP: netip.MustParseAddr("0.0.0.0"), HostPort: 5432}, dbOwner)
	if n := testutil.CollectAndCount(info); n != 1 {
		t.Errorf("%d series after the db's port went, want 1", n)
	}
}

// TestResultsStartAtZero: both registration outcomes exist before the first registration.
func TestResultsStartAtZero(t *testing.T) {
	reg := prometheus.NewRegistry()
	NewMetrics(reg, registry.New(nil))
	want := `# HELP eds_registrations_total Registrations by outcome (ready, failed).
# TYPE eds_registrations_total counter
eds_registrations_total{result="failed"} 0
eds_registrations_total{result="ready"} 0
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "eds_registrations_total"); err != nil {
		t.Error(err)
	}
}
