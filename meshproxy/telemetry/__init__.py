"""Telemetry: OpenTelemetry spans, Prometheus metrics, access logs."""
