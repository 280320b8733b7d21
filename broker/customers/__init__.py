"""Customer sessions on demand: a storefront's customers log in at run time and each
session is named by an opaque handle.

`model` is the pure part (handles and their keyed hashes, the sealed record, lifetimes,
the login rate limit, the refresh decisions); `store` keeps records in SQLite with group
commits; `live` holds the sessions in memory; `manager` is what the daemon's ops call.

This package's own import loads nothing, so the pure model can be imported alone.
"""
