"""Control-plane client: the gRPC config stream (client.py) and proto conversion (convert.py)."""
