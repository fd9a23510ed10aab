"""Build (once) and cache the Kubernetes v1.20.2 control-plane binaries.

No registry ships kube-apiserver, but Debian bookworm's source package ``kubernetes``
(``1.20.5+really1.20.2``) is the complete upstream v1.20.2 tree with ``vendor/``; it builds offline with
bullseye's ``golang-1.15`` (extracted with ``dpkg -x``, never installed). Everything is fetched with
``apt-get`` through a private configuration (:mod:`baton.e2e.aptsource`) that reuses the machine's
mirror. The three binaries land in ``$BATON_CACHE/k8s-v1.20.2/`` (default ``~/.cache/baton``), next to
the Debian ``kubectl`` (``kubernetes-client``, extracted the same way); a second call returns at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from baton.e2e import aptsource

K8S_VERSION = "v1.20.2"
K8S_SOURCE_PACKAGE = "kubernetes"
K8S_ORIG_TARBALL = "kubernetes_1.20.5+really1.20.2.orig.tar.gz"
K8S_TREE = "kubernetes-1.20.2"
GO_VERSION = "1.15.15-1~deb11u4"
GO_PACKAGES = ("golang-1.15-go", "golang-1.15-src")
GO_SUITE = "bullseye"
KUBECTL_PACKAGE = "kubernetes-client"
SERVER_BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
#: what a real node runs (:mod:`baton.e2e.realnode`); built from the same tree, in the same ``make``.
NODE_BINARIES = ("kubelet", "kube-proxy")
#: Kubernetes' own build tags for leaner binaries: no in-tree cloud providers (the AWS, Azure, GCE, OpenStack and
#: vSphere SDKs are most of what `make` compiles) and no dockershim (real nodes run containerd through CRI).
#: What they leave out, nothing here uses; they shorten the cold build, the longest step of a fresh CI run.
BUILD_TAGS = ("providerless", "dockerless")
ALL_BINARIES = SERVER_BINARIES + NODE_BINARIES
#: The Go compiler's own settings for the build: its garbage collector at a quarter of the work (GOGC=400: the
#: compile processes peak ~0.9 GB instead of ~0.6) and no DWARF (the binaries are stripped, `-s -w`, anyway).
#: Measured building kube-scheduler, both at once on this 2-core machine: 213 CPU-s instead of 259 (-18 %).
#: `GOGCFLAGS` is what Kubernetes' `hack/lib/golang.sh` puts before its own `-trimpath`.
COMPILER_ENV = {"GOGC": "400", "GOGCFLAGS": "all=-dwarf=false"}

#: sha256 of the inputs, checked on top of APT's own signature/hash verification (amd64 only).
KNOWN_SHA256 = {
    K8S_ORIG_TARBALL: "b83c0780efb182d928dc63d46488a847f161f04e40a94b96bf5247dd671ecdfc",
    "golang-1.15-go_1.15.15-1~deb11u4_amd64.deb": "33f6680406698b60370322aa5710be199006b3d66fbb0974b44da012de3aa82a",
    "golang-1.15-src_1.15.15-1~deb11u4_amd64.deb": "e580f570f706d801191f9a17e55156736fc5979a6a878bab9304ca007ae29941",
}

Log = Callable[[str], None]


class BuildError(RuntimeError):
    """The control-plane binaries could not be fetched or built."""


def _default_log(msg: str) -> None:
    print(f"[baton k8s] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    return Path(os.environ.get("BATON_CACHE") or Path.home() / ".cache" / "baton")


def bin_dir() -> Path:
    return cache_root() / f"k8s-{K8S_VERSION}"


def binaries_present(directory: Path | None = None, names: tuple[str, ...] = SERVER_BINARIES) -> bool:
    d = directory or bin_dir()
    return all(os.access(d / name, os.X_OK) for name in names) and os.access(d / "kubectl", os.X_OK)


def kubectl_path() -> str | None:
    """The Debian kubectl: ``$BATON_KUBECTL``, the cached extraction, else a ``kubectl`` on PATH."""
    env = os.environ.get("BATON_KUBECTL")
    if env:
        return env
    cached = bin_dir() / "kubectl"
    if os.access(cached, os.X_OK):
        return str(cached)
    return shutil.which("kubectl")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path) -> None:
    want = KNOWN_SHA256.get(path.name)
    if want is None:
        return
    got = sha256_of(path)
    if got != want:
        raise BuildError(f"sha256 mismatch for {path.name}: got {got}, want {want}")


@contextlib.contextmanager
def _lock(path: Path, *, wait: bool = True) -> Iterator[bool]:
    """An exclusive flock on `path` for the block; yields whether it is held: always with `wait`, else False at
    once (and nothing held) when someone else has it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _dpkg_arch() -> str:
    return subprocess.run(
        ["dpkg", "--print-architecture"], text=True, capture_output=True, check=True
    ).stdout.strip()


