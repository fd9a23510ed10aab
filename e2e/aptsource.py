"""Private APT configuration for fetching build inputs with apt itself.

The machine's own APT sources say which Debian mirror to use; we never write a host name anywhere.
:func:`parse_sources` reads both the deb822 (``*.sources``) and the one-line (``sources.list``,
``*.list``) formats; :func:`main_archive_uri` picks the URI of the main archive (the entry that carries
a plain release codename such as ``bookworm``, not ``bookworm-security``); :func:`render_sources_list`
writes a sources file that repeats the machine's entries as ``deb`` *and* ``deb-src`` and adds extra
releases (``bullseye`` for ``golang-1.15``) from the same mirror; :class:`PrivateApt` runs ``apt-get``
with its own state/list/cache directories so the system's APT state is never touched.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

DEFAULT_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


@dataclasses.dataclass(frozen=True)
class SourceEntry:
    """One APT source: ``types`` (deb / deb-src), ``uris``, ``suites``, ``components``, ``signed_by``."""

    types: tuple[str, ...]
    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str | None = None


def _parse_deb822(text: str) -> list[SourceEntry]:
    entries: list[SourceEntry] = []
    for stanza in _stanzas(text):
        fields: dict[str, str] = {}
        key = None
        for line in stanza:
            if line[:1] in (" ", "\t") and key is not None:  # continuation (e.g. inline Signed-By key)
                fields[key] += "\n" + line.strip()
                continue
            if ":" not in line:
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if fields.get("enabled", "yes").strip().lower() == "no":
            continue
        if not fields.get("uris") or not fields.get("types") or not fields.get("suites"):
            continue
        signed_by = fields.get("signed-by")
        if signed_by and "\n" in signed_by:  # an inline key block: cannot be reused as a path
            signed_by = None
        entries.append(
            SourceEntry(
                types=tuple(fields["types"].split()),
                uris=tuple(u.rstrip("/") for u in fields["uris"].split()),
                suites=tuple(fields["suites"].split()),
                components=tuple(fields.get("components", "").split()),
                signed_by=signed_by or None,
            )
        )
    return entries


def _stanzas(text: str) -> Iterable[list[str]]:
    current: list[str] = []
    for raw in text.splitlines():
        if raw.lstrip().startswith("#"):
            continue
        if not raw.strip():
            if current:
                yield current
                current = []
            continue
        current.append(raw.rstrip())
    if current:
        yield current


def _parse_one_line(text: str) -> list[SourceEntry]:
    entries: list[SourceEntry] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        kind, _, rest = line.partition(" ")
        if kind not in ("deb", "deb-src"):
            continue
        rest = rest.strip()
        options: dict[str, str] = {}
        if rest.startswith("["):
            opts, _, rest = rest[1:].partition("]")
            for opt in opts.split():
                k, _, v = opt.partition("=")
                options[k.lower()] = v
        parts = rest.split()
        if len(parts) < 2:
            continue
        entries.append(
            SourceEntry(
                types=(kind,),
                uris=(parts[0].rstrip("/"),),
                suites=(parts[1],),
                components=tuple(parts[2:]),
                signed_by=options.get("signed-by"),
            )
        )
    return entries


def parse_sources(files: dict[str, str]) -> list[SourceEntry]:
    """Parse APT source files given as ``{path: text}``; the format is chosen by the file name."""
    entries: list[SourceEntry] = []
    for path in sorted(files):
        text = files[path]
        if path.endswith(".sources"):
            entries += _parse_deb822(text)
        elif path.endswith(".list"):
            entries += _parse_one_line(text)
    return entries


def read_system_sources(etc_apt: str | os.PathLike[str] = "/etc/apt") -> dict[str, str]:
    """Read the machine's APT source files (``sources.list`` and ``sources.list.d/*``)."""
    root = Path(etc_apt)
    paths = [root / "sources.list"] + sorted(Path(p) for p in glob.glob(str(root / "sources.list.d" / "*")))
    files: dict[str, str] = {}
    for path in paths:
        if path.is_file() and path.suffix in (".list", ".sources"):
            files[str(path)] = path.read_text(errors="replace")
    return files


