"""The Merchant API proxy: `rules` (pure: headers, errors), `peers` (who is calling),
`upstream` (keep-alive pool to Geins), `app` (the request handler), `service` (its
listeners in the daemon). docs/proxy.md describes it from the outside."""