def ensure_host_tools(log: Log = _default_log) -> None:
    """``make`` and ``rsync`` must be on PATH for the Kubernetes build; install them if missing."""
    missing = [tool for tool in ("make", "rsync") if shutil.which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise BuildError(f"missing build tools {missing}; install them (apt-get install {' '.join(missing)})")
    log(f"installing {' '.join(missing)} with apt-get...")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    proc = subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
        env=env,
        text=True,
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:  # stale lists: refresh once
        subprocess.run(["apt-get", "update", "-q"], env=env, text=True, capture_output=True, check=False)
        proc = subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
            env=env,
            text=True,
            capture_output=True,
            check=False,
        )
    if proc.returncode != 0:
        raise BuildError(
            f"apt-get install {' '.join(missing)} failed:\n{(proc.stdout + proc.stderr)[-2000:]}"
        )


def private_apt(root: Path) -> aptsource.PrivateApt:
    codename = aptsource.system_codename()
    entries = aptsource.parse_sources(aptsource.read_system_sources())
    if not entries:
        raise BuildError("no APT sources configured on this machine (/etc/apt/sources.list[.d])")
    text = aptsource.render_sources_list(entries, extra_suites=(GO_SUITE,), codename=codename)
    apt = aptsource.PrivateApt(root, text)
    apt.setup()
    return apt


def _single(directory: Path, pattern: str) -> Path:
    found = sorted(directory.glob(pattern))
    if len(found) != 1:
        raise BuildError(f"expected one {pattern} in {directory}, found {[p.name for p in found]}")
    return found[0]


