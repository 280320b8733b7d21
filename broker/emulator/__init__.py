"""An emulator of Geins, strict like the real one, so tests, benchmarks and a first run
need no Geins account.

`model` is the service as pure functions of requests (sans-IO, like h11); `shell`
serves it over HTTP (the shared shell, broker/http/server.py); `app.Emulator` puts
the two together for tests and the CLI; `run` is `geins-broker emulator`:

    emulator = Emulator(token_ttl=60)
    url = await emulator.start(nursery)
    endpoint = emulator.endpoint()      # a geins.protocol.Endpoint pointing here

This package's own import loads nothing, so the pure model can be imported alone.
"""
