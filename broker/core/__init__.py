"""Pure primitives every layer shares: errors with their wire codes, secrets that do
not print, the injectable wall clock, plain counters, sealing (bytes in, bytes out), and
`tables` (typed reading of a parsed TOML table, for the daemon's config and the fleet's).

Pure: nothing here (or anything it imports) does I/O or loads trio, httpx or h11;
tests/test_layers.py holds the whole package to that."""
