"""Sans-io core: deterministic protocol and policy logic. Never imports asyncio or sockets."""
