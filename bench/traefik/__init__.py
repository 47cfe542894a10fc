"""Building Traefik, the benchmark's peer proxy, from its Go module (see build.sh)."""
