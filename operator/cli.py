"""Operator subcommands of the `baton` CLI (registered by baton/cli.py through `register`).

`baton crd` writes the LLMService CRD generated from the API models; `baton crd --check` is the CI guard that
the committed `crds/llmservice.yaml` still matches them.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_CRD_PATH = "crds/llmservice.yaml"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the operator's subcommands to the top-level `baton` parser."""
    crd = subparsers.add_parser(
        "crd",
        help="write the LLMService CustomResourceDefinition generated from the API models",
        description="Generate the LLMService CRD (apiextensions.k8s.io/v1) from operator/api.py.",
    )
    crd.add_argument("-o", "--output", default=DEFAULT_CRD_PATH,
                     help=f"file to write, '-' for stdout (default: {DEFAULT_CRD_PATH})")
    crd.add_argument("--check", action="store_true",
                     help="write nothing; fail if the file differs from what would be generated")
    crd.set_defaults(func=run_crd)

    from baton.operator.planner.cli import add_plan_command
    from baton.operator.run_cli import add_operator_command
    from baton.operator.simulate_cli import add_simulate_command

    add_operator_command(subparsers)
    add_simulate_command(subparsers)
    add_plan_command(subparsers)


def run_crd(args: argparse.Namespace) -> int:
    """`baton crd`: write or check the generated CRD. Returns the exit status."""
    from baton.operator.crd import render_crd_yaml

    from baton.cli import CommandError

    text = render_crd_yaml()
    if args.output == "-":
        if args.check:
            raise CommandError("--check needs a file to compare with, not '-'")
        sys.stdout.write(text)
        return 0
    path = Path(args.output)
    if args.check:
        if not path.is_file():
            raise CommandError(f"{path} does not exist; run `baton crd --output {path}` to generate it")
        if path.read_text(encoding="utf-8") != text:
            raise CommandError(f"{path} is out of date with operator/api.py; run `baton crd --output {path}` "
                               "to regenerate it")
        print(f"{path} is up to date")
        return 0
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise CommandError(f"cannot write {path}: {exc.strerror or exc}") from None
    print(f"wrote {path}")
    return 0
