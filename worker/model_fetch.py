"""`baton model fetch`: download a model into a folder, for the worker pods' `fetch-model` init container.

    baton model fetch --uri https://models.example.com/llama-3-8b/ --dest /models
    baton model fetch --uri https://models.example.com/llama-3-8b.tar.gz --dest /models

The operator renders this command when an LLMService's model comes from a URI (operator/render.py,
`_fetch_model_container`) and passes the Secret of `spec.model.source.secretRef` as environment variables, so the
credentials are env vars: `BATON_MODEL_TOKEN` or `HF_TOKEN` (a bearer token), or `BATON_MODEL_USERNAME` +
`BATON_MODEL_PASSWORD` (basic auth). They are never printed.

What the URI names:
  * a `.tar`, `.tar.gz` or `.tgz` archive: downloaded and extracted (members with absolute paths, `..`, links
    that leave the archive or device files are refused); the model may sit at the top or in one top folder;
  * a `.gguf` file (also hf://ORG/MODEL[@REVISION]/FILE.gguf): downloaded and converted into a safetensors
    model folder (dequantized to float32, or bfloat16 with --dtype; `gguf_import.py`);
  * anything else: the base "folder" URL of a Hugging Face-style model (e.g. `.../resolve/main/`), from which
    config.json, the tokenizer files and model.safetensors (or model.safetensors.index.json and every shard it
    names) are fetched.

The download goes to a staging folder on the same filesystem and is renamed into place only once config.json
(and every shard the index names) is there, so a pod never sees half a model; a marker file records the URI,
so a restarted init container with a complete download does nothing. When --dest is a mount point (the
operator mounts an emptyDir at /models) it cannot be renamed: the files are then staged inside it and moved
in, with the marker written last.

Failures are one line, exit status 1, and the same line goes to the Kubernetes termination-message file so the
operator can show it in the LLMService's status. Connection errors and 5xx answers are retried a few times;
4xx answers never are (a wrong token does not get better).
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import ssl
import sys
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO

import httpx

#: Written into --dest last; names the URI the folder holds (see `already_fetched`).
MARKER = ".baton-model-source"
#: Present in --dest while files are moved into a mount point: a crash there still leaves the folder ours.
INCOMPLETE = ".baton-model-incomplete"
REQUIRED_FILE = "config.json"
#: Fetched when present: the Baton engine and vLLM read these next to config.json.
OPTIONAL_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
GGUF_SUFFIX = ".gguf"

#: Retries after the first attempt, for connection errors and 5xx only; the waits between them.
RETRIES = 3
BACKOFF_SECONDS = (1.0, 2.0, 4.0)
#: At most one progress line per file this often (init container logs stay readable).
PROGRESS_INTERVAL_SECONDS = 5.0
TIMEOUT = httpx.Timeout(30.0, read=120.0)
_sleep = time.sleep  # the backoff's clock (tests replace it)
CHUNK_BYTES = 1 << 20

#: Kubernetes mounts this file in every container; what it holds becomes the container's termination message.
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
TERMINATION_LOG_LIMIT = 4096  # the kubelet keeps at most 4 KiB
SECRET_HINT = "check the Secret named in spec.model.source.secretRef"
CREDENTIAL_VARS = "BATON_MODEL_TOKEN, HF_TOKEN or BATON_MODEL_USERNAME/BATON_MODEL_PASSWORD"


class FetchError(Exception):
    """A failure the user can act on; its message is the one line they see (no URL credentials in it)."""


class _Retryable(Exception):
    """A connection error or a 5xx answer: worth another attempt."""


# ------------------------------------------------------------------------------------------------ the URI


@dataclass(frozen=True)
class Source:
    """The --uri, split into what is fetched and what may be shown."""

    url: str  # without user:password@
    scheme: str
    display: str  # also without query values (pre-signed URLs carry signatures there)
    userinfo: tuple[str, str] | None
    archive: bool
    gguf: bool = False
    variant: str = ""  # what else shapes the result (a .gguf's target dtype): part of the identity

    @classmethod
    def parse(cls, uri: str, hub: str | None = None) -> Source:
        uri = hub_url(uri.strip(), hub)
        parts = urllib.parse.urlsplit(uri)
        scheme = parts.scheme.lower()
        if scheme not in ("https", "http", "file"):
            raise FetchError(f"--uri {redact(uri)}: unsupported scheme {scheme or '(none)'!r}; use hf://, "
                             "https://, http:// or file://")
        if scheme != "file" and not parts.hostname:
            raise FetchError(f"--uri {redact(uri)} has no host")
        userinfo = None
        if parts.username is not None:
            userinfo = (urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or ""))
        netloc = parts.netloc.rpartition("@")[2]
        url = urllib.parse.urlunsplit((scheme, netloc, parts.path, parts.query, ""))
        archive = parts.path.lower().endswith(ARCHIVE_SUFFIXES)
        return cls(url=url, scheme=scheme, display=redact(url), userinfo=userinfo, archive=archive,
                   gguf=parts.path.lower().endswith(GGUF_SUFFIX))

    def identity(self) -> str:
        """What the marker records: a hash, so neither a password nor a URL signature lands on disk."""
        return hashlib.sha256((self.url + (f"\0{self.variant}" if self.variant else "")).encode()).hexdigest()

    def file_url(self, name: str) -> str:
        """The URL of `name` inside the base folder URL (the query, if any, is kept)."""
        parts = urllib.parse.urlsplit(self.url)
        path = parts.path if parts.path.endswith("/") else parts.path + "/"
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path + urllib.parse.quote(name),
                                        parts.query, ""))


#: where hf://ORG/MODEL[@REVISION] points: the Hugging Face Hub's file URLs (env HF_ENDPOINT overrides, as the
#: Hub's own client allows, e.g. for a mirror)
DEFAULT_HUB = "https://huggingface.co"


def hub_url(uri: str, hub: str | None = None) -> str:
    """``hf://ORG/MODEL[@REVISION]`` -> the Hub folder URL its files resolve under (``.../FILE.gguf`` or an
    archive after it: that file's URL); other URIs unchanged. Pure."""
    if not uri.lower().startswith("hf://"):
        return uri
    parts = uri[len("hf://"):].strip("/").split("/")
    repo, _, revision = "/".join(parts[:2]).partition("@")
    file = "/".join(parts[2:])
    if len(parts) < 2 or not all(parts) or (file and not file.lower().endswith((GGUF_SUFFIX, *ARCHIVE_SUFFIXES))):
        raise FetchError(f"--uri {uri}: expected hf://ORG/MODEL or hf://ORG/MODEL@REVISION (or "
                         "hf://ORG/MODEL[@REVISION]/FILE.gguf)")
    base = (hub or DEFAULT_HUB).rstrip("/")
    return f"{base}/{repo}/resolve/{urllib.parse.quote(revision or 'main', safe='')}/{urllib.parse.quote(file)}"


