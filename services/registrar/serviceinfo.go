package registrar

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/envoy-docker-shim/envoy-docker-shim/services/registry"
)

// serviceInfo exports eds_service_info: one series of value 1 per service and container with a
// live registration, joining the name Envoy's stats use (service) to what the container's labels
// said as written (service_name, environment), its name and its image, which stat names cannot
// carry. Read from the registry at every scrape, so it never outlives a registration.
type serviceInfo struct {
	registry *registry.Registry
	desc     *prometheus.Desc
}

func newServiceInfo(r *registry.Registry) *serviceInfo {
	return &serviceInfo{registry: r, desc: prometheus.NewDesc("eds_service_info",
		"Services with a published port: service is the name in Envoy's stats (http.<service>.*, cluster.<service>.*, tcp.<service>.*); service_name and environment are the container's ServiceName and EnvironmentName labels as written (cut at 256 bytes); container and image are the container's.",
		[]string{"service", "service_name", "environment", "container", "image"}, nil)}
}

func (s *serviceInfo) Describe(ch chan<- *prometheus.Desc) { ch <- s.desc }

func (s *serviceInfo) Collect(ch chan<- prometheus.Metric) {
	seen := map[[5]string]bool{}
	for _, e := range s.registry.List() {
		labels := [5]string{e.Service.Name, e.ServiceLabel, e.EnvironmentLabel, e.ContainerName, e.Image}
		if seen[labels] { // every published port of a container: one series
			continue
		}
		seen[labels] = true
		m, err := prometheus.NewConstMetric(s.desc, prometheus.GaugeValue, 1, labels[:]...)
		if err != nil {
			ch <- prometheus.NewInvalidMetric(s.desc, err)
			continue
		}
		ch <- m
	}
}
