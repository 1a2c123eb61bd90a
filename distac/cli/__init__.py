"""The ``distac`` command line. Each sub-command lives in its own module here and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (args -> exit code)."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from distac.errors import DistacError
from distac.io import describe_storage_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distac", description="Robust model merging with DisTaC conditioning.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except DistacError as exc:
        print(f"distac {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        storage = describe_storage_error(exc) or (describe_storage_error(exc.__cause__) if exc.__cause__ else None)
        if storage is None:
            raise
        print(f"distac {args.command}: error: {storage}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