def redact(url: str) -> str:
    """`url` without user:password@ and with query values replaced by `***`."""
    try:
        parts = urllib.parse.urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
        query = "&".join(f"{kv.partition('=')[0]}=***" for kv in parts.query.split("&") if kv)
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    except ValueError:
        return "(an unparsable URI)"


# ------------------------------------------------------------------------------------------------ credentials


@dataclass(frozen=True)
class Credentials:
    """What goes into the Authorization header, and where it came from (for the log; never the value)."""

    header: str | None
    origin: str

    @classmethod
    def from_env(cls, env: Mapping[str, str], source: Source) -> Credentials:
        token = env.get("BATON_MODEL_TOKEN", "").strip()
        if token:
            return cls(f"Bearer {token}", "a bearer token from BATON_MODEL_TOKEN")
        user, password = env.get("BATON_MODEL_USERNAME", ""), env.get("BATON_MODEL_PASSWORD", "")
        if user or password:
            if not (user and password):
                missing = "BATON_MODEL_PASSWORD" if user else "BATON_MODEL_USERNAME"
                raise FetchError(f"{missing} is not set but its partner is; {SECRET_HINT}")
            return cls(_basic(user, password), "basic auth from BATON_MODEL_USERNAME")
        token = env.get("HF_TOKEN", "").strip()
        if token:
            return cls(f"Bearer {token}", "a bearer token from HF_TOKEN")
        if source.userinfo is not None:
            return cls(_basic(*source.userinfo), "basic auth from the URI")
        return cls(None, "no credentials")


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def ssl_context(ca_file: str | None, ca_pem: str | None = None) -> ssl.SSLContext | bool:
    """Verify TLS always; `ca_file` adds a private CA to the usual trust store (certifi or SSL_CERT_FILE), and
    so does `ca_pem`, the CA's PEM text itself (env BATON_MODEL_CA: a Secret's key reaches a pod as an env var
    through `secretRef`, a file would need a volume)."""
    if ca_pem:
        ctx = httpx.create_ssl_context()
        try:
            ctx.load_verify_locations(cadata=ca_pem)
        except (ssl.SSLError, ValueError) as exc:
            raise FetchError(f"BATON_MODEL_CA is not a PEM certificate: {exc}") from None
        if ca_file:
            ctx.load_verify_locations(cafile=ca_file)
        return ctx
    if not ca_file:
        return True
    if not Path(ca_file).is_file():
        raise FetchError(f"the CA file {ca_file} (--ca-file / BATON_MODEL_CA_FILE) does not exist")
    ctx = httpx.create_ssl_context()
    try:
        ctx.load_verify_locations(cafile=ca_file)
    except (ssl.SSLError, OSError) as exc:
        raise FetchError(f"cannot load the CA file {ca_file}: {exc}") from None
    return ctx


