"""The local lab: network-namespace "pods" (``netns``), the probe server used to check
interception (``probe``) and the ``meshproxy demo`` command (``demo``).

Needs root; nothing here is imported by the sidecar itself.
"""
