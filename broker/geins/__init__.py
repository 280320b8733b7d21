"""Geins itself, as values: its protocol (paths, headers, digest, grants, Retry-After) and
how the official SDK reads its JWTs. Pure (tests/test_layers.py): the HTTP client that
speaks this protocol is `broker.sessions.geins_client`, and the emulator serves it."""
