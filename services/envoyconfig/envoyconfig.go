// Package envoyconfig translates registry entries into the Envoy resources that carry them: one
// listener per host socket and one cluster per mapping. Every function is pure: the same entry
// always gives byte-identical resources, so re-publishing an unchanged port never makes Envoy
// drain its listener. This package is the one place that names Envoy resources.
package envoyconfig

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"time"

	accesslog "github.com/envoyproxy/go-control-plane/envoy/config/accesslog/v3"
	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	route "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	tracev3 "github.com/envoyproxy/go-control-plane/envoy/config/trace/v3"
	stream "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/stream/v3"
	router "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxy "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	resourcedetectors "github.com/envoyproxy/go-control-plane/envoy/extensions/tracers/opentelemetry/resource_detectors/v3"
	proxyprotocol "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/proxy_protocol/v3"
	rawbuffer "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/raw_buffer/v3"
	upstreamhttp "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	tracingtype "github.com/envoyproxy/go-control-plane/envoy/type/tracing/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/envoy-docker-shim/envoy-docker-shim/internal/mapping"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/registry"
)

// Limits and timeouts set on every mapping. Envoy's defaults (1,024 connections and requests per
// cluster, a 15 s route timeout, a 1 h TCP idle timeout) would break ports that docker-proxy
// carried without limits, so each is chosen to behave like docker-proxy unless there is a reason.
const (
	// ConnectTimeout bounds dialling the container; docker-proxy relies on the kernel's (minutes),
	// but a container that does not answer within 5 s is not going to.
	ConnectTimeout = 5 * time.Second
	// MaxConnections, MaxPendingRequests and MaxRequests are the per-mapping circuit breakers.
	MaxConnections     = 100_000
	MaxPendingRequests = 100_000
	MaxRequests        = 100_000
	// StreamIdleTimeout ends an HTTP stream with no activity (Envoy's default, set explicitly).
	StreamIdleTimeout = 5 * time.Minute
	// HTTPIdleTimeout closes an idle downstream HTTP connection (Envoy's default, set explicitly).
	HTTPIdleTimeout = time.Hour
	// A route timeout and a TCP idle timeout of zero disable them: docker-proxy never cuts a slow
	// response or a quiet database connection, and neither may we.
	RouteTimeout   = 0
	TCPIdleTimeout = 0
	// RetryBaseInterval and RetryMaxInterval shape the backoff between connection attempts to a
	// container that refuses (its app is still starting): Envoy's fully jittered exponential
	// backoff waits a random time below a bound that starts at the base and doubles until it
	// reaches half the max, then is the max (below 25, 50, 100, 200, then 250 ms each).
	RetryBaseInterval = 25 * time.Millisecond
	RetryMaxInterval  = 250 * time.Millisecond
	// MaxRetries is the per-mapping circuit breaker on concurrent retries: Envoy's default of 3
	// would fail the fourth client that arrives while the app starts.
	MaxRetries = 100_000
	// EarlyDataBytes is how much a TCP-mode client may send while Envoy connects to the container
	// (and retries): held for the container as the kernel's socket buffer would hold it. Reading
	// on, instead of turning the client's reads off and on around the connect, saves Envoy four
	// epoll_ctl calls per connection.
	EarlyDataBytes = 64 << 10
)

// ConnectRetries is how many times Envoy retries connecting to a container that refuses, so
// that the backoffs between the attempts add up to window on average: each is drawn at random
// below its bound, half of it on average. A client of an app that never listens gets its answer
// after about window, and never later than LongestConnectRetries(window).
func ConnectRetries(window time.Duration) uint32 {
	var retries uint32
	var total time.Duration
	for bound := range retryBounds() {
		if total+bound/2 > window {
			return retries
		}
		total += bound / 2
		retries++
	}
	return retries
}

// LongestConnectRetries is the most the backoffs of ConnectRetries(window) can add up to, every
// one drawn at its bound.
func LongestConnectRetries(window time.Duration) time.Duration {
	var total time.Duration
	n := ConnectRetries(window)
	for bound := range retryBounds() {
		if n == 0 {
			break
		}
		total += bound
		n--
	}
	return total
}

// retryBounds yields the bound of each backoff in turn, as Envoy computes it.
func retryBounds() func(yield func(time.Duration) bool) {
	return func(yield func(time.Duration) bool) {
		bound := RetryBaseInterval
		for yield(bound) {
			if bound < RetryMaxInterval/2 {
				bound *= 2
			} else {
				bound = RetryMaxInterval
			}
		}
	}
}

