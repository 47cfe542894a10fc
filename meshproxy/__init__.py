"""meshproxy: the sidecar proxy of the mesh.

Package layers (enforced by import-linter, see pyproject.toml):
  config     the immutable snapshot model and its YAML loader
  core       sans-io logic: HTTP types, protocol detection, routing, balancing,
             retries, breakers, rate limits (no asyncio, no sockets)
  telemetry  spans, metrics, access logs
  xds        the control-plane client and proto conversion
  io         the asyncio shell: listeners, codecs bound to sockets, pools, admin server
  cli        the command line
"""

import os as _os

__version__ = "0.1.0"

if _os.environ.get("MESHPROXY_INTERPRETED") == "1":  # see meshproxy.compiled
    from meshproxy.compiled import run_interpreted as _run_interpreted

    _run_interpreted()