def _is_plain_codename(suite: str) -> bool:
    return "-" not in suite and "/" not in suite and suite not in ("stable", "testing", "unstable", "sid")


def main_archive_uri(entries: Sequence[SourceEntry], codename: str | None = None) -> str:
    """URI of the main Debian archive: the ``deb`` entry carrying the release's plain codename.

    With ``codename`` given, prefer the entry that carries exactly that suite. Raises ``LookupError``
    when no entry qualifies (e.g. only a security mirror is configured).
    """
    candidates = [e for e in entries if "deb" in e.types or "deb-src" in e.types]
    if codename:
        for entry in candidates:
            if codename in entry.suites:
                return entry.uris[0]
    for entry in candidates:
        if any(_is_plain_codename(s) for s in entry.suites):
            return entry.uris[0]
    raise LookupError(
        "no main Debian archive found in the APT sources (need a 'deb URI <codename> main' entry)"
    )


def render_sources_list(
    entries: Sequence[SourceEntry],
    extra_suites: Sequence[str] = (),
    keyring: str = DEFAULT_KEYRING,
    codename: str | None = None,
) -> str:
    """A one-line-format sources file: every machine entry as deb + deb-src, plus ``extra_suites``
    (binary only, component ``main``) from the main archive's URI."""
    lines: list[str] = []
    seen: set[str] = set()

    def add(kind: str, uri: str, suite: str, components: Sequence[str], signed_by: str | None) -> None:
        opts = f"[signed-by={signed_by}] " if signed_by else ""
        line = f"{kind} {opts}{uri} {suite} {' '.join(components) or 'main'}".rstrip()
        if line not in seen:
            seen.add(line)
            lines.append(line)

    for entry in entries:
        for uri in entry.uris:
            for suite in entry.suites:
                for kind in ("deb", "deb-src"):
                    add(kind, uri, suite, entry.components, entry.signed_by)
    mirror = main_archive_uri(entries, codename)
    signed = next((e.signed_by for e in entries if mirror in e.uris and e.signed_by), None) or keyring
    for suite in extra_suites:  # binary packages only (golang-1.15 debs)
        add("deb", mirror, suite, ("main",), signed)
    return "\n".join(lines) + "\n"


class PrivateApt:
    """``apt-get`` with its own sources file, lists, caches and state, under ``root``."""

    def __init__(self, root: str | os.PathLike[str], sources_text: str, arch: str | None = None):
        self.root = Path(root)
        self.sources_text = sources_text
        self.arch = arch

    def setup(self) -> None:
        for sub in ("lists/partial", "archives/partial", "cache", "parts", "prefs.d", "empty"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "sources.list").write_text(self.sources_text)

    def options(self) -> list[str]:
        r = self.root
        opts = {
            "Dir::Etc::sourcelist": r / "sources.list",
            "Dir::Etc::sourceparts": r / "parts",
            "Dir::Etc::preferencesparts": r / "prefs.d",
            "Dir::State::Lists": r / "lists",
            "Dir::Cache": r / "cache",
            "Dir::Cache::archives": r / "archives",
            "Dir::Cache::pkgcache": "",
            "Dir::Cache::srcpkgcache": "",
            "APT::Sandbox::User": "root",
            "Acquire::Languages": "none",
            "APT::Get::AllowUnauthenticated": "false",
        }
        if self.arch:
            opts["APT::Architecture"] = self.arch
        out: list[str] = []
        for key, value in opts.items():
            out += ["-o", f"{key}={value}"]
        return out

    def command(self, *args: str) -> list[str]:
        return ["apt-get", "-q", *self.options(), *args]

    def run(self, *args: str, cwd: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.command(*args), cwd=cwd, text=True, capture_output=True, check=False)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr)[-3000:]
            raise RuntimeError(f"apt-get {' '.join(args)} failed (rc={proc.returncode}):\n{tail}")
        return proc

    def update(self) -> None:
        self.run("update")


def system_codename(os_release: str = "/etc/os-release") -> str | None:
    try:
        for line in Path(os_release).read_text().splitlines():
            if line.startswith("VERSION_CODENAME="):
                return line.split("=", 1)[1].strip().strip('"') or None
    except OSError:
        pass
    return None