// Options are the operator's choices that shape every resource.
type Options struct {
	// AccessLog writes one line per request (HTTP) or connection (TCP) to Envoy's stdout, for the
	// ports of every container whose AccessLog label does not say otherwise.
	AccessLog bool
	// Zipkin, when set (host:port), turns on distributed tracing of HTTP-mode ports: Envoy sends
	// spans in Zipkin's v2 JSON format (which Zipkin, Jaeger and the OpenTelemetry Collector all
	// accept) to that collector, through the TracingCluster.
	Zipkin string
	// OTLP, when set (host:port), turns on the same tracing with OpenTelemetry's own protocol
	// instead: Envoy's OpenTelemetry tracer exports the spans over OTLP/gRPC to that collector,
	// through the TracingCluster. At most one of Zipkin and OTLP is set.
	OTLP string
	// HostName names this host in the OTLP spans' resource (host.name); empty leaves it out.
	HostName string
	// TraceSampling is the percentage of requests without a sampling decision that are traced.
	TraceSampling float64
	// ConnectRetryWindow bounds the retries of a connection the container refuses (see
	// ConnectRetries); zero fails at the first refusal, as docker-proxy does.
	ConnectRetryWindow time.Duration
}

// TracingClusterName names the cluster of the trace collector.
const TracingClusterName = "envoy_docker_tracing"

// ZipkinPath is where Envoy posts spans: Zipkin's v2 API (Jaeger and the OpenTelemetry
// Collector's zipkin receiver serve it too).
const ZipkinPath = "/api/v2/spans"

// OTLPExportTimeout bounds one export of spans to the OTLP collector; Envoy drops the batch past
// it rather than holding spans for a collector that does not answer.
const OTLPExportTimeout = 5 * time.Second

// collector is the trace collector of opts: its address and whether it speaks OTLP/gRPC (HTTP/2)
// rather than Zipkin's HTTP/1.1 API; "" when tracing is off.
func collector(opts Options) (addr string, otlp bool, err error) {
	switch {
	case opts.Zipkin != "" && opts.OTLP != "":
		return "", false, fmt.Errorf("both a Zipkin collector (%s) and an OTLP collector (%s) are set: Envoy sends a port's spans to one; set one of them (an OpenTelemetry Collector can forward to both)", opts.Zipkin, opts.OTLP)
	case opts.OTLP != "":
		return opts.OTLP, true, nil
	}
	return opts.Zipkin, false, nil
}

// Resources is what Envoy needs for one mapping.
type Resources struct {
	Listener *listener.Listener
	Cluster  *cluster.Cluster
}

// ListenerName names the listener of a host socket, e.g. "tcp_127.0.0.1_8080" or "tcp_[::]_8080".
func ListenerName(k mapping.Key) string {
	return fmt.Sprintf("%s_%s_%d", k.Proto, bracketed(k.HostIP), k.HostPort)
}

// ClusterName names the cluster of a mapping. A host socket carries one mapping at a time, so the
// cluster shares the listener's name; its stats use the service name (alt_stat_name).
func ClusterName(k mapping.Key) string { return ListenerName(k) }

func bracketed(ip netip.Addr) string {
	if ip.Is6() && !ip.Is4In6() {
		return "[" + ip.String() + "]"
	}
	return ip.Unmap().String()
}

// ForEntry returns the resources carrying e, or false when Envoy does not carry it (shim mode).
func ForEntry(e registry.Entry, opts Options) (Resources, bool, error) {
	if e.Proto != mapping.TCP || e.Mode == registry.ModeProxiedByShim {
		return Resources{}, false, nil
	}
	c, err := Cluster(e)
	if err != nil {
		return Resources{}, false, fmt.Errorf("mapping %s: %w", e.Key, err)
	}
	var l *listener.Listener
	switch e.Mode {
	case registry.ModeHTTP:
		l, err = HTTPListener(e, opts)
	case registry.ModeTCP:
		l, err = TCPListener(e, opts)
	default:
		return Resources{}, false, fmt.Errorf("mapping %s: unknown proxy mode %q", e.Key, e.Mode)
	}
	if err != nil {
		return Resources{}, false, fmt.Errorf("mapping %s: %w", e.Key, err)
	}
	return Resources{Listener: l, Cluster: c}, true, nil
}

