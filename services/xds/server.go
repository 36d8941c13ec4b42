package xds

import (
	"context"

	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
)

// Register serves delta ADS from c on g, reporting to tracker (which refuses state-of-the-world
// streams with a message saying so).
func Register(ctx context.Context, g *grpc.Server, c *Cache, tracker *Tracker) {
	srv := server.NewServer(ctx, c.Serving(), tracker.Callbacks())
	discoverygrpc.RegisterAggregatedDiscoveryServiceServer(g, srv)
}
