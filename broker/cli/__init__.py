"""The `geins-broker` command (`main`) and what it runs in the foreground: `demo`,
`fleet_demo` and `fleet_report` (how status and cluster print fleet mode).

Empty of imports on purpose: `geins-broker token` must not pay for what it does not use."""