// Cluster sends to the one container of the mapping.
func Cluster(e registry.Entry) (*cluster.Cluster, error) {
	name := ClusterName(e.Key)
	socket, err := proxyProtocolSocket(e.Service.ProxyProtocol)
	if err != nil {
		return nil, err
	}
	return &cluster.Cluster{
		TransportSocket:      socket,
		Name:                 name,
		AltStatName:          e.Service.Name,
		ClusterDiscoveryType: &cluster.Cluster_Type{Type: cluster.Cluster_STATIC},
		ConnectTimeout:       durationpb.New(ConnectTimeout),
		LbPolicy:             cluster.Cluster_ROUND_ROBIN,
		CircuitBreakers: &cluster.CircuitBreakers{Thresholds: []*cluster.CircuitBreakers_Thresholds{{
			Priority:           core.RoutingPriority_DEFAULT,
			MaxConnections:     wrapperspb.UInt32(MaxConnections),
			MaxPendingRequests: wrapperspb.UInt32(MaxPendingRequests),
			MaxRequests:        wrapperspb.UInt32(MaxRequests),
			MaxRetries:         wrapperspb.UInt32(MaxRetries),
		}}},
		LoadAssignment: &endpoint.ClusterLoadAssignment{
			ClusterName: name,
			Endpoints: []*endpoint.LocalityLbEndpoints{{
				LbEndpoints: []*endpoint.LbEndpoint{{
					HostIdentifier: &endpoint.LbEndpoint_Endpoint{Endpoint: &endpoint.Endpoint{
						Address: socketAddress(e.ContainerIP, e.ContainerPort),
					}},
				}},
			}},
		},
	}, nil
}

// proxyProtocolSocket makes Envoy open every connection to the container with a PROXY protocol
// header of the given version, naming the client's address and port and the published address
// it connected to (TCP proxy: one upstream connection per client connection); nil for none.
func proxyProtocolSocket(version registry.ProxyProtocol) (*core.TransportSocket, error) {
	var v core.ProxyProtocolConfig_Version
	switch version {
	case registry.ProxyProtocolNone:
		return nil, nil
	case registry.ProxyProtocolV1:
		v = core.ProxyProtocolConfig_V1
	case registry.ProxyProtocolV2:
		v = core.ProxyProtocolConfig_V2
	default:
		return nil, fmt.Errorf("unknown PROXY protocol version %q", version)
	}
	raw, err := typed(&rawbuffer.RawBuffer{})
	if err != nil {
		return nil, err
	}
	config, err := typed(&proxyprotocol.ProxyProtocolUpstreamTransport{
		Config:          &core.ProxyProtocolConfig{Version: v},
		TransportSocket: &core.TransportSocket{Name: "envoy.transport_sockets.raw_buffer", ConfigType: &core.TransportSocket_TypedConfig{TypedConfig: raw}},
	})
	if err != nil {
		return nil, err
	}
	return &core.TransportSocket{Name: "envoy.transport_sockets.upstream_proxy_protocol", ConfigType: &core.TransportSocket_TypedConfig{TypedConfig: config}}, nil
}

// TracingCluster reaches the trace collector of opts (Zipkin or OTLP); ok is false when tracing is
// off. The collector may be named by host name (resolved by Envoy, again when its address changes).
func TracingCluster(opts Options) (*cluster.Cluster, bool, error) {
	addr, otlp, err := collector(opts)
	if err != nil || addr == "" {
		return nil, false, err
	}
	example := "127.0.0.1:9411"
	if otlp {
		example = "127.0.0.1:4317"
	}
	host, portText, err := net.SplitHostPort(addr)
	port, perr := strconv.ParseUint(portText, 10, 16)
	if err != nil || perr != nil || host == "" || port == 0 {
		return nil, false, fmt.Errorf("trace collector %q: want host:port, e.g. %s", addr, example)
	}
	discovery := cluster.Cluster_STRICT_DNS
	if _, err := netip.ParseAddr(host); err == nil {
		discovery = cluster.Cluster_STATIC
	}
	var protocolOptions map[string]*anypb.Any
	if otlp {
		// OTLP/gRPC is HTTP/2 only; Envoy's clusters speak HTTP/1.1 unless told.
		h2, err := typed(&upstreamhttp.HttpProtocolOptions{UpstreamProtocolOptions: &upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig_{
			ExplicitHttpConfig: &upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig{
				ProtocolConfig: &upstreamhttp.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{Http2ProtocolOptions: &core.Http2ProtocolOptions{}},
			},
		}})
		if err != nil {
			return nil, false, err
		}
		protocolOptions = map[string]*anypb.Any{"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": h2}
	}
	return &cluster.Cluster{
		TypedExtensionProtocolOptions: protocolOptions,
		Name:                          TracingClusterName,
		ClusterDiscoveryType:          &cluster.Cluster_Type{Type: discovery},
		ConnectTimeout:                durationpb.New(ConnectTimeout),
		DnsLookupFamily:               cluster.Cluster_V4_PREFERRED,
		LoadAssignment: &endpoint.ClusterLoadAssignment{
			ClusterName: TracingClusterName,
			Endpoints: []*endpoint.LocalityLbEndpoints{{
				LbEndpoints: []*endpoint.LbEndpoint{{
					HostIdentifier: &endpoint.LbEndpoint_Endpoint{Endpoint: &endpoint.Endpoint{
						Address: &core.Address{Address: &core.Address_SocketAddress{SocketAddress: &core.SocketAddress{
							Address:       host,
							PortSpecifier: &core.SocketAddress_PortValue{PortValue: uint32(port)},
						}}},
					}},
				}},
			}},
		},
	}, true, nil
}

