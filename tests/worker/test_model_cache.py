"""`baton model fetch --cache-dir`: the node-level model cache (worker/model_cache.py).

An https server in this process serves the tiny model (public under /models/, behind a bearer token under
/private/) and counts the requests per path; the weights answer slowly, so two fetches started together
overlap for sure.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from baton.e2e.pki import self_signed_cert
from baton.e2e.processes import https_server
from baton.worker.model_cache import ENTRY_MARKER, HIT, MISS, fetch_cached
from baton.worker.model_fetch import FetchError
from baton.worker.tiny import create_tiny_model

from baton import launch

BATON = str(Path(sys.executable).parent / "baton")
TOKEN = "cache-s3cret-token"
WEIGHTS = "model.safetensors"


class Server:
    def __init__(self, model: Path) -> None:
        self.model = model
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.base = ""
        self.ca = ""

    def answer(self, path: str, authorization: str | None) -> tuple[int, bytes]:
        with self.lock:
            self.hits[path] += 1
        if path.startswith("/private/"):
            if authorization != f"Bearer {TOKEN}":
                return 401, b"unauthorized"
            path = path.removeprefix("/private")
        name = path.removeprefix("/models/tiny/")
        if path.startswith("/models/tiny/") and (self.model / name).is_file():
            if name == WEIGHTS:
                time.sleep(0.5)  # a slow download: a concurrent fetch finds it under way
            return 200, (self.model / name).read_bytes()
        return 404, b"not found"

    def weight_gets(self) -> int:
        return sum(n for p, n in self.hits.items() if p.endswith(WEIGHTS))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache-server")
    state = Server(create_tiny_model(tmp / "tiny", seed=0))
    cert, key = self_signed_cert(tmp, "127.0.0.1")
    state.ca = cert.read_text()
    with https_server("127.0.0.1", state.answer, cert, key) as base:
        state.base = base
        yield state


def env(token: str | None = None, ca: str = "") -> dict[str, str]:
    out = {"BATON_MODEL_CA": ca}
    if token is not None:
        out["BATON_MODEL_TOKEN"] = token
    return out


# ------------------------------------------------------------------------------------------------ the key


def test_the_key_excludes_credentials_and_follows_uri_revision_and_dtype():
    key = launch.model_cache_key
    base = key("https://models.example/llama/")
    assert key("https://alice:s3cret@models.example/llama/") == base  # credentials never shape the key
    assert key("https://MODELS.example/llama/") == base  # the host's case does not matter
    assert "s3cret" not in base and "alice" not in base
    assert key("https://models.example/llama2/") != base
    assert key("https://models.example/llama/?version=2") != base
    assert key("hf://org/m@main") != key("hf://org/m@v2") != key("hf://org/m")
    assert key("hf://org/m/f.gguf") != key("hf://org/m/f.gguf", "bfloat16")
    assert base.startswith("m-") and len(base) == 42 and set(base[2:]) <= set("0123456789abcdef")


# ------------------------------------------------------------------------------------------------ fetches


def test_two_concurrent_fetches_download_once_and_both_get_the_entry(server, tmp_path):
    cache = tmp_path / "cache"
    uri = f"{server.base}/models/tiny/"
    before = server.weight_gets()
    results: list[tuple[Path, str]] = []
    errors: list[BaseException] = []
    said: list[str] = []

    def run() -> None:
        try:
            results.append(fetch_cached(uri, cache, env=env(ca=server.ca), say=said.append))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    umask = os.umask(0o077)  # a strict umask: the entry must still be readable by the worker's uid
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        os.umask(umask)
    assert not errors, errors
    assert server.weight_gets() - before == 1, server.hits  # downloaded once
    entry = cache / launch.model_cache_key(uri)
    assert sorted(r[0] for r in results) == [entry, entry]
    lines = sorted(r[1] for r in results)
    assert lines[0].startswith(f"{HIT}: reused {entry}") and "no download" in lines[0], lines
    assert lines[1].startswith(f"{MISS}: downloaded ") and " in " in lines[1], lines
    assert any("waiting for it" in s for s in said), said
    assert (entry / ENTRY_MARKER).is_file() and (entry / "config.json").is_file()
    assert (entry / WEIGHTS).read_bytes() == (server.model / WEIGHTS).read_bytes()
    assert [p.name for p in cache.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")] == []
    for p in [entry, *entry.rglob("*")]:  # the worker (another uid) reads what the fetch wrote
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o444 == 0o444 and (not p.is_dir() or mode & 0o111 == 0o111), (p, oct(mode))


def test_concurrent_cli_processes_download_once(server, tmp_path):
    cache = tmp_path / "cache"
    uri = f"{server.base}/models/tiny/"
    before = server.weight_gets()
    logs = [tmp_path / f"termination-log-{i}" for i in range(2)]
    procs = [subprocess.Popen([BATON, "model", "fetch", "--uri", uri, "--cache-dir", str(cache),
                               "--termination-log", str(log)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **env(ca=server.ca)}) for log in logs]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert server.weight_gets() - before == 1, server.hits
    assert sorted(o[0].split(":")[0] for o in outs) == [HIT, MISS], outs
    # the same outcome in each pod's termination message: its status says whether it downloaded
    assert sorted(log.read_text() for log in logs) == sorted(" ".join(o[0].split()) for o in outs)


def test_a_partial_entry_of_a_killed_fetch_is_never_used(server, tmp_path):
    cache = tmp_path / "cache"
    uri = f"{server.base}/models/tiny/"
    key = launch.model_cache_key(uri)
    entry = cache / key
    entry.mkdir(parents=True)  # what a fetch killed before its marker leaves, or a kubelet-made subPath folder
    (entry / "config.json").write_text("{}")
    leftover = cache / f".{key}.tmp-killed"
    (leftover / "model").mkdir(parents=True)
    (leftover / "model" / WEIGHTS).write_bytes(b"half")
    before = server.weight_gets()
    got, line = fetch_cached(uri, cache, env=env(ca=server.ca), say=lambda _: None)
    assert got == entry and line.startswith(MISS), line
    assert server.weight_gets() - before == 1
    assert (entry / WEIGHTS).read_bytes() == (server.model / WEIGHTS).read_bytes()
    assert json.loads((entry / ENTRY_MARKER).read_text())["key"] == key
    assert not leftover.exists()


def test_a_private_entry_is_reused_only_with_working_credentials(server, tmp_path):
    cache = tmp_path / "cache"
    uri = f"{server.base}/private/models/tiny/"
    entry, line = fetch_cached(uri, cache, env=env(TOKEN, server.ca), say=lambda _: None)
    assert line.startswith(MISS) and json.loads((entry / ENTRY_MARKER).read_text())["authenticated"] is True
    assert TOKEN not in (entry / ENTRY_MARKER).read_text()
    before = server.weight_gets()
    with pytest.raises(FetchError, match=r"refused the credentials \(HTTP 401\)"):
        fetch_cached(uri, cache, env=env("not-the-token", server.ca), say=lambda _: None)
    with pytest.raises(FetchError, match="requires credentials"):
        fetch_cached(uri, cache, env=env(None, server.ca), say=lambda _: None)
    _, line = fetch_cached(uri, cache, env=env(TOKEN, server.ca), say=lambda _: None)
    assert line.startswith(HIT), line
    assert server.weight_gets() == before  # checking access never downloads the weights


def test_a_public_entry_is_reused_without_any_request(server, tmp_path):
    cache = tmp_path / "cache"
    uri = f"{server.base}/models/tiny/"
    fetch_cached(uri, cache, env=env(ca=server.ca), say=lambda _: None)
    before = sum(server.hits.values())
    _, line = fetch_cached(uri, cache, env=env(ca=server.ca), say=lambda _: None)
    assert line.startswith(HIT) and sum(server.hits.values()) == before


def test_a_failed_fetch_leaves_no_entry(server, tmp_path):
    cache = tmp_path / "cache"
    uri = f"{server.base}/models/no-such-model/"
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch_cached(uri, cache, env=env(ca=server.ca), say=lambda _: None)
    assert [p.name for p in cache.iterdir()] == [f".{launch.model_cache_key(uri)}.lock"]


def test_the_cli_needs_exactly_one_of_dest_and_cache_dir(tmp_path):
    r = subprocess.run([BATON, "model", "fetch", "--uri", "https://x.example/m/", "--dest", str(tmp_path / "a"),
                        "--cache-dir", str(tmp_path / "b")], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and "not allowed with" in r.stderr
    assert launch.model_fetch_argv("hf://o/m", cache_dir="/c")[-2:] == [launch.Flag.CACHE_DIR, "/c"]
