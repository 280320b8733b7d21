"""The broker socket: length-prefixed msgpack over a Unix socket. `reactor` (the private
epoll loop: connections, framing, flow control, timeouts), `connection` (one
connection's state), `peercred` (who the peer is, as the kernel says; the proxy asks
too), `admission` (who may connect, how many, how much left unread), `dispatch` (a
request to its answer, waiting ops as tasks), `ops` (what each op does and who may call
it), `listener` (the socket, made here or taken from systemd). The wire itself is
`geins_broker_client.protocol`; what each op takes is `policy.schemas`."""
