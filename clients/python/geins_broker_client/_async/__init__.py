"""The broker client's async source (`client.py`); `_sync/` holds its generated blocking twin."""
