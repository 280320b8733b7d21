"""Pure primitives every layer shares: errors with their wire codes, secrets that do
not print, the injectable wall clock, plain counters, and sealing (bytes in, bytes out).

Pure: nothing here (or anything it imports) does I/O or loads trio, httpx or h11;
tests/test_layers.py holds the whole package to that."""
