package server

import (
	"context"
	"fmt"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	pb "github.com/envoy-docker-shim/envoy-docker-shim/services/registration/registrationpb"
)

// Dial connects to the registration API on socket.
func Dial(socket string) (*grpc.ClientConn, error) {
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("registration API at %s: %w", socket, err)
	}
	return conn, nil
}

// Probe succeeds when a server answers on socket: the container healthcheck. It does not require
// Envoy, so that resync, which waits for it, can run while Envoy still waits for its first config.
func Probe(ctx context.Context, socket string) error {
	conn, err := Dial(socket)
	if err != nil {
		return err
	}
	defer conn.Close()
	if _, err := pb.NewRegistrarClient(conn).List(ctx, &pb.ListRequest{}, grpc.WaitForReady(false)); err != nil {
		return fmt.Errorf("envoy-docker-server at %s does not answer: %w", socket, err)
	}
	return nil
}
