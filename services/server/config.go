// Package server assembles envoy-docker-server: the registration API on a root-only Unix socket,
// the xDS server Envoy connects to, a loopback HTTP endpoint for health and metrics, and the
// Docker watcher, as one oklog/run group that stops as a whole.
package server

import (
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/kelseyhightower/envconfig"

	"github.com/envoy-docker-shim/envoy-docker-shim/services/envoyconfig"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/netfilter"
)

// Config is every setting of envoy-docker-server, read from the environment.
type Config struct {
	Socket             string        `envconfig:"EDS_SOCKET" default:"/run/envoy-docker-shim/server.sock" desc:"Unix socket of the server's gRPC API (mode 0600, root only): resync, the healthcheck, and shims of releases before the shim link. resync reads the same variable."`
	ShimSocket         string        `envconfig:"EDS_SHIM_SOCKET" default:"/run/envoy-docker-shim/shim.sock" desc:"Unix socket (SOCK_SEQPACKET, mode 0600) on which the shims register their ports. The shim reads the same variable: set both when you move it."`
	XDSAddr            string        `envconfig:"EDS_XDS_ADDR" default:"127.0.0.1:18000" desc:"Address of the xDS (ADS) gRPC server that Envoy connects to. Keep it on loopback."`
	HTTPAddr           string        `envconfig:"EDS_HTTP_ADDR" default:"127.0.0.1:18001" desc:"Address of /healthz (200 once Envoy is connected), /metrics (Prometheus), /registrations, and /ports (what the UI shows beside Envoy's stats: containers, images, UDP traffic). Envoy's UI reads /ports here (the Envoy container's EDS_HTTP_ADDR)."`
	DockerHost         string        `envconfig:"DOCKER_HOST" default:"unix:///var/run/docker.sock" desc:"Docker Engine API, for container labels and events. Set it empty to run without one: ports are then named after their container IPs."`
	DockerTimeout      time.Duration `envconfig:"EDS_DOCKER_TIMEOUT" default:"2s" desc:"Bound on finding a container's labels; past it the port is served under a name made from the container IP."`
	ReadyTimeout       time.Duration `envconfig:"EDS_READY_TIMEOUT" default:"8s" desc:"Bound on waiting for Envoy to confirm a port; must stay below the shim's EDS_SHIM_TIMEOUT."`
	RestartGrace       time.Duration `envconfig:"EDS_RESTART_GRACE" default:"5s" desc:"After a (re)start, how long the server waits for shims to re-register and resync to restore the rest before it answers Envoy, which keeps its last configuration meanwhile."`
	AccessLog          bool          `envconfig:"EDS_ACCESS_LOG" default:"false" desc:"true: Envoy writes one access-log line per request (http) or connection (tcp) to its stdout, for every port. A container's label AccessLog=true or AccessLog=false decides for its own ports. Off by default: a line costs Envoy about as much CPU as proxying the request, and Docker's log driver as much again; per-service metrics are always on."`
	Zipkin             string        `envconfig:"EDS_ZIPKIN_ADDR" desc:"host:port of a trace collector speaking Zipkin's v2 API (Zipkin, Jaeger, or the OpenTelemetry Collector's zipkin receiver), e.g. 127.0.0.1:9411. When set, Envoy traces http-mode ports: one span per request, named after ServiceName, tagged with the service and container. Empty: no tracing."`
	OTLP               string        `envconfig:"EDS_OTLP_ADDR" desc:"host:port of an OpenTelemetry collector taking OTLP over gRPC (the OpenTelemetry Collector, Jaeger, Tempo, most vendors' agents), e.g. 127.0.0.1:4317: the same tracing as EDS_ZIPKIN_ADDR in OpenTelemetry's own protocol, with the service (service.name) and this host (host.name) as the spans' resource, and W3C trace context (traceparent) to the container. Set at most one of the two. Empty: no OTLP."`
	TraceSampling      float64       `envconfig:"EDS_TRACE_SAMPLING" default:"100" desc:"Percentage of requests traced when EDS_ZIPKIN_ADDR or EDS_OTLP_ADDR is set (requests arriving with a sampling decision keep it). Lower it for busy services."`
	ConnectRetryWindow time.Duration `envconfig:"EDS_CONNECT_RETRY_WINDOW" default:"3s" desc:"How long Envoy keeps retrying to connect to a container that refuses the connection (its app is still starting) before it answers 503 (HTTP; access-log flags URX,UF) or closes the client's connection (TCP). Retries wait a random time below a bound growing from 25 ms to 250 ms, as many as add up to this window on average (the waits being random, one client's retries may last up to about twice it); a request is retried only if it never reached the container. 0: fail at the first refusal, as docker-proxy does."`
	Netfilter          bool          `envconfig:"EDS_NETFILTER" default:"true" desc:"Give Docker's bridge networks back what \"iptables\": false takes away: outbound NAT (masquerade), forwarding, isolation between networks and from outside, in the nftables table EDS_NETFILTER_TABLE; no DNAT (published ports stay with Envoy). false: you manage the host's firewall; a table an earlier run kept is removed."`
	NftTable           string        `envconfig:"EDS_NETFILTER_TABLE" default:"envoy_docker_shim" desc:"The nftables table (family inet) the server owns and replaces as a whole; it touches no other. Give each server its own when several follow different dockerds on one host. The installer's EDS_NETFILTER_TABLE must match."`
	NftKeep            bool          `envconfig:"EDS_NETFILTER_KEEP" default:"true" desc:"Keep the rules while the server is stopped, so that a restart or an upgrade neither cuts containers' outbound connections nor opens their isolation. false: remove them at every stop. Uninstalling (EDS_UNINSTALL=true) removes them either way."`
	SysctlNet          string        `envconfig:"EDS_SYSCTL_NET" default:"/proc/sys/net" desc:"The host's net sysctls, writable: where the server turns on IP forwarding when a network needs it. compose mounts the host's /proc/sys/net at /host/proc/sys/net, because /proc/sys is read-only in a container."`
	TCPMigrateReq      bool          `envconfig:"EDS_TCP_MIGRATE_REQ" default:"true" desc:"Set the host's net.ipv4.tcp_migrate_req to 1 (through EDS_SYSCTL_NET) at start: connections queued on Envoy's sockets when Envoy stops or dies move to the shim's socket of the port instead of being reset. It affects only SO_REUSEPORT listeners and is never turned off again. false: leave it as it is."`
	LogLevel           string        `envconfig:"EDS_LOG_LEVEL" default:"info" desc:"debug, info, warn or error. Logs are JSON on stderr."`
}

