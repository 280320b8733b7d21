"""The broker socket: length-prefixed msgpack over a Unix socket. `reactor` (the private
epoll loop: connections, framing, limits), `ops` (what each op does and who may call
it), `listener` (the socket, made here or taken from systemd). The wire itself is
`geins_broker_client.protocol`; what each op takes is `policy.schemas`."""