def _install_file(src: Path, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.copy2(src, tmp)
    os.chmod(tmp, 0o755)
    os.replace(tmp, dest)


def ensure_binaries(
    log: Log = _default_log,
    force: bool = False,
    jobs: int | None = None,
    names: tuple[str, ...] = SERVER_BINARIES,
) -> Path:
    """Return the directory holding ``names`` (default: kube-apiserver, kube-controller-manager,
    kube-scheduler) and the Debian kubectl, building first whatever of them is not cached yet (one
    ``make`` for all the missing ones: a fresh machine asking for :data:`ALL_BINARIES` compiles the
    shared packages once)."""
    out = bin_dir()
    if not force and binaries_present(out, names):
        return out
    with _lock(cache_root() / f"k8s-{K8S_VERSION}.lock"):
        if not force and binaries_present(out, names):  # another process built it while we waited
            return out
        wanted = names if force else tuple(n for n in names if not os.access(out / n, os.X_OK))
        _build(out, log, jobs, wanted or names)
    return out


def _build(out: Path, log: Log, jobs: int | None, names: tuple[str, ...]) -> None:
    t0 = time.monotonic()
    ensure_host_tools(log)
    work = cache_root() / f"build-k8s-{K8S_VERSION}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        arch = _dpkg_arch()
        apt = private_apt(work / "apt")
        log("fetching package lists (private apt config, machine's mirror)...")
        apt.update()
        dl = work / "dl"
        dl.mkdir()
        log(f"fetching source package {K8S_SOURCE_PACKAGE} and golang-1.15 ({GO_SUITE})...")
        apt.run("source", "--download-only", K8S_SOURCE_PACKAGE, cwd=dl)
        apt.run("download", *(f"{p}={GO_VERSION}" for p in GO_PACKAGES), cwd=dl)
        apt.run("download", KUBECTL_PACKAGE, cwd=dl)
        tarball = dl / K8S_ORIG_TARBALL
        if not tarball.exists():
            raise BuildError(
                f"apt-get source did not fetch {K8S_ORIG_TARBALL}: {sorted(p.name for p in dl.iterdir())}"
            )
        go_debs = [_single(dl, f"{p}_*.deb") for p in GO_PACKAGES]
        kubectl_deb = _single(dl, f"{KUBECTL_PACKAGE}_*.deb")
        for path in [tarball, *go_debs]:
            if arch == "amd64":
                verify(path)
        log("sha256 verified; extracting...")
        go_root_dir = work / "go"
        for deb in go_debs:
            subprocess.run(["dpkg", "-x", str(deb), str(go_root_dir)], check=True)
        kubectl_root = work / "kubectl"
        subprocess.run(["dpkg", "-x", str(kubectl_deb), str(kubectl_root)], check=True)
        with tarfile.open(tarball) as tf:
            tf.extractall(work, filter="tar")
        tree = work / K8S_TREE
        if not (tree / "Makefile").exists():
            raise BuildError(f"unexpected tarball layout: {tree}/Makefile missing")
        goroot = go_root_dir / "usr" / "lib" / "go-1.15"
        env = {k: v for k, v in os.environ.items() if not k.startswith("GO")}
        env.update(
            GOROOT=str(goroot),
            GOCACHE=str(work / "gocache"),
            GOPROXY="off",
            GOFLAGS="",
            PATH=f"{goroot / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
        )
        if jobs:
            env["GOMAXPROCS"] = str(jobs)
        log(
            f"building {', '.join(names)} {K8S_VERSION} "
            f"(4-9 minutes on 2 cores; log: {work / 'build.log'})..."
        )
        env.update(KUBE_GIT_VERSION=K8S_VERSION, KUBE_GIT_TREE_STATE="clean",
                   GOFLAGS=f"-tags={','.join(BUILD_TAGS)}", **COMPILER_ENV)
        # What `make WHAT=...` runs, less its `generated_files` step: of the files that step writes, this tarball
        # (pinned by sha256) already holds every one byte-for-byte but the OpenAPI definitions (and the e2e
        # tests' bindata, which nothing here builds). So only `gen_openapi`: 45 CPU-s instead of 113.
        for step in (["make", "gen_openapi"], ["hack/make-rules/build.sh", *(f"cmd/{b}" for b in names)]):
            with open(work / "build.log", "a") as logf:
                proc = subprocess.run(step, cwd=tree, env=env, stdout=logf, stderr=subprocess.STDOUT, check=False)
            if proc.returncode != 0:
                tail = (work / "build.log").read_text(errors="replace")[-4000:]
                raise BuildError(f"{' '.join(step[:2])} failed (rc={proc.returncode}); tail of "
                                 f"{work / 'build.log'}:\n{tail}")
        built = tree / "_output" / "bin"
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            _install_file(built / name, out / name)
        _install_file(kubectl_root / "usr" / "bin" / "kubectl", out / "kubectl")
        (out / "VERSION").write_text(f"{K8S_VERSION}\n")
        log(f"built and cached in {out} after {time.monotonic() - t0:.0f}s")
        with open(out / "build-times.txt", "a") as f:  # phase timings for the test output
            f.write(f"{' '.join(names)}\t{time.monotonic() - t0:.0f}s\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
