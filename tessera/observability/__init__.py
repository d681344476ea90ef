"""What every service exposes to its operators: structured JSON logs, health and readiness,
Prometheus metrics."""