# ------------------------------------------------------------------------------------------------ progress


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Progress:
    """Bytes done/total of one file on stderr, at most one line every PROGRESS_INTERVAL_SECONDS."""

    def __init__(self, name: str, total: int | None, say: Callable[[str], None]) -> None:
        self.name, self.total, self.say = name, total, say
        self.done = 0
        self.started = self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= PROGRESS_INTERVAL_SECONDS:
            self.last = now
            if self.total:
                self.say(f"{self.name}: {human(self.done)} / {human(self.total)} "
                         f"({100 * self.done // self.total}%)")
            else:
                self.say(f"{self.name}: {human(self.done)}")

    def finish(self) -> None:
        self.say(f"{self.name}: {human(self.done)} in {time.monotonic() - self.started:.1f}s")


# ------------------------------------------------------------------------------------------------ downloads


class Downloader:
    """GETs single files (https, http or file) into local paths, with retries, progress and one-line errors."""

    def __init__(self, credentials: Credentials, verify: ssl.SSLContext | bool,
                 say: Callable[[str], None], sleep: Callable[[float], None] | None = None) -> None:
        self.credentials = credentials
        self.say = say
        self.sleep = sleep or _sleep
        headers = {"Authorization": credentials.header} if credentials.header else {}
        # httpx drops the Authorization header when a redirect leaves the origin (hub -> CDN), as it should.
        self.client = httpx.Client(verify=verify, timeout=TIMEOUT, follow_redirects=True, headers=headers)

    def close(self) -> None:
        self.client.close()

    def get(self, url: str, target: Path, what: str, *, optional: bool = False) -> bool:
        """Download `url` into `target`; False when `optional` and it is not there (404)."""
        if url.startswith("file:"):
            return self._copy_local(url, target, what, optional)
        attempts = 1 + RETRIES
        for attempt in range(attempts):
            try:
                return self._attempt(url, target, what, optional)
            except _Retryable as exc:
                if attempt == attempts - 1:
                    raise FetchError(f"{exc} (gave up after {attempts} attempts)") from None
                wait = BACKOFF_SECONDS[min(attempt, len(BACKOFF_SECONDS) - 1)]
                self.say(f"{exc}; retrying in {wait:.0f}s")
                self.sleep(wait)
        raise AssertionError("unreachable")

    def _attempt(self, url: str, target: Path, what: str, optional: bool) -> bool:
        shown = redact(url)
        try:
            with self.client.stream("GET", url) as response:
                status = response.status_code
                if status == 404:
                    if optional:
                        return False
                    raise FetchError(f"{what} not found (HTTP 404): {shown}")
                if status in (401, 403):
                    raise FetchError(self._refused(status, shown))
                if status >= 500:
                    raise _Retryable(f"the server answered HTTP {status} for {shown}")
                if status >= 400:
                    raise FetchError(f"the server answered HTTP {status} for {what}: {shown}")
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                with open(target, "wb") as out:
                    self._pump(response.iter_bytes(CHUNK_BYTES), out, _basename(url), total)
                return True
        except httpx.TransportError as exc:
            tls = _ssl_error(exc)
            if tls is not None:
                raise FetchError(f"TLS error talking to {_origin(url)}: {tls} (to trust a private CA use "
                                 "--ca-file or BATON_MODEL_CA_FILE)") from None
            raise _Retryable(f"cannot download {shown}: {_transport_message(exc)}") from None

    def _refused(self, status: int, shown: str) -> str:
        if self.credentials.header is None:
            return (f"the server requires credentials (HTTP {status}) for {shown} and none were given: set "
                    f"{CREDENTIAL_VARS} in the Secret named in spec.model.source.secretRef")
        return (f"the server refused the credentials (HTTP {status}) for {shown} ({self.credentials.origin}); "
                f"{SECRET_HINT}")

    def _copy_local(self, url: str, target: Path, what: str, optional: bool) -> bool:
        path = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
        try:
            with open(path, "rb") as src, open(target, "wb") as out:
                self._pump(iter(lambda: src.read(CHUNK_BYTES), b""), out, path.name, path.stat().st_size)
        except FileNotFoundError:
            if optional:
                return False
            raise FetchError(f"{what} not found: {url}") from None
        except IsADirectoryError:
            raise FetchError(f"{what} is a folder, not a file: {url}") from None
        except _Retryable as exc:  # the file changed while being copied
            raise FetchError(str(exc)) from None
        return True

    def _pump(self, chunks, out: IO[bytes], name: str, total: int | None) -> None:
        progress = Progress(name, total, self.say)
        for chunk in chunks:
            out.write(chunk)
            progress.update(len(chunk))
        if total is not None and progress.done != total:
            raise _Retryable(f"{name}: the download stopped after {progress.done} of {total} bytes")
        progress.finish()


