"""`geins-broker serve`: `lifecycle` (start, signals, drain, stop; the wiring of every
shell), `roster` (the profile table and what a reload does to it), `telemetry` (what
the metrics, `/healthz` and the textfile read of the daemon), `config` (the TOML file),
`notify` (sd_notify), `hardening` (memory closed to the daemon's own uid),
`fault_injection` (test-only, inert unless $GEINS_BROKER_TEST_FAULTS names a fault)."""
