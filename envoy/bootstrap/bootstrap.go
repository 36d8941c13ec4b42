// Package bootstrap renders the Envoy bootstrap of the appliance from environment variables and
// turns the same settings into Envoy's command line. Envoy learns every listener and cluster from
// envoy-docker-server over ADS; the bootstrap only says where the server is, keeps the admin
// interface on loopback, and adds the UI.
//
// The UI is a listener of Envoy's own (ENVOY_UI_LISTEN_PORT, 8081 by default): one page showing
// every published port and service with its container, image, rates and latency, the three
// read-only admin endpoints that page reads (GET /stats, /clusters and /config_dump, plus
// /stats/prometheus), and GET /ports of envoy-docker-server (EDS_HTTP_ADDR): container names and
// images, and the traffic of the UDP ports the shims carry. Everything else on that port is a 404,
// so exposing the UI never exposes the admin interface, whose POST endpoints stop Envoy or change
// its state, nor the server's other endpoints.
package bootstrap

import (
	"bytes"
	_ "embed"
	"encoding/json"
	"fmt"
	"net"
	"runtime"
	"strconv"
	"text/template"
	"time"

	"github.com/kelseyhightower/envconfig"
)

// Config is every setting of the Envoy container. ENVOY_BASE_ID, ENVOY_PORT and
// ENVOY_UI_LISTEN_PORT keep the meaning they had in the seed project.
type Config struct {
	BaseID         int           `envconfig:"ENVOY_BASE_ID" default:"0" desc:"Envoy --base-id: shared-memory namespace, distinct per Envoy on one host."`
	AdminPort      int           `envconfig:"ENVOY_PORT" default:"9901" desc:"Port of Envoy's admin interface, always bound to ENVOY_ADMIN_ADDRESS."`
	AdminAddress   string        `envconfig:"ENVOY_ADMIN_ADDRESS" default:"127.0.0.1" desc:"Address of Envoy's admin interface; loopback unless you mean to expose it."`
	UIPort         int           `envconfig:"ENVOY_UI_LISTEN_PORT" default:"8081" desc:"Port of the UI: every published port with its service, container and traffic, and Envoy's metrics (read-only; the admin interface is not reachable through it). 0 turns the UI off."`
	UIAddress      string        `envconfig:"ENVOY_UI_ADDRESS" default:"127.0.0.1" desc:"Address the UI listens on; loopback by default, 0.0.0.0 to reach it from other machines."`
	XDSAddr        string        `envconfig:"EDS_XDS_ADDR" default:"127.0.0.1:18000" desc:"Where envoy-docker-server serves xDS (same variable as the server's)."`
	ServerHTTPAddr string        `envconfig:"EDS_HTTP_ADDR" default:"127.0.0.1:18001" desc:"Where envoy-docker-server serves HTTP (same variable as the server's): the UI reads the containers' names and images and the UDP ports' traffic from its /ports."`
	NodeID         string        `envconfig:"ENVOY_NODE_ID" default:"envoy-docker-shim" desc:"Envoy node id reported to the server."`
	Concurrency    string        `envconfig:"ENVOY_CONCURRENCY" default:"auto" desc:"Envoy worker threads. auto: half the CPUs the container may use (its cpuset and CPU quota), at least 1 and at most 8: the applications behind the ports need CPU too, and every worker holds a listening socket per port. A number sets it; 0 is one per CPU (Envoy's own default)."`
	LogLevel       string        `envconfig:"ENVOY_LOG_LEVEL" default:"info" desc:"Envoy's log level (trace, debug, info, warning, error, critical, off)."`
	MaxConnections int           `envconfig:"ENVOY_MAX_CONNECTIONS" default:"100000" desc:"Global cap on downstream connections across all ports (overload manager)."`
	Binary         string        `envconfig:"ENVOY_BINARY" default:"/usr/local/bin/envoy" desc:"Path of the Envoy binary the entrypoint runs."`
	ConfigPath     string        `envconfig:"ENVOY_CONFIG_PATH" default:"/etc/envoy/envoy.yaml" desc:"Where the entrypoint writes the rendered bootstrap."`
	DrainTime      time.Duration `envconfig:"ENVOY_DRAIN_TIME" default:"10s" desc:"A stop of the Envoy container (docker stop, compose restart, an upgrade) first closes Envoy's listening sockets, so that each port's shim takes new connections until the next Envoy listens, makes HTTP responses close their connections, and keeps open connections (long-lived TCP ones) up to this long before Envoy exits. compose's stop_grace_period for envoy (ENVOY_STOP_GRACE_PERIOD, 15s) must exceed it. 0: Envoy exits at once, cutting open connections."`
}

