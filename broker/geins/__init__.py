"""Everything about Geins itself: its protocol's values, its JWTs, and the HTTP client.

`protocol` and `claims` are pure (the session policy and the emulator import them);
`client` is the httpx shell, the only module that speaks to Geins. This package's own
import loads nothing, so that importing a pure part never pulls httpx in.
"""
