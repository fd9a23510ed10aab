"""`baton model fetch --cache-dir DIR`: a node-level model cache, so a model is fetched once per node, not once
per pod.

    baton model fetch --uri https://models.example.com/llama-3-8b/ --cache-dir /model-cache

The model lands in DIR/<key>, `launch.model_cache_key(uri)`: a digest of the URI (revision and query included)
and, for a .gguf, the dtype it is converted to -- never the credentials. The operator mounts the node's cache
folder (a hostPath, or a PVC the LLMService names) read-write into the fetch-model init container at
`launch.MODEL_CACHE_MOUNT`, and the entry read-only into the worker container (a subPath of the same volume, at
/models, where the worker's --model points).

How an entry is made, so that pods on one node at once download once and never use half a model:
  * an exclusive flock(2) on DIR/.<key>.lock is held for the whole check-and-fetch; a second fetch of the same
    key waits (it says so) and then finds the entry complete;
  * the download goes into a temporary folder DIR/.<key>.tmp-XXXX, the marker ENTRY_MARKER is written into it,
    every file is made world-readable (the fetch runs as root, the worker as uid 1000), and only then is it
    renamed to DIR/<key>: a complete entry is one with the marker;
  * under the lock, an entry without the marker and any .<key>.tmp-* folder are leftovers of a killed fetch
    (no live fetch of that key can exist): they are removed and the model is fetched again.

An entry fetched with credentials records that; a pod reusing it must prove access with its own credentials
(one ranged GET of the model's config.json or file, with the usual errors: 401 names the Secret), so a shared
node cache never hands a private model to a pod whose Secret could not fetch it. An entry of a public model is
reused without any request.

The last line says what happened and how long it took: "model cache hit: reused ..." or "model cache miss:
downloaded ..."; it is what the init container's log shows.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path

import httpx
from baton.worker.model_fetch import (
    BACKOFF_SECONDS,
    REQUIRED_FILE,
    RETRIES,
    Credentials,
    Downloader,
    FetchError,
    Source,
    fetch_model,
    human,
    make_readable_by_all,
    redact,
    ssl_context,
)

from baton import launch

#: In a complete entry; written before the rename that publishes it.
ENTRY_MARKER = ".baton-cache-entry"
LOCK_SUFFIX = ".lock"
TMP_INFIX = ".tmp-"
#: How the last line starts: what the init container's log says (the real-node test reads it).
HIT = "model cache hit"
MISS = "model cache miss"


def _say_default(line: str) -> None:
    print(f"baton model fetch: {line}", file=sys.stderr, flush=True)


def entry_meta(entry: Path) -> dict | None:
    """The marker of a complete entry; None for a missing or partial one."""
    try:
        meta = json.loads((entry / ENTRY_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not (entry / REQUIRED_FILE).is_file():
        return None
    return meta


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _clean_leftovers(cache: Path, key: str, say: Callable[[str], None]) -> None:
    """A partial entry and temporary folders of `key`: left by a killed fetch (the caller holds the lock)."""
    entry = cache / key
    if entry.exists() or entry.is_symlink():
        say(f"removing the incomplete cache entry {entry} (a fetch was interrupted)")
        _remove(entry)
    for tmp in cache.glob(f".{key}{TMP_INFIX}*"):
        say(f"removing {tmp} (a fetch was interrupted)")
        _remove(tmp)


def check_access(downloader: Downloader, source: Source) -> None:
    """One ranged GET of the model's first file with the caller's credentials; FetchError when refused."""
    url = source.url if (source.archive or source.gguf) else source.file_url(REQUIRED_FILE)
    shown = redact(url)
    if source.scheme == "file":
        return  # a local file: whoever may mount the cache may read it
    for attempt in range(1 + RETRIES):
        try:
            with downloader.client.stream("GET", url, headers={"Range": "bytes=0-0"}) as response:
                status = response.status_code
        except httpx.TransportError as exc:
            why = f"cannot check access to {shown}: {exc or type(exc).__name__}"
        else:
            if status in (401, 403):
                raise FetchError(downloader._refused(status, shown))
            if status == 404:
                raise FetchError(f"the model is not found (HTTP 404): {shown}")
            if status < 400:
                return
            if status < 500:
                raise FetchError(f"the server answered HTTP {status} for {shown}")
            why = f"the server answered HTTP {status} for {shown}"
        if attempt == RETRIES:
            raise FetchError(f"{why} (gave up after {1 + RETRIES} attempts)")
        wait = BACKOFF_SECONDS[min(attempt, len(BACKOFF_SECONDS) - 1)]
        downloader.say(f"{why}; retrying in {wait:.0f}s")
        downloader.sleep(wait)


def _lock(cache: Path, key: str) -> int:
    """An fd of the key's lock file; opened read-only, so any user who can read it can lock it."""
    return os.open(cache / f".{key}{LOCK_SUFFIX}", os.O_RDONLY | os.O_CREAT, 0o644)


def fetch_cached(uri: str, cache_dir: Path, *, ca_file: str | None = None, env: Mapping[str, str] | None = None,
                 say: Callable[[str], None] | None = None, dtype: str = "float32") -> tuple[Path, str]:
    """(the entry, the sentence to print): `uri`'s complete entry in `cache_dir`, fetched first unless another
    fetch made it. Raises FetchError."""
    env = os.environ if env is None else env
    say = say or _say_default
    started = time.monotonic()
    source = Source.parse(uri, hub=env.get("HF_ENDPOINT"))
    key = launch.model_cache_key(uri, dtype if source.gguf and dtype != "float32" else "")
    cache = Path(os.path.abspath(cache_dir))
    entry = cache / key
    credentials = Credentials.from_env(env, source)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd = _lock(cache, key)
    except OSError as exc:
        raise FetchError(f"cannot write the model cache {cache}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"another fetch of {source.display} into {entry} is under way on this node; waiting for it")
            fcntl.flock(fd, fcntl.LOCK_EX)
        meta = entry_meta(entry)
        if meta is not None:
            if meta.get("authenticated"):
                verify = ssl_context(ca_file or env.get("BATON_MODEL_CA_FILE") or None,
                                     env.get("BATON_MODEL_CA") or None)
                downloader = Downloader(credentials, verify, say)
                try:
                    check_access(downloader, source)
                finally:
                    downloader.close()
            return entry, (f"{HIT}: reused {entry} for {source.display} ({human(_size(entry))}), no download; "
                           f"ready in {time.monotonic() - started:.1f}s")
        try:
            _clean_leftovers(cache, key, say)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}{TMP_INFIX}", dir=cache))
        except OSError as exc:
            raise FetchError(f"cannot write the model cache {cache}: {exc.strerror or exc}") from None
        try:
            model = tmp / "model"
            fetch_model(uri, model, ca_file=ca_file, env=env, say=say, dtype=dtype)
            (model / ENTRY_MARKER).write_text(json.dumps({
                "uri": source.display, "key": key, "dtype": dtype,
                "authenticated": credentials.header is not None,
                "fetched_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }, indent=1) + "\n")
            make_readable_by_all(model)
            os.replace(model, entry)
        except OSError as exc:
            raise FetchError(f"cannot write the model into the cache {cache}: {exc.strerror or exc}") from None
        finally:
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp)
        return entry, (f"{MISS}: downloaded {source.display} into {entry} ({human(_size(entry))}) in "
                       f"{time.monotonic() - started:.1f}s")
    finally:
        os.close(fd)  # releases the lock
