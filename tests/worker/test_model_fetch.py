"""`baton model fetch` against a local HTTPS server with a self-signed certificate, through the real CLI.

The server (a thread of this process) serves a tiny model folder, a sharded one, tar.gz archives of them, a
folder that answers 401 unless the right credentials come, 404 for everything else, and a few broken things.
Each case runs `baton model fetch` as a subprocess, as the operator's init container does.
"""
from __future__ import annotations

import base64
import filecmp
import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from baton.e2e.pki import self_signed_cert
from baton.e2e.processes import https_server
from baton.worker import model_fetch
from baton.worker.model_fetch import MARKER, FetchError, fetch_model
from baton.worker.tiny import create_tiny_model

BATON = str(Path(sys.executable).parent / "baton")
TOKEN = "s3cret-token-value"
USER, PASSWORD = "alice", "pa55-word-value"
CREDENTIAL_ENV = ("BATON_MODEL_TOKEN", "HF_TOKEN", "BATON_MODEL_USERNAME", "BATON_MODEL_PASSWORD",
                  "BATON_MODEL_CA_FILE")


# ------------------------------------------------------------------------------------------------ fixtures


def tar_gz(folder: Path, top: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname=top)
    return buf.getvalue()


def evil_tar_gz() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = b"{}"
        for name in ("model/config.json", "../escaped.txt"):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class ModelServer:
    """What the handler serves, and a count of the requests per path (retries show up there)."""

    def __init__(self, folders: dict[str, Path], blobs: dict[str, bytes]) -> None:
        self.folders, self.blobs = folders, blobs
        self.hits: Counter[str] = Counter()
        self.flaky_left: Counter[str] = Counter()
        self.base = ""

    def answer(self, path: str, authorization: str | None) -> tuple[int, bytes]:
        self.hits[path] += 1
        if path.startswith("/private/"):
            allowed = {f"Bearer {TOKEN}", "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
            if authorization not in allowed:
                return 401, b"unauthorized"
            path = path.removeprefix("/private")
        if path.startswith("/flaky/"):
            path = path.removeprefix("/flaky")
            if self.flaky_left[path] > 0:
                self.flaky_left[path] -= 1
                return 503, b"try later"
        if path in self.blobs:
            return 200, self.blobs[path]
        prefix, _, name = path.rpartition("/")
        folder = self.folders.get(prefix)
        if folder is not None and name and (folder / name).is_file():
            return 200, (folder / name).read_bytes()
        return 404, b"not found"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fetch-server")
    tiny = create_tiny_model(tmp / "tiny", seed=0)
    sharded = create_tiny_model(tmp / "sharded", seed=1, num_shards=2)
    state = ModelServer(
        folders={"/models/tiny": tiny, "/models/sharded": sharded, "/org/tiny/resolve/main": tiny},
        blobs={
            "/archives/tiny.tar.gz": tar_gz(tiny, "tiny"),
            "/archives/flat.tar": tar_gz(sharded, "."),  # a .tar URI holding gzip: tarfile detects it
            "/archives/evil.tar.gz": evil_tar_gz(),
            "/archives/broken.tgz": b"this is not a tar archive at all" * 10,
        },
    )
    cert, key = self_signed_cert(tmp, "127.0.0.1")

    with https_server("127.0.0.1", state.answer, cert, key) as base:
        state.base = base
        state.cert = cert
        state.tiny, state.sharded = tiny, sharded
        yield state


def fetch(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`baton model fetch ARGS` with a clean credential environment plus `env`."""
    base_env = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_ENV}
    return subprocess.run([BATON, "model", "fetch", *args], capture_output=True, text=True, timeout=120,
                          env={**base_env, **(env or {})}, check=False)


def same_files(source: Path, dest: Path) -> None:
    names = sorted(p.name for p in source.iterdir())
    assert sorted(p.name for p in dest.iterdir() if p.name != MARKER) == names
    _, mismatch, errors = filecmp.cmpfiles(source, dest, names, shallow=False)
    assert (mismatch, errors) == ([], [])


def error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("baton model: error: ")
    return last.removeprefix("baton model: error: ")


# ------------------------------------------------------------------------------------------------ success


def test_fetches_a_model_folder_then_does_nothing_the_second_time(server, tmp_path):
    dest = tmp_path / "models" / "tiny"
    uri = f"{server.base}/models/tiny/"
    r = fetch("--uri", uri, "--dest", str(dest), "--ca-file", str(server.cert))
    assert r.returncode == 0, r.stderr
    assert f"fetched {uri} into {dest}" in r.stdout
    same_files(server.tiny, dest)
    assert json.loads((dest / MARKER).read_text())["uri"] == uri
    assert "model.safetensors: " in r.stderr  # progress: bytes per file
    assert not [p for p in dest.parent.iterdir() if p != dest], "staging folders left behind"

    before = sum(server.hits.values())
    again = fetch("--uri", uri, "--dest", str(dest), "--ca-file", str(server.cert))
    assert again.returncode == 0, again.stderr
    assert "nothing to fetch" in again.stdout
    assert sum(server.hits.values()) == before  # not one request


def test_fetches_a_sharded_model_by_its_index(server, tmp_path):
    dest = tmp_path / "sharded"
    r = fetch("--uri", f"{server.base}/models/sharded", "--dest", str(dest),
              env={"BATON_MODEL_CA_FILE": str(server.cert)})
    assert r.returncode == 0, r.stderr
    assert (dest / "model.safetensors.index.json").is_file() and not (dest / "model.safetensors").exists()
    same_files(server.sharded, dest)


@pytest.mark.parametrize("archive, model", [("tiny.tar.gz", "tiny"), ("flat.tar", "sharded")])
def test_fetches_and_extracts_an_archive(server, tmp_path, archive, model):
    dest = tmp_path / "out"
    r = fetch("--uri", f"{server.base}/archives/{archive}", "--dest", str(dest), "--ca-file", str(server.cert))
    assert r.returncode == 0, r.stderr
    same_files(getattr(server, model), dest)


def test_a_new_uri_replaces_an_earlier_fetch(server, tmp_path):
    dest = tmp_path / "m"
    assert fetch("--uri", f"{server.base}/models/tiny/", "--dest", str(dest), "--ca-file", str(server.cert)
                 ).returncode == 0
    r = fetch("--uri", f"{server.base}/models/sharded/", "--dest", str(dest), "--ca-file", str(server.cert))
    assert r.returncode == 0, r.stderr
    same_files(server.sharded, dest)


def test_5xx_is_retried_with_backoff(server, tmp_path):
    server.flaky_left["/models/tiny/config.json"] = 1
    r = fetch("--uri", f"{server.base}/flaky/models/tiny/", "--dest", str(tmp_path / "m"),
              "--ca-file", str(server.cert))
    assert r.returncode == 0, r.stderr
    assert "HTTP 503" in r.stderr and "retrying in" in r.stderr
    assert server.hits["/flaky/models/tiny/config.json"] == 2


@pytest.mark.parametrize("env", [{"BATON_MODEL_TOKEN": TOKEN}, {"HF_TOKEN": TOKEN},
                                 {"BATON_MODEL_USERNAME": USER, "BATON_MODEL_PASSWORD": PASSWORD}])
def test_credentials_from_the_secret_are_sent_and_never_printed(server, tmp_path, env):
    dest = tmp_path / "m"
    r = fetch("--uri", f"{server.base}/private/models/tiny/", "--dest", str(dest), "--ca-file", str(server.cert),
              env=env)
    assert r.returncode == 0, r.stderr
    same_files(server.tiny, dest)
    for secret in env.values():
        assert secret not in r.stdout + r.stderr + (dest / MARKER).read_text()


# ------------------------------------------------------------------------------------------------ failures


def test_404_is_one_line_exit_1_and_the_termination_message(server, tmp_path):
    dest, log = tmp_path / "m", tmp_path / "termination-log"
    r = fetch("--uri", f"{server.base}/missing/", "--dest", str(dest), "--ca-file", str(server.cert),
              "--termination-log", str(log))
    message = error_line(r)
    assert message == f"config.json not found (HTTP 404): {server.base}/missing/config.json"
    assert log.read_text() == message
    assert server.hits["/missing/config.json"] == 1  # 4xx: no retry
    assert not dest.exists() and list(tmp_path.iterdir()) == [log]  # nothing half-written


def test_a_missing_archive_is_404(server, tmp_path):
    r = fetch("--uri", f"{server.base}/archives/nope.tar.gz", "--dest", str(tmp_path / "m"),
              "--ca-file", str(server.cert), "--termination-log", str(tmp_path / "log"))
    assert error_line(r) == f"the model archive not found (HTTP 404): {server.base}/archives/nope.tar.gz"


@pytest.mark.parametrize("userinfo, env, says", [
    ("", {}, "requires credentials (HTTP 401)"),
    ("user:urlpass@", {}, "refused the credentials (HTTP 401)"),
    ("", {"BATON_MODEL_TOKEN": "wrong-token-value"}, "refused the credentials (HTTP 401)"),
    ("user:urlpass@", {"BATON_MODEL_TOKEN": "wrong-token-value"}, "refused the credentials (HTTP 401)"),
])
def test_401_names_the_secret(server, tmp_path, userinfo, env, says):
    log = tmp_path / "termination-log"
    r = fetch("--uri", f"https://{userinfo}{server.base.removeprefix('https://')}/private/models/tiny/",
              "--dest", str(tmp_path / "m"), "--ca-file", str(server.cert), "--termination-log", str(log),
              env=env)
    message = error_line(r)
    assert says in message and "spec.model.source.secretRef" in message
    assert f"{server.base}/private/models/tiny/config.json" in message  # the URL, without user:password@
    assert "urlpass" not in r.stderr + r.stdout and "wrong-token-value" not in r.stderr + r.stdout
    assert log.read_text() == message
    assert server.hits["/private/models/tiny/config.json"] >= 1


def test_an_untrusted_certificate_is_a_tls_error(server, tmp_path):
    r = fetch("--uri", f"{server.base}/models/tiny/", "--dest", str(tmp_path / "m"),
              "--termination-log", str(tmp_path / "log"))
    message = error_line(r)
    assert message.startswith(f"TLS error talking to {server.base}: certificate verify failed")
    assert "--ca-file" in message


def test_a_refused_connection_is_retried_then_one_line(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    slept: list[float] = []
    monkeypatch.setattr(model_fetch, "_sleep", slept.append)
    with pytest.raises(FetchError) as err:
        fetch_model(f"http://127.0.0.1:{port}/m/", tmp_path / "m", env={}, say=lambda line: None)
    assert f"cannot download http://127.0.0.1:{port}/m/config.json" in str(err.value)
    assert "gave up after 4 attempts" in str(err.value)
    assert slept == [1.0, 2.0, 4.0]


def test_an_archive_with_a_path_outside_is_refused(server, tmp_path):
    dest = tmp_path / "inner" / "m"
    r = fetch("--uri", f"{server.base}/archives/evil.tar.gz", "--dest", str(dest), "--ca-file", str(server.cert),
              "--termination-log", str(tmp_path / "log"))
    assert "member '../escaped.txt' has '..' in its path" in error_line(r)
    assert not list(tmp_path.rglob("escaped.txt")) and not dest.exists()


def test_a_broken_archive_is_one_line(server, tmp_path):
    r = fetch("--uri", f"{server.base}/archives/broken.tgz", "--dest", str(tmp_path / "m"),
              "--ca-file", str(server.cert), "--termination-log", str(tmp_path / "log"))
    assert "is not a readable tar archive" in error_line(r)


def test_a_foreign_non_empty_dest_is_left_alone(server, tmp_path):
    dest = tmp_path / "m"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    r = fetch("--uri", f"{server.base}/models/tiny/", "--dest", str(dest), "--ca-file", str(server.cert),
              "--termination-log", str(tmp_path / "log"))
    assert "is not empty and was not written by `baton model fetch`" in error_line(r)
    assert [p.name for p in dest.iterdir()] == ["notes.txt"]


# ------------------------------------------------------------------------------------------------ in-process


def test_into_a_mount_point_the_files_are_moved_in(server, tmp_path, monkeypatch):
    """The operator mounts an emptyDir at --dest, which cannot be renamed: staging happens inside it."""
    dest = tmp_path / "models"
    dest.mkdir()
    monkeypatch.setattr(model_fetch.os.path, "ismount", lambda p: Path(p) == dest)
    first = fetch_model(server.tiny.as_uri(), dest, env={}, say=lambda line: None)
    assert first.startswith("fetched")
    same_files(server.tiny, dest)
    second = fetch_model(server.sharded.as_uri(), dest, env={}, say=lambda line: None)
    assert second.startswith("fetched")
    same_files(server.sharded, dest)
    assert "nothing to fetch" in fetch_model(server.sharded.as_uri(), dest, env={}, say=lambda line: None)


def test_the_default_termination_log_is_only_written_where_kubernetes_made_it(tmp_path, monkeypatch):
    made = tmp_path / "termination-log"
    model_fetch.write_termination_log(str(made), "boom")
    assert made.read_text() == "boom"
    missing = tmp_path / "nope" / "termination-log"
    model_fetch.write_termination_log(str(missing), "boom")  # no folder: nothing, no error
    assert not missing.exists()
    monkeypatch.setattr(model_fetch, "DEFAULT_TERMINATION_LOG", str(tmp_path / "default-log"))
    model_fetch.write_termination_log(str(tmp_path / "default-log"), "boom")
    assert not (tmp_path / "default-log").exists()


@pytest.mark.parametrize("name, kind, link, problem", [
    ("/etc/passwd", tarfile.REGTYPE, "", "absolute path"),
    ("a/../../x", tarfile.REGTYPE, "", "'..'"),
    ("a/link", tarfile.SYMTYPE, "../../etc", "links outside"),
    ("a/link", tarfile.SYMTYPE, "/etc/passwd", "absolute path"),
    ("hard", tarfile.LNKTYPE, "../x", "links outside"),
    ("dev", tarfile.CHRTYPE, "", "device"),
])
def test_unsafe_members_are_named(name, kind, link, problem):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    assert problem in (model_fetch._unsafe(info) or "")


def test_safe_links_inside_the_archive_pass():
    info = tarfile.TarInfo("a/b/link")
    info.type, info.linkname = tarfile.SYMTYPE, "../c"
    assert model_fetch._unsafe(info) is None


def test_hf_uris_resolve_to_hub_folder_urls():
    from baton.worker.model_fetch import FetchError, hub_url

    assert hub_url("hf://Qwen/Qwen2.5-7B-Instruct") == "https://huggingface.co/Qwen/Qwen2.5-7B-Instruct/resolve/main/"
    assert hub_url("hf://org/m@v1.0", "https://mirror.local/") == "https://mirror.local/org/m/resolve/v1.0/"
    assert hub_url("https://x/y.tar.gz") == "https://x/y.tar.gz"
    import pytest

    with pytest.raises(FetchError, match="hf://ORG/MODEL"):
        hub_url("hf://just-a-name")


def test_hf_uri_fetches_through_the_hub_layout(server, tmp_path):
    """hf://ORG/MODEL resolves like the Hub's file URLs (HF_ENDPOINT points at a local https server here)."""
    dest = tmp_path / "hub"
    r = fetch("--uri", "hf://org/tiny", "--dest", str(dest), "--ca-file", str(server.cert),
              env={"HF_ENDPOINT": server.base})
    assert r.returncode == 0, r.stderr
    same_files(server.tiny, dest)


def test_ca_from_the_environment_pem(server, tmp_path):
    """BATON_MODEL_CA holds the PEM itself (how a Secret reaches the init container through envFrom)."""
    dest = tmp_path / "pem"
    r = fetch("--uri", f"{server.base}/models/tiny/", "--dest", str(dest),
              env={"BATON_MODEL_CA": Path(server.cert).read_text()})
    assert r.returncode == 0, r.stderr
    same_files(server.tiny, dest)
    bad = fetch("--uri", f"{server.base}/models/tiny/", "--dest", str(tmp_path / "x"),
                env={"BATON_MODEL_CA": "not a certificate"})
    assert "BATON_MODEL_CA is not a PEM certificate" in error_line(bad)
