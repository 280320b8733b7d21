"""What goes wrong with a stored customer session record.

The refusals a caller sees (`UnknownSession`, `RateLimited`) are in core/errors.py
with every other wire code.
"""

from __future__ import annotations


class RecordUnreadable(Exception):
    """A stored record that does not open or does not parse: a failure of the store,
    never of the daemon. Carries no key material, handle or plaintext."""
