"""The `baton` command line.

One entry point; each part of Baton contributes its own subcommands through a `register(subparsers)`
function in its `cli` module, so parts stay independent and imports stay lazy (the operator does not pay
for torch, the worker does not pay for kopf).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from baton.errors import CommandError  # re-exported: parts raise baton.cli.CommandError

#: Modules that contribute subcommands; each exposes `register(subparsers) -> None` and sets
#: `func(args) -> int` on its parsers via `set_defaults`.
COMMAND_MODULES = (
    "baton.operator.cli",
    "baton.worker.cli",
    "baton.e2e.cli",
)


__all__ = ["COMMAND_MODULES", "CommandError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="baton", description="Baton: disaggregated LLM serving on Kubernetes.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # that part is not installed (images ship no `baton.e2e`): the missing module is the part itself
            # or a package above it
            if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from baton import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CommandError as exc:
        print(f"baton {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"baton {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
