"""What is kept on disk: `store` (one sealed, atomically replaced file per session),
`statedir` (the state directory opened without following another user's links, and
its lock), `keys` (where sealing keys come from and what a key file must be), `rekey`
(`geins-broker rekey`, offline under the lock). Sealing itself is pure: `core.sealing`."""