// tracing is the HTTP connection manager's tracing for e, or nil when tracing is off. Spans are
// named after the route's decorator (ServiceName) and tagged with the service and container,
// whichever protocol carries them.
func tracing(e registry.Entry, opts Options) (*hcm.HttpConnectionManager_Tracing, error) {
	addr, otlp, err := collector(opts)
	if err != nil || addr == "" {
		return nil, err
	}
	var provider *tracev3.Tracing_Http
	if otlp {
		provider, err = otlpTracer(e, opts)
	} else {
		provider, err = zipkinTracer()
	}
	if err != nil {
		return nil, err
	}
	var tags []*tracingtype.CustomTag
	for _, kv := range [][2]string{
		{"docker.service", e.Service.Name}, {"docker.container", e.Service.ContainerName}, {"docker.published", ListenerName(e.Key)},
	} {
		if kv[1] != "" { // Envoy refuses an empty literal; a container found by IP only has no name
			tags = append(tags, &tracingtype.CustomTag{Tag: kv[0], Type: &tracingtype.CustomTag_Literal_{Literal: &tracingtype.CustomTag_Literal{Value: kv[1]}}})
		}
	}
	return &hcm.HttpConnectionManager_Tracing{
		RandomSampling: &typev3.Percent{Value: opts.TraceSampling},
		Provider:       provider,
		CustomTags:     tags,
	}, nil
}

// zipkinTracer sends spans in Zipkin's v2 JSON, with 128-bit trace IDs and B3 headers to the
// container.
func zipkinTracer() (*tracev3.Tracing_Http, error) {
	zipkin, err := typed(&tracev3.ZipkinConfig{
		CollectorCluster:         TracingClusterName,
		CollectorEndpoint:        ZipkinPath,
		CollectorEndpointVersion: tracev3.ZipkinConfig_HTTP_JSON,
		TraceId_128Bit:           true,
		SharedSpanContext:        wrapperspb.Bool(false),
	})
	if err != nil {
		return nil, err
	}
	return &tracev3.Tracing_Http{Name: "envoy.tracers.zipkin", ConfigType: &tracev3.Tracing_Http_TypedConfig{TypedConfig: zipkin}}, nil
}

// otlpTracer exports spans over OTLP/gRPC, with W3C trace context (traceparent) to the container.
// The resource names the service (service.name, so that a tracing backend lists every service on
// its own, as Prometheus does) and the host (host.name). Envoy shares one tracer among the ports
// whose configuration is equal, so there is one per service, not one per port.
func otlpTracer(e registry.Entry, opts Options) (*tracev3.Tracing_Http, error) {
	var detectors []*core.TypedExtensionConfig
	if opts.HostName != "" {
		static, err := typed(&resourcedetectors.StaticConfigResourceDetectorConfig{Attributes: map[string]string{"host.name": opts.HostName}})
		if err != nil {
			return nil, err
		}
		detectors = append(detectors, &core.TypedExtensionConfig{Name: "envoy.tracers.opentelemetry.resource_detectors.static_config", TypedConfig: static})
	}
	otel, err := typed(&tracev3.OpenTelemetryConfig{
		GrpcService: &core.GrpcService{
			TargetSpecifier: &core.GrpcService_EnvoyGrpc_{EnvoyGrpc: &core.GrpcService_EnvoyGrpc{ClusterName: TracingClusterName}},
			Timeout:         durationpb.New(OTLPExportTimeout),
		},
		ServiceName:       e.Service.Name,
		ResourceDetectors: detectors,
	})
	if err != nil {
		return nil, err
	}
	return &tracev3.Tracing_Http{Name: "envoy.tracers.opentelemetry", ConfigType: &tracev3.Tracing_Http_TypedConfig{TypedConfig: otel}}, nil
}

