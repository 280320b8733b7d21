"""`geins-broker serve`: `lifecycle` (start, reload, drain, stop; the wiring of every
shell), `config` (the TOML file and its errors), `notify` (sd_notify), `hardening`
(memory closed to the daemon's own uid), `fault_injection` (test-only, inert unless
$GEINS_BROKER_TEST_FAULTS names a fault)."""
