"""geins-broker: a local daemon that keeps Geins sessions fresh for every program on the machine.

The package root stays empty of imports on purpose: `geins-broker token` imports
`broker.cli`, and anything imported here would slow every such call down.
"""

__version__ = "0.1.0"
