"""Fleet mode: one Geins session per profile shared by many hosts through Redis,
rotated once fleet-wide. `rotation` is the pure core; `sealing` the seam to the sealing
layer; `redis_store` the Redis shell; `coordinator` drives both for the daemon;
`link` is the narrow seam a `Profile` consults (a no-op for unshared profiles).
See docs/cluster.md."""
