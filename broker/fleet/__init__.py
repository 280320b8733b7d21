"""Fleet mode: one Geins session per profile shared by many hosts through Redis, rotated
once fleet-wide. `redis_store` (the Redis shell: leases, compare-and-set commits),
`coordinator` (one per daemon: the subscription, the poll, the store's health),
`shared_link` (one shared profile's side of the protocol; it needs only the
`FleetContext` Protocol of the coordinator), `envelope` (what the sealed record
holds: the session, its generation and commit time), `link` (the narrow seam a
`Profile` consults; a no-op for unshared profiles), `settings` (the `[cluster]` table),
`gauges` (its metrics). The decisions are pure, in `policy.rotation`. docs/cluster.md."""
