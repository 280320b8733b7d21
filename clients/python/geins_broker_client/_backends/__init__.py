"""Transports: what the client core asks of one (`base`), and the stdlib socket's (`sync`),
trio's and asyncio's; `auto` picks the running event loop's."""
