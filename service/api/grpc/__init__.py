"""The Open Inference Protocol over gRPC (server.py; imported only where gRPC is on)."""


class GrpcPortError(OSError):
    """NLPSERVE_GRPC_PORT cannot be bound (another process holds it): `nlpserve serve`
    says so in one line. Here, not in server.py: naming it needs no grpcio."""