def _ssl_error(exc: BaseException) -> str | None:
    """The TLS failure inside an httpx error, if that is what it is (not worth retrying)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"certificate verify failed: {seen.verify_message}"
        if isinstance(seen, ssl.SSLError):
            return seen.reason or str(seen)
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    return text if "CERTIFICATE_VERIFY_FAILED" in text or "[SSL" in text else None


def _transport_message(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    return str(exc) or type(exc).__name__


def _basename(url: str) -> str:
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path.rstrip("/").rpartition("/")[2]) or url


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


# ------------------------------------------------------------------------------------------------ archives


def extract_archive(archive: Path, into: Path, shown: str) -> None:
    """Extract a tar (optionally gzip) archive, refusing any member that could write outside `into`."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                problem = _unsafe(member)
                if problem:
                    raise FetchError(f"the model archive {shown} is refused: member {member.name!r} {problem}")
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: the same rules, enforced by tarfile too
                tar.extractall(into, members=members, filter="data")
            else:  # pragma: no cover - older Pythons; `_unsafe` has already vetted every member
                tar.extractall(into, members=members)
    except tarfile.ReadError as exc:  # tarfile lists each compression it tried, one per line: keep the gist
        why = "not tar, tar.gz, tar.bz2 or tar.xz" if "could not be opened" in str(exc) else str(exc)
        raise FetchError(f"the model archive {shown} is not a readable tar archive ({why})") from None
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise FetchError(f"the model archive {shown} is not a readable tar archive ({exc})") from None
    except OSError as exc:
        if "gzip" in str(exc).lower():  # "Not a gzipped file"
            raise FetchError(f"the model archive {shown} is not a readable tar archive ({exc})") from None
        raise FetchError(f"cannot extract the model archive {shown}: {exc}") from None


def _unsafe(member: tarfile.TarInfo) -> str | None:
    name = PurePosixPath(member.name)
    if member.name.startswith(("/", "\\")) or name.is_absolute():
        return "has an absolute path"
    if ".." in name.parts:
        return "has '..' in its path"
    if member.isdev() or member.isfifo():
        return "is a device or FIFO"
    if member.issym() or member.islnk():
        link = PurePosixPath(member.linkname)
        if link.is_absolute():
            return f"links to an absolute path ({member.linkname})"
        # A symlink is relative to its own folder, a hard link to the archive's top.
        base = name.parent if member.issym() else PurePosixPath()
        depth = 0
        for part in (*base.parts, *link.parts):
            depth += -1 if part == ".." else (0 if part == "." else 1)
            if depth < 0:
                return f"links outside the archive ({member.linkname})"
    return None


def _model_root(folder: Path, shown: str) -> Path:
    """Where config.json is: the archive's top, or its single top-level folder."""
    if (folder / REQUIRED_FILE).is_file():
        return folder
    entries = [p for p in folder.iterdir() if not p.name.startswith(".baton-")]
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / REQUIRED_FILE).is_file():
        return entries[0]
    raise FetchError(f"the model archive {shown} has no {REQUIRED_FILE} at its top or in a single top-level "
                     "folder")


# ------------------------------------------------------------------------------------------------ checks


