// Package bootstrap renders the Envoy bootstrap of the appliance from environment variables and
// turns the same settings into Envoy's command line. Envoy learns every listener and cluster from
// envoy-docker-server over ADS; the bootstrap only says where the server is and keeps the admin
// interface on loopback.
package bootstrap

import (
	"bytes"
	"fmt"
	"net"
	"strconv"
	"text/template"

	"github.com/kelseyhightower/envconfig"
)

// Config is every setting of the Envoy container. ENVOY_BASE_ID and ENVOY_PORT keep the meaning
// they had in the seed project.
type Config struct {
	BaseID         int    `envconfig:"ENVOY_BASE_ID" default:"0" desc:"Envoy --base-id: shared-memory namespace, distinct per Envoy on one host."`
	AdminPort      int    `envconfig:"ENVOY_PORT" default:"9901" desc:"Port of Envoy's admin interface, always bound to ENVOY_ADMIN_ADDRESS."`
	AdminAddress   string `envconfig:"ENVOY_ADMIN_ADDRESS" default:"127.0.0.1" desc:"Address of Envoy's admin interface; loopback unless you mean to expose it."`
	XDSAddr        string `envconfig:"EDS_XDS_ADDR" default:"127.0.0.1:18000" desc:"Where envoy-docker-server serves xDS (same variable as the server's)."`
	XDSAPI         string `envconfig:"ENVOY_XDS_API" default:"delta" desc:"xDS variant: delta (only changes are sent) or sotw (state of the world)."`
	NodeID         string `envconfig:"ENVOY_NODE_ID" default:"envoy-docker-shim" desc:"Envoy node id reported to the server."`
	Concurrency    int    `envconfig:"ENVOY_CONCURRENCY" default:"0" desc:"Envoy worker threads; 0 means one per CPU."`
	LogLevel       string `envconfig:"ENVOY_LOG_LEVEL" default:"info" desc:"Envoy's log level (trace, debug, info, warning, error, critical, off)."`
	MaxConnections int    `envconfig:"ENVOY_MAX_CONNECTIONS" default:"100000" desc:"Global cap on downstream connections across all ports (overload manager)."`
	Binary         string `envconfig:"ENVOY_BINARY" default:"/usr/local/bin/envoy" desc:"Path of the Envoy binary the entrypoint runs."`
	ConfigPath     string `envconfig:"ENVOY_CONFIG_PATH" default:"/etc/envoy/envoy.yaml" desc:"Where the entrypoint writes the rendered bootstrap."`
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
	if c.XDSAPI != "delta" && c.XDSAPI != "sotw" {
		return fmt.Errorf("ENVOY_XDS_API=%q: want delta or sotw", c.XDSAPI)
	}
	host, port, err := net.SplitHostPort(c.XDSAddr)
	if err != nil || net.ParseIP(host) == nil {
		return fmt.Errorf("EDS_XDS_ADDR=%q: want IP:port, e.g. 127.0.0.1:18000", c.XDSAddr)
	}
	if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
		return fmt.Errorf("EDS_XDS_ADDR=%q: port must be 1-65535", c.XDSAddr)
	}
	if net.ParseIP(c.AdminAddress) == nil {
		return fmt.Errorf("ENVOY_ADMIN_ADDRESS=%q: want an IP address", c.AdminAddress)
	}
	if c.MaxConnections < 1 {
		return fmt.Errorf("ENVOY_MAX_CONNECTIONS=%d: must be positive", c.MaxConnections)
	}
	return nil
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
    api_type: {{ if eq .XDSAPI "sotw" }}GRPC{{ else }}DELTA_GRPC{{ end }}
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
  clusters:
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

// Render returns the bootstrap YAML for c.
func Render(c Config) ([]byte, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	host, port, _ := net.SplitHostPort(c.XDSAddr)
	var b bytes.Buffer
	err := tmpl.Execute(&b, struct {
		Config
		XDSHost, XDSPort string
	}{c, host, port})
	if err != nil {
		return nil, fmt.Errorf("render bootstrap: %w", err)
	}
	return b.Bytes(), nil
}

// Args is Envoy's command line for c, with the bootstrap at configPath.
func Args(c Config, configPath string) []string {
	args := []string{"-c", configPath, "--base-id", strconv.Itoa(c.BaseID), "--log-level", c.LogLevel}
	if c.Concurrency > 0 {
		args = append(args, "--concurrency", strconv.Itoa(c.Concurrency))
	}
	return args
}
