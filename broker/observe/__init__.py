"""What an operator sees: `log` (one key=value line per event, never a secret),
`metrics` (the Prometheus collector, exposition and textfile), `routes` (`GET /metrics`
and `GET /healthz` for any HTTP shell)."""
