"""Demo applications for the mesh: frontend -> catalog -> inventory (v1/v2).

Plain HTTP services on the standard library, with no mesh code at all. The only thing they
do for the mesh is copy the trace headers of the request they serve onto the requests they
make (``meshdemo.common.trace_headers``), so the sidecars' spans join into one trace.

Run one with ``python -m meshdemo.frontend`` (``catalog``, ``inventory``); configure with env
vars: ``PORT`` (default 8080), ``CATALOG_URL``, ``INVENTORY_URL``, ``VERSION``.
"""