// ConfigFromEnv reads Config from the environment.
func ConfigFromEnv() (Config, error) {
	var c Config
	if err := envconfig.Process("", &c); err != nil {
		return Config{}, fmt.Errorf("configuration: %w", err)
	}
	if _, err := c.level(); err != nil {
		return Config{}, err
	}
	if c.TraceSampling < 0 || c.TraceSampling > 100 {
		return Config{}, fmt.Errorf("configuration: EDS_TRACE_SAMPLING=%v: want a percentage from 0 to 100", c.TraceSampling)
	}
	if _, _, err := envoyconfig.TracingCluster(c.EnvoyOptions()); err != nil {
		return Config{}, fmt.Errorf("configuration: %s: %w", c.tracingVariables(), err)
	}
	if c.Netfilter || c.NftTable != "" {
		if err := netfilter.CheckTable(c.NftTable); err != nil {
			return Config{}, fmt.Errorf("configuration: EDS_NETFILTER_TABLE: %w", err)
		}
	}
	if c.ReadyTimeout <= 0 || c.DockerTimeout <= 0 || c.RestartGrace < 0 || c.ConnectRetryWindow < 0 {
		return Config{}, fmt.Errorf("configuration: EDS_READY_TIMEOUT and EDS_DOCKER_TIMEOUT must be positive, EDS_RESTART_GRACE and EDS_CONNECT_RETRY_WINDOW not negative")
	}
	return c, nil
}

// EnvoyOptions are the settings that shape what Envoy is told for every port.
func (c Config) EnvoyOptions() envoyconfig.Options {
	opts := envoyconfig.Options{AccessLog: c.AccessLog, Zipkin: c.Zipkin, OTLP: c.OTLP, TraceSampling: c.TraceSampling, ConnectRetryWindow: c.ConnectRetryWindow}
	if c.OTLP != "" {
		// The server shares the host's network namespace and, with it, its host name (compose:
		// network_mode: host); a failure only leaves host.name out of the spans.
		opts.HostName, _ = hostname()
	}
	return opts
}

var hostname = os.Hostname

// tracingVariables names the variables a tracing error is about.
func (c Config) tracingVariables() string {
	switch {
	case c.Zipkin != "" && c.OTLP != "":
		return "EDS_ZIPKIN_ADDR and EDS_OTLP_ADDR"
	case c.OTLP != "":
		return "EDS_OTLP_ADDR"
	}
	return "EDS_ZIPKIN_ADDR"
}

func (c Config) level() (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(c.LogLevel)); err != nil {
		return 0, fmt.Errorf("configuration: EDS_LOG_LEVEL=%q: want debug, info, warn or error", c.LogLevel)
	}
	return l, nil
}

// Logger is the one JSON logger setup of the server.
func (c Config) Logger() *slog.Logger {
	level, _ := c.level()
	return slog.New(slog.NewJSONHandler(stderr, &slog.HandlerOptions{Level: level}))
}