// FromEnv reads Config from the environment and checks it.
func FromEnv() (Config, error) {
	var c Config
	if err := envconfig.Process("", &c); err != nil {
		return Config{}, fmt.Errorf("configuration: %w", err)
	}
	return c, c.Validate()
}

// Validate rejects settings Envoy would fail on less clearly.
func (c Config) Validate() error {
	if c.AdminPort < 0 || c.AdminPort > 65535 {
		return fmt.Errorf("ENVOY_PORT=%d: want a port 0-65535", c.AdminPort)
	}
	if err := checkAddr("EDS_XDS_ADDR", c.XDSAddr, "127.0.0.1:18000"); err != nil {
		return err
	}
	if c.UIPort > 0 {
		if err := checkAddr("EDS_HTTP_ADDR", c.ServerHTTPAddr, "127.0.0.1:18001"); err != nil {
			return err
		}
	}
	if net.ParseIP(c.AdminAddress) == nil {
		return fmt.Errorf("ENVOY_ADMIN_ADDRESS=%q: want an IP address", c.AdminAddress)
	}
	if c.UIPort < 0 || c.UIPort > 65535 {
		return fmt.Errorf("ENVOY_UI_LISTEN_PORT=%d: want a port 1-65535, or 0 for no UI", c.UIPort)
	}
	if c.UIPort > 0 && net.ParseIP(c.UIAddress) == nil {
		return fmt.Errorf("ENVOY_UI_ADDRESS=%q: want an IP address", c.UIAddress)
	}
	if c.UIPort > 0 && c.UIPort == c.AdminPort {
		return fmt.Errorf("ENVOY_UI_LISTEN_PORT=%d is also ENVOY_PORT (the admin interface): give them different ports", c.UIPort)
	}
	if c.DrainTime < 0 {
		return fmt.Errorf("ENVOY_DRAIN_TIME=%s: must not be negative", c.DrainTime)
	}
	if c.MaxConnections < 1 {
		return fmt.Errorf("ENVOY_MAX_CONNECTIONS=%d: must be positive", c.MaxConnections)
	}
	if _, err := c.workers(1); err != nil {
		return err
	}
	return nil
}

func checkAddr(name, addr, example string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil || net.ParseIP(host) == nil {
		return fmt.Errorf("%s=%q: want IP:port, e.g. %s", name, addr, example)
	}
	if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
		return fmt.Errorf("%s=%q: port must be 1-65535", name, addr)
	}
	return nil
}

// MaxAutoWorkers caps ENVOY_CONCURRENCY=auto: past it, a worker more mostly costs a listening
// socket per published port and per-worker connection pools, and a host that needs more sets it.
const MaxAutoWorkers = 8

// Workers is Envoy's worker count for a container that may use cpus CPUs; 0 leaves it to Envoy
// (one per CPU of the host).
func (c Config) Workers(cpus int) int {
	n, _ := c.workers(cpus)
	return n
}

func (c Config) workers(cpus int) (int, error) {
	if c.Concurrency == "auto" {
		return min(max(1, cpus/2), MaxAutoWorkers), nil
	}
	n, err := strconv.Atoi(c.Concurrency)
	if err != nil || n < 0 || n > 1024 {
		return 0, fmt.Errorf("ENVOY_CONCURRENCY=%q: want auto, a number of workers from 1 to 1024, or 0 for one per CPU", c.Concurrency)
	}
	return n, nil
}

