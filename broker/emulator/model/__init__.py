"""The emulated Geins as pure functions of requests (sans-IO, like h11): `service` (the
auth and signature services), `merchant` (the Merchant API's user operations), `values`
(requests, answers, users), `jwt` (its bearer tokens), `faults` (injected failures).
Pure, as a package (tests/test_layers.py)."""