// HTTPListener terminates HTTP on the host socket and routes every request to the container,
// changing as little as docker-proxy would: upstream Server headers pass through, Envoy adds none
// of its own, HTTP/1.0 and WebSocket upgrades keep working.
func HTTPListener(e registry.Entry, opts Options) (*listener.Listener, error) {
	routerConfig, err := typed(&router.Router{SuppressEnvoyHeaders: true})
	if err != nil {
		return nil, err
	}
	logs, err := accessLogs(e, opts, httpLogFormat)
	if err != nil {
		return nil, err
	}
	trace, err := tracing(e, opts)
	if err != nil {
		return nil, err
	}
	// A request ID (x-request-id, passed to the container) serves tracing and the access log,
	// which record it; otherwise it would be a header docker-proxy never added, at about a tenth
	// of Envoy's CPU per request.
	requestID := trace != nil || logs != nil
	manager := &hcm.HttpConnectionManager{
		StatPrefix: e.Service.Name,
		CodecType:  hcm.HttpConnectionManager_AUTO,
		RouteSpecifier: &hcm.HttpConnectionManager_RouteConfig{RouteConfig: &route.RouteConfiguration{
			Name: ListenerName(e.Key),
			// The cluster may reach Envoy after the listener on an ADS stream; validation would
			// reject the listener instead of answering 503 for the few milliseconds in between.
			ValidateClusters: wrapperspb.Bool(false),
			VirtualHosts: []*route.VirtualHost{{
				Name:    e.Service.Name,
				Domains: []string{"*"},
				Routes: []*route.Route{{
					// Named after the service: the access log's service=%ROUTE_NAME%.
					Name:  e.Service.Name,
					Match: &route.RouteMatch{PathSpecifier: &route.RouteMatch_Prefix{Prefix: "/"}},
					Action: &route.Route_Route{Route: &route.RouteAction{
						ClusterSpecifier: &route.RouteAction_Cluster{Cluster: ClusterName(e.Key)},
						Timeout:          durationpb.New(RouteTimeout),
						RetryPolicy:      connectRetryPolicy(opts),
					}},
					Decorator: &route.Decorator{Operation: e.Service.Operation},
				}},
			}},
		}},
		HttpFilters: []*hcm.HttpFilter{{
			Name:       "envoy.filters.http.router",
			ConfigType: &hcm.HttpFilter_TypedConfig{TypedConfig: routerConfig},
		}},
		StreamIdleTimeout:          durationpb.New(StreamIdleTimeout),
		CommonHttpProtocolOptions:  &core.HttpProtocolOptions{IdleTimeout: durationpb.New(HTTPIdleTimeout)},
		HttpProtocolOptions:        &core.Http1ProtocolOptions{AcceptHttp_10: true},
		ServerHeaderTransformation: hcm.HttpConnectionManager_PASS_THROUGH,
		UpgradeConfigs:             []*hcm.HttpConnectionManager_UpgradeConfig{{UpgradeType: "websocket"}},
		UseRemoteAddress:           wrapperspb.Bool(true),
		GenerateRequestId:          wrapperspb.Bool(requestID),
		AccessLog:                  logs,
		Tracing:                    trace,
	}
	return listenerWith(e, "envoy.filters.network.http_connection_manager", manager)
}

// TCPListener proxies raw TCP to the container with per-service connection and byte stats.
func TCPListener(e registry.Entry, opts Options) (*listener.Listener, error) {
	logs, err := accessLogs(e, opts, tcpLogFormat)
	if err != nil {
		return nil, err
	}
	proxy := &tcpproxy.TcpProxy{
		StatPrefix:        e.Service.Name,
		ClusterSpecifier:  &tcpproxy.TcpProxy_Cluster{Cluster: ClusterName(e.Key)},
		IdleTimeout:       durationpb.New(TCPIdleTimeout),
		AccessLog:         logs,
		MaxEarlyDataBytes: wrapperspb.UInt32(EarlyDataBytes),
	}
	if retries := ConnectRetries(opts.ConnectRetryWindow); retries > 0 {
		proxy.MaxConnectAttempts = wrapperspb.UInt32(retries + 1)
		proxy.BackoffOptions = &core.BackoffStrategy{BaseInterval: durationpb.New(RetryBaseInterval), MaxInterval: durationpb.New(RetryMaxInterval)}
	}
	return listenerWith(e, "envoy.filters.network.tcp_proxy", proxy)
}

