"""The optional C accelerator of the broker socket's token hot path (broker/rpc/fastpath.py).

Everything else about the package is in pyproject.toml. The extension is `optional`:
without a C compiler or Python's headers, the build warns and the pure-Python package
installs, and the reactor serves every request itself.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "broker.rpc._fastpath",
            sources=["broker/rpc/_fastpath.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        )
    ]
)
