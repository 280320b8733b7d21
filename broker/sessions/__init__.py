"""Sessions at run time: the shells that drive `policy.session` with Geins, the disk and
the clocks. `profile` (one profile's refresh loop and single flight), `scheduler`
(every profile's next wake-up, in one task), `geins_client` (the httpx client, the only
code that speaks to Geins' auth service)."""