def verify_model(root: Path, shown: str) -> None:
    """config.json parses, and every shard the safetensors index names is there."""
    try:
        json.loads((root / REQUIRED_FILE).read_text())
    except FileNotFoundError:
        raise FetchError(f"{shown} has no {REQUIRED_FILE}") from None
    except (ValueError, UnicodeDecodeError):
        raise FetchError(f"{REQUIRED_FILE} from {shown} is not JSON (an error page?)") from None
    index = root / INDEX_FILE
    if index.is_file():
        missing = [s for s in index_shards(index, shown) if not (root / s).is_file()]
        if missing:
            raise FetchError(f"{shown}: {INDEX_FILE} names shards that are missing: {', '.join(missing[:5])}")


def index_shards(index: Path, shown: str) -> list[str]:
    """The shard files a safetensors index names, each a plain file name (nothing that walks out)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise FetchError(f"{INDEX_FILE} from {shown} is not a safetensors index (no weight_map)") from None
    for shard in shards:
        if not isinstance(shard, str) or shard in ("", ".", "..") or "/" in shard or "\\" in shard:
            raise FetchError(f"{INDEX_FILE} from {shown} names a shard that is not a file name: {shard!r}")
    return shards


def already_fetched(dest: Path, source: Source) -> bool:
    """--dest holds a complete download of the same URI (config.json and our marker naming it)."""
    try:
        marker = json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (dest / REQUIRED_FILE).is_file() and isinstance(marker, dict) \
        and marker.get("uri_sha256") == source.identity()


def _marker_text(source: Source, root: Path) -> str:
    files = {p.relative_to(root).as_posix(): p.stat().st_size
             for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".baton-")}
    return json.dumps({
        "uri": source.display,
        "uri_sha256": source.identity(),
        "fetched_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": files,
    }, indent=1) + "\n"


# ------------------------------------------------------------------------------------------------ placing


STAGING_PREFIX = ".baton-fetch-"
OLD_PREFIX = ".baton-old-"


def _ours(dest: Path) -> bool:
    """Everything in `dest` is from an earlier fetch (or it is empty): safe to replace."""
    entries = [p for p in dest.iterdir() if not p.name.startswith((STAGING_PREFIX, OLD_PREFIX))]
    return not entries or (dest / MARKER).is_file() or (dest / INCOMPLETE).is_file()


def _staging(dest: Path) -> tuple[Path, bool]:
    """A new empty folder on dest's filesystem, and whether it is inside dest (dest cannot be renamed)."""
    if not os.path.ismount(dest):
        sibling_prefix = f".{dest.name}{STAGING_PREFIX}"
        with contextlib.suppress(OSError):  # e.g. dest is the top of a volume in a read-only parent
            dest.parent.mkdir(parents=True, exist_ok=True)
            _remove_leftovers(dest.parent, sibling_prefix)
            _remove_leftovers(dest.parent, f".{dest.name}{OLD_PREFIX}")
            return Path(tempfile.mkdtemp(prefix=sibling_prefix, dir=dest.parent)), False
    dest.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(dest, STAGING_PREFIX)
    _remove_leftovers(dest, OLD_PREFIX)
    return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=dest)), True


def _remove_leftovers(folder: Path, prefix: str) -> None:
    """Staging folders of a run that was killed (an init container restarted with the same emptyDir)."""
    for p in folder.glob(prefix + "*"):
        shutil.rmtree(p, ignore_errors=True)


