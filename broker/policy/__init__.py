"""The decisions, with no I/O: given values and the time, what to do.

`session` (one session's state machine: when to refresh, back off, or ask for a login),
`rotation` (fleet mode: rotate, adopt or settle), `schemas` (what each op takes),
`headers` (the proxy's header rules and GraphQL-shaped errors). The shells in
`sessions`, `fleet`, `rpc` and `proxy` carry these decisions out. Pure, as a package
(tests/test_layers.py)."""
