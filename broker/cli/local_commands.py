"""The subcommands that do their work in this process rather than ask a daemon: `serve`
(the daemon itself), `emulator`, `demo`, `key generate` and `rekey`. Each imports the
machinery it runs only when chosen."""

from __future__ import annotations

import os
import sys

from broker.cli.exits import EXIT_OK, UsageError

TYPE_CHECKING = False  # not even typing at run time, as in the rest of the CLI
if TYPE_CHECKING:
    import argparse


def cmd_serve(args: argparse.Namespace) -> int:
    from broker.daemon.lifecycle import main as serve_main

    return serve_main(config_path=args.config, socket_path=args.socket)


def cmd_emulator(args: argparse.Namespace) -> int:
    from broker.emulator.run import EmulatorOptions, parse_listen, parse_user
    from broker.emulator.run import main as emulator_main

    try:
        host, port = parse_listen(args.listen)
        users = dict(parse_user(u) for u in args.user) if args.user else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    names = ("account", "environment", "api_key", "token_ttl", "refresh_ttl", "refresh_grace")
    settings = {name: value for name in names if (value := getattr(args, name)) is not None}
    return emulator_main(EmulatorOptions(host, port, users, settings))


def cmd_key(args: argparse.Namespace) -> int:
    """A new random key, to stdout or to a new 0600 file (never over an existing one)."""
    from broker.core.sealing import Key
    from broker.storage.keys import encode_key

    key = Key.generate()
    data = encode_key(key)
    if args.output in (None, "-"):
        sys.stdout.write(data.decode())
        sys.stdout.flush()
        print(f"key {key.name} written to stdout", file=sys.stderr)
        return EXIT_OK
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(args.output, flags, 0o600)
    except FileExistsError:
        raise UsageError(f"{args.output}: exists; a key file is never overwritten") from None
    except OSError as exc:
        raise UsageError(f"{args.output}: {exc.strerror}") from None
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    print(f"key {key.name} written to {args.output} (mode 0600)", file=sys.stderr)
    return EXIT_OK


def cmd_rekey(args: argparse.Namespace) -> int:
    from broker.storage.rekey import main as rekey_main

    return rekey_main(config_path=args.config)


def cmd_demo(args: argparse.Namespace) -> int:
    if args.fleet is not None:
        from broker.cli.fleet_demo import main as fleet_demo

        return fleet_demo(args.fleet, token_ttl=args.token_ttl, duration=args.duration)
    if args.storefront:
        from broker.cli.storefront_demo import main as storefront_demo

        return storefront_demo(token_ttl=args.token_ttl)
    from broker.cli.demo import main as demo_main

    return demo_main(token_ttl=args.token_ttl)
