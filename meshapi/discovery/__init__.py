"""Generated gRPC API package (code generated from protos/ by the build)."""
