"""The Merchant API proxy, on a private epoll reactor with httptools (llhttp) parsing:
`reactor` (the loop, its design note), `client` (a caller's connection and its limits),
`handler` (one request in, the profile's credentials on, Geins' answer out), `upstream`
(the keep-alive pool to Geins) and `transport` (its bytes, in clear or TLS),
`accesslog` (the request lines, batched), `peers` (who is calling over loopback TCP),
`service` (its listeners and who may hold a connection). The header rules are pure, in
`policy.headers`. docs/proxy.md describes it from the outside."""
