"""The blocking client, generated from `_async/client.py` by scripts/unasync.py.

Never edit it by hand: edit the async source and run the script."""