// connectRetryPolicy retries only what never reached the container (a refused or failed
// connection), so no request is ever sent twice; nil when retries are off.
func connectRetryPolicy(opts Options) *route.RetryPolicy {
	retries := ConnectRetries(opts.ConnectRetryWindow)
	if retries == 0 {
		return nil
	}
	return &route.RetryPolicy{
		RetryOn:      "connect-failure",
		NumRetries:   wrapperspb.UInt32(retries),
		RetryBackOff: &route.RetryPolicy_RetryBackOff{BaseInterval: durationpb.New(RetryBaseInterval), MaxInterval: durationpb.New(RetryMaxInterval)},
	}
}

func listenerWith(e registry.Entry, filterName string, filterConfig proto.Message) (*listener.Listener, error) {
	config, err := typed(filterConfig)
	if err != nil {
		return nil, err
	}
	return &listener.Listener{
		Name:             ListenerName(e.Key),
		Address:          socketAddress(e.HostIP, e.HostPort),
		TrafficDirection: core.TrafficDirection_INBOUND,
		// One socket per worker, and the way a port is handed over from the socket dockerd 28+
		// passes to the shim: the shim's socket and Envoy's share the port for a moment.
		EnableReusePort: wrapperspb.Bool(true),
		FilterChains: []*listener.FilterChain{{
			Filters: []*listener.Filter{{
				Name:       filterName,
				ConfigType: &listener.Filter_TypedConfig{TypedConfig: config},
			}},
		}},
	}, nil
}

// socketAddress leaves ipv4_compat off: an IPv6 listener is v6-only, like docker-proxy's tcp6
// socket, so "::" and "0.0.0.0" on one port coexist as two listeners.
func socketAddress(ip netip.Addr, port uint16) *core.Address {
	return &core.Address{Address: &core.Address_SocketAddress{SocketAddress: &core.SocketAddress{
		Protocol:      core.SocketAddress_TCP,
		Address:       ip.Unmap().String(),
		PortSpecifier: &core.SocketAddress_PortValue{PortValue: uint32(port)},
	}}}
}

const (
	httpLogFormat = `[%START_TIME%] service=%ROUTE_NAME% "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE% %RESPONSE_FLAGS% rx=%BYTES_RECEIVED% tx=%BYTES_SENT% ms=%DURATION% client=%DOWNSTREAM_REMOTE_ADDRESS% upstream=%UPSTREAM_HOST% listener=%LISTENER_NAME% id=%REQ(X-REQUEST-ID)%` + "\n"
	tcpLogFormat  = `[%START_TIME%] tcp client=%DOWNSTREAM_REMOTE_ADDRESS% upstream=%UPSTREAM_HOST% %RESPONSE_FLAGS% rx=%BYTES_RECEIVED% tx=%BYTES_SENT% ms=%DURATION% listener=%LISTENER_NAME% cluster=%UPSTREAM_CLUSTER%` + "\n"
)

// accessLogs is the access log of e's listener: none unless its container's AccessLog label, or
// else the server's option, turns it on.
func accessLogs(e registry.Entry, opts Options, format string) ([]*accesslog.AccessLog, error) {
	if !e.Service.AccessLog.Or(opts.AccessLog) {
		return nil, nil
	}
	config, err := typed(&stream.StdoutAccessLog{AccessLogFormat: &stream.StdoutAccessLog_LogFormat{
		LogFormat: &core.SubstitutionFormatString{Format: &core.SubstitutionFormatString_TextFormatSource{
			TextFormatSource: &core.DataSource{Specifier: &core.DataSource_InlineString{InlineString: format}},
		}},
	}})
	if err != nil {
		return nil, err
	}
	return []*accesslog.AccessLog{{
		Name:       "envoy.access_loggers.stdout",
		ConfigType: &accesslog.AccessLog_TypedConfig{TypedConfig: config},
	}}, nil
}

// typed wraps a message deterministically, so equal configs give equal bytes.
func typed(m proto.Message) (*anypb.Any, error) {
	out := &anypb.Any{}
	if err := anypb.MarshalFrom(out, m, proto.MarshalOptions{Deterministic: true}); err != nil {
		return nil, fmt.Errorf("marshal %T: %w", m, err)
	}
	return out, nil
}
