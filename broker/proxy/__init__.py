"""The Merchant API proxy: `handler` (one request in, the profile's credentials on,
Geins' answer out), `peers` (who is calling over loopback TCP), `upstream` (the keep-alive
pool to Geins), `service` (its listeners in the daemon). The header rules are pure, in
`policy.headers`. docs/proxy.md describes it from the outside."""
