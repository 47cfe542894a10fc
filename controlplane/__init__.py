"""The mesh control plane: watch -> index -> compile -> cache -> gRPC server, plus the injection webhook."""
