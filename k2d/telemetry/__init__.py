"""Observability: OpenTelemetry tracing, Prometheus metrics, JSON logs."""
