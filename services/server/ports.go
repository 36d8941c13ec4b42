package server

import (
	"encoding/json"
	"net/http"

	"github.com/envoy-docker-shim/envoy-docker-shim/services/envoyconfig"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/registry"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/udpstats"
)

// Port is one published port as the UI shows it beside Envoy's stats: what only the server knows
// (the container's name and image), and the traffic of the ports the shims carry themselves,
// which Envoy never sees.
type Port struct {
	Proto         string `json:"proto"`
	Published     string `json:"published"`
	Container     string `json:"container"`
	ContainerID   string `json:"container_id"`
	ContainerName string `json:"container_name"`
	Image         string `json:"image"`
	Service       string `json:"service"`
	Mode          string `json:"mode"`
	// Listener names the Envoy listener carrying the port; empty when the shim carries it.
	Listener string `json:"listener,omitempty"`
	// UDP are the shim's counters of a port it carries itself.
	UDP *udpstats.Counters `json:"udp,omitempty"`
}

// Ports lists the live registrations, in the registry's order.
func (s *Server) Ports() []Port {
	entries := s.registry.List()
	out := make([]Port, 0, len(entries))
	for _, e := range entries {
		p := Port{
			Proto: string(e.Proto), Published: e.Host().String(), Container: e.Container().String(),
			ContainerID: e.ContainerID, ContainerName: e.ContainerName, Image: e.Image,
			Service: e.Service.Name, Mode: string(e.Mode),
		}
		if e.Mode == registry.ModeProxiedByShim {
			c, _ := s.udp.Port(udpstats.Key{Service: e.Service.Name, Address: e.Host()})
			p.UDP = &c
		} else {
			p.Listener = envoyconfig.ListenerName(e.Key)
		}
		out = append(out, p)
	}
	return out
}

func (s *Server) ports(w http.ResponseWriter, _ *http.Request) {
	b, err := json.Marshal(struct {
		Ports []Port `json:"ports"`
	}{s.Ports()})
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	_, _ = w.Write(b)
}
