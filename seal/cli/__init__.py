"""``seal`` command line: prepare the model, run the services, and drive them as a client."""

from __future__ import annotations

import argparse
import logging
import sys

import grpc
from rich.text import Text

from seal.cli import adapt, admin, render, services, train
from seal.config import get_settings

# Each module defines its sub-commands, their arguments and their handlers (register()).
COMMAND_MODULES = (services, adapt, train, admin)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seal", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from seal.auth import AuthConfigError

    try:
        return args.handler(args, get_settings())
    except grpc.RpcError as exc:
        # Not markup: details may hold brackets (the scopes a call needs).
        render.console.print(Text(exc.code().name, style="red") + Text(f": {exc.details()}"))
        return 1
    except AuthConfigError as exc:
        render.console.print(f"auth settings: {exc}", style="red", markup=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