def _place(root: Path, staging: Path, dest: Path, in_place: bool, marker: str) -> None:
    """Make `root` (inside `staging`) the content of `dest`, the marker arriving last."""
    if not in_place:
        (root / MARKER).write_text(marker)
        if dest.is_dir() and any(dest.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}{OLD_PREFIX}", dir=dest.parent))
            os.replace(dest, old / "model")
            os.replace(root, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(root, dest)  # an empty dest folder is replaced atomically by rename(2)
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        return
    # dest is a mount point: clear it (marker first, so a crash here never looks complete), move files in.
    (dest / INCOMPLETE).touch()
    (dest / MARKER).unlink(missing_ok=True)
    old = Path(tempfile.mkdtemp(prefix=OLD_PREFIX, dir=dest))
    for p in list(dest.iterdir()):
        if p not in (staging, old) and p.name != INCOMPLETE:
            os.replace(p, old / p.name)
    for p in list(root.iterdir()):
        os.replace(p, dest / p.name)
    tmp = dest / f"{STAGING_PREFIX}marker"
    tmp.write_text(marker)
    os.replace(tmp, dest / MARKER)
    (dest / INCOMPLETE).unlink()
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ the command


def fetch_model(uri: str, dest: Path, *, ca_file: str | None = None, env: Mapping[str, str] | None = None,
                say: Callable[[str], None] | None = None, dtype: str = "float32") -> str:
    """Fetch `uri` into `dest`; the sentence to print on success. Raises FetchError. `dtype`: a .gguf's."""
    env = os.environ if env is None else env
    say = say or (lambda line: print(f"baton model fetch: {line}", file=sys.stderr, flush=True))
    dest = Path(os.path.abspath(dest))  # `.` or `..` would have no name to stage next to
    source = Source.parse(uri, hub=env.get("HF_ENDPOINT"))
    if source.gguf and dtype != "float32":
        source = dataclasses.replace(source, variant=dtype)
    if dest.exists() and not dest.is_dir():
        raise FetchError(f"--dest {dest} exists and is not a folder")
    if already_fetched(dest, source):
        return f"{dest} already holds {source.display}; nothing to fetch"
    if dest.is_dir() and not _ours(dest):
        raise FetchError(f"--dest {dest} is not empty and was not written by `baton model fetch`; empty it or "
                         "choose another folder")
    credentials = Credentials.from_env(env, source)
    verify = ssl_context(ca_file or env.get("BATON_MODEL_CA_FILE") or None, env.get("BATON_MODEL_CA") or None)
    try:
        staging, in_place = _staging(dest)
    except OSError as exc:
        raise FetchError(f"cannot write to --dest {dest}: {exc.strerror or exc}") from None
    say(f"fetching {source.display} into {dest} ({credentials.origin})")
    downloader = Downloader(credentials, verify, say)
    try:
        if source.gguf:
            from baton.worker.gguf_import import fetch_gguf

            root = fetch_gguf(downloader, source, staging, dtype)
        elif source.archive:
            root = _fetch_archive(downloader, source, staging)
        else:
            root = _fetch_folder(downloader, source, staging)
        verify_model(root, source.display)
        _place(root, staging, dest, in_place, _marker_text(source, root))
    except OSError as exc:  # a full disk, a read-only volume
        shutil.rmtree(staging, ignore_errors=True)
        raise FetchError(f"cannot write the model into {dest}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        downloader.close()
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file() and p.name != MARKER)
    return f"fetched {source.display} into {dest} ({human(size)})"


def _fetch_archive(downloader: Downloader, source: Source, staging: Path) -> Path:
    archive = staging / f"{STAGING_PREFIX}archive"
    downloader.get(source.url, archive, "the model archive")
    content = staging / "model"
    content.mkdir()
    downloader.say(f"extracting {human(archive.stat().st_size)}")
    extract_archive(archive, content, source.display)
    archive.unlink()
    return _model_root(content, source.display)


def _fetch_folder(downloader: Downloader, source: Source, staging: Path) -> Path:
    root = staging / "model"
    root.mkdir()
    downloader.get(source.file_url(REQUIRED_FILE), root / REQUIRED_FILE, REQUIRED_FILE)
    for name in OPTIONAL_FILES:
        downloader.get(source.file_url(name), root / name, name, optional=True)
    if downloader.get(source.file_url(INDEX_FILE), root / INDEX_FILE, INDEX_FILE, optional=True):
        for shard in index_shards(root / INDEX_FILE, source.display):
            downloader.get(source.file_url(shard), root / shard, f"the shard {shard}")
    elif not downloader.get(source.file_url(WEIGHTS_FILE), root / WEIGHTS_FILE, WEIGHTS_FILE, optional=True):
        raise FetchError(f"neither {WEIGHTS_FILE} nor {INDEX_FILE} found (HTTP 404) under {source.display}")
    return root


def make_readable_by_all(folder: Path) -> None:
    """Folders 0755, files 0644, all the way down: a worker running as another uid (1000 in its pod, with a
    read-only mount) reads what the fetch or a converter wrote -- safetensors itself writes its file 0600."""
    for p in [folder, *folder.rglob("*")]:
        if p.is_symlink():
            continue
        p.chmod(0o755 if p.is_dir() else 0o644)


def write_termination_log(path: str | None, message: str) -> None:
    """Leave `message` where Kubernetes picks up a container's termination message (best effort).

    The default path is only written when it exists (the kubelet creates it in every container), so running
    the command as root on a workstation does not create /dev/termination-log.
    """
    if not path:
        return
    target = Path(path)
    if target.exists():
        if not os.access(target, os.W_OK):
            return
    elif path == DEFAULT_TERMINATION_LOG or not target.parent.is_dir() or not os.access(target.parent, os.W_OK):
        return
    with contextlib.suppress(OSError):
        target.write_text(message[:TERMINATION_LOG_LIMIT])
