"""Customer sessions as values and decisions, with no I/O: `handles` (handles, their
keyed hashes and per-session keys), `record` (the sealed record), `lifetime` (idle and
absolute ends, limits, eviction), `ratelimit` (the login token buckets), `refresh`
(when to refresh, reusing policy/session.py's rules), `app` (one storefront's
settings), `errors`. Pure, as a package (tests/test_layers.py)."""