// The xDS stream is re-established quickly after a server restart: Envoy's default backoff grows
// to 30 s, far longer than a restart takes. Envoy keeps serving its last configuration meanwhile.
var tmpl = template.Must(template.New("bootstrap").Parse(`node:
  id: {{ .NodeID }}
  cluster: envoy-docker-shim
admin:
  address:
    socket_address: { address: {{ .AdminAddress }}, port_value: {{ .AdminPort }} }
dynamic_resources:
  ads_config:
    api_type: DELTA_GRPC
    transport_api_version: V3
    set_node_on_first_message_only: true
    grpc_services:
    - envoy_grpc:
        cluster_name: envoy_docker_server
        retry_policy:
          retry_back_off: { base_interval: 0.1s, max_interval: 1s }
  lds_config: { ads: {}, resource_api_version: V3 }
  cds_config: { ads: {}, resource_api_version: V3 }
static_resources:
{{- if .UIPort }}
  listeners:
  - name: ui
    address:
      socket_address: { address: {{ .UIAddress }}, port_value: {{ .UIPort }} }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ui
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          route_config:
            name: ui
            max_direct_response_body_size_bytes: 65536
            virtual_hosts:
            - name: ui
              domains: ["*"]
              routes:
              - match: { path: "/", headers: [ { name: ":method", string_match: { exact: GET } } ] }
                direct_response: { status: 200, body: { inline_string: {{ .UIPage }} } }
                response_headers_to_add:
                - header: { key: content-type, value: "text/html; charset=utf-8" }
                  append_action: OVERWRITE_IF_EXISTS_OR_ADD
{{- range .UIAdminPaths }}
              - match: { path: "{{ . }}", headers: [ { name: ":method", string_match: { exact: GET } } ] }
                route: { cluster: envoy_admin, timeout: 10s }
{{- end }}
              - match: { path: "/ports", headers: [ { name: ":method", string_match: { exact: GET } } ] }
                route: { cluster: envoy_docker_server_http, timeout: 5s }
              - match: { prefix: "/" }
                direct_response: { status: 404, body: { inline_string: "not part of the envoy-docker-shim UI\n" } }
{{- end }}
  clusters:
{{- if .UIPort }}
  - name: envoy_admin
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: envoy_admin
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: { address: {{ .UIAdminHost }}, port_value: {{ .AdminPort }} }
  - name: envoy_docker_server_http
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: envoy_docker_server_http
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: { address: {{ .ServerHTTPHost }}, port_value: {{ .ServerHTTPPort }} }
{{- end }}
  - name: envoy_docker_server
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http2_protocol_options: {} }
    load_assignment:
      cluster_name: envoy_docker_server
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: { address: {{ .XDSHost }}, port_value: {{ .XDSPort }} }
overload_manager:
  resource_monitors:
  - name: envoy.resource_monitors.global_downstream_max_connections
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig
      max_active_downstream_connections: {{ .MaxConnections }}
`))

//go:embed ui.html
var uiPage string

// uiAdminPaths are the admin endpoints the UI serves: read-only, and what its page reads.
var uiAdminPaths = []string{"/stats", "/stats/prometheus", "/clusters", "/config_dump"}

// adminHostFor is where the UI reaches the admin interface: a wildcard admin address is reached
// on loopback.
func adminHostFor(addr string) string {
	switch ip := net.ParseIP(addr); {
	case ip.Equal(net.IPv4zero):
		return "127.0.0.1"
	case ip.Equal(net.IPv6unspecified):
		return "::1"
	}
	return addr
}

// Render returns the bootstrap YAML for c.
func Render(c Config) ([]byte, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	host, port, _ := net.SplitHostPort(c.XDSAddr)
	httpHost, httpPort, _ := net.SplitHostPort(c.ServerHTTPAddr)
	// The page goes into the YAML as a JSON string, which YAML reads as a double-quoted scalar.
	var page bytes.Buffer
	enc := json.NewEncoder(&page)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(uiPage); err != nil {
		return nil, fmt.Errorf("render bootstrap: %w", err)
	}
	var b bytes.Buffer
	err := tmpl.Execute(&b, struct {
		Config
		XDSHost, XDSPort               string
		ServerHTTPHost, ServerHTTPPort string
		UIPage                         string
		UIAdminPaths                   []string
		UIAdminHost                    string
	}{c, host, port, httpHost, httpPort, string(bytes.TrimSpace(page.Bytes())), uiAdminPaths, adminHostFor(c.AdminAddress)})
	if err != nil {
		return nil, fmt.Errorf("render bootstrap: %w", err)
	}
	return b.Bytes(), nil
}

// Args is Envoy's command line for c, with the bootstrap at configPath. The CPUs the container may
// use are what the Go runtime found for itself (GOMAXPROCS: the CPU affinity and the cgroup's CPU
// quota).
func Args(c Config, configPath string) []string {
	args := []string{"-c", configPath, "--base-id", strconv.Itoa(c.BaseID), "--log-level", c.LogLevel}
	if n := c.Workers(runtime.GOMAXPROCS(0)); n > 0 {
		args = append(args, "--concurrency", strconv.Itoa(n))
	}
	return args
}
