"""Sessions at run time: the shells that drive `policy.session` with Geins, the disk and
the clocks. `profile` (one profile's refresh loop and single flight), `frame` (the
prepared `token` answer, the hot path), `accounts` (login, register, password, logout),
`persist` (writes to disk and their retries), `scheduler` (every profile's next
wake-up, in one task), `geins_client` (the httpx client, the only code that speaks to
Geins' auth service)."""
