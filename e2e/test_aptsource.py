"""Unit tests (no cluster, no network): APT source parsing, private APT config, node agent helpers."""

from __future__ import annotations

import os

import pytest
from baton.e2e import aptsource, build
from baton.e2e.agent import IpAllocator, is_running_ready, running_status
from baton.e2e.cluster import NodeSpec, default_nodes, parse_node_specs

MIRROR = "http://mirror.example.test/debian"
SECURITY = "http://mirror.example.test/debian-security"

DEB822 = f"""\
Types: deb
# a comment
URIs: {MIRROR}/
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: {SECURITY}
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://disabled.example.test/x
Suites: bookworm
Enabled: no
"""

ONE_LINE = f"""\
# comment
deb [arch=amd64 signed-by=/k.gpg] {SECURITY} bookworm-security main contrib
deb {MIRROR} bookworm main non-free-firmware # trailing
deb-src {MIRROR} bookworm main
"""


def test_parse_deb822():
    entries = aptsource.parse_sources({"/etc/apt/sources.list.d/debian.sources": DEB822})
    assert len(entries) == 2  # the disabled stanza is ignored
    assert entries[0].uris == (MIRROR,)  # trailing slash dropped
    assert entries[0].suites == ("bookworm", "bookworm-updates")
    assert entries[0].signed_by == "/usr/share/keyrings/debian-archive-keyring.gpg"
    assert aptsource.main_archive_uri(entries) == MIRROR
    assert aptsource.main_archive_uri(entries, "bookworm") == MIRROR


def test_parse_one_line_picks_main_archive_not_security():
    entries = aptsource.parse_sources({"/etc/apt/sources.list": ONE_LINE})
    assert [e.types for e in entries] == [("deb",), ("deb",), ("deb-src",)]
    assert entries[0].signed_by == "/k.gpg" and entries[0].components == ("main", "contrib")
    assert entries[1].components == ("main", "non-free-firmware")
    assert aptsource.main_archive_uri(entries) == MIRROR


def test_non_source_files_ignored_and_no_main_archive_raises():
    entries = aptsource.parse_sources(
        {
            "/etc/apt/sources.list.d/x.list.save": ONE_LINE,
            "/etc/apt/sources.list.d/sec.list": f"deb {SECURITY} bookworm-security main",
        }
    )
    assert len(entries) == 1
    with pytest.raises(LookupError):
        aptsource.main_archive_uri(entries)


def test_render_sources_adds_deb_src_and_bullseye_from_same_mirror():
    entries = aptsource.parse_sources({"a.sources": DEB822})
    text = aptsource.render_sources_list(entries, extra_suites=("bullseye",), codename="bookworm")
    lines = text.splitlines()
    key = "[signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]"
    assert f"deb {key} {MIRROR} bookworm main" in lines
    assert f"deb-src {key} {MIRROR} bookworm main" in lines
    assert f"deb-src {key} {SECURITY} bookworm-security main" in lines
    assert f"deb {key} {MIRROR} bullseye main" in lines
    assert len(lines) == len(set(lines))
    assert "disabled.example" not in text


def test_private_apt_uses_own_dirs(tmp_path):
    apt = aptsource.PrivateApt(tmp_path / "apt", "deb http://x.test/debian bookworm main\n")
    apt.setup()
    cmd = apt.command("update")
    assert cmd[0] == "apt-get" and cmd[-1] == "update"
    opts = dict(o.split("=", 1) for o in cmd[2:-1] if o != "-o")
    assert opts["Dir::Etc::sourcelist"] == str(tmp_path / "apt" / "sources.list")
    assert opts["Dir::State::Lists"] == str(tmp_path / "apt" / "lists")
    assert opts["Dir::Cache::archives"] == str(tmp_path / "apt" / "archives")
    assert opts["Dir::Etc::sourceparts"] == str(tmp_path / "apt" / "parts")  # system parts not read
    assert (tmp_path / "apt" / "lists" / "partial").is_dir()
    assert (tmp_path / "apt" / "sources.list").read_text().startswith("deb http://x.test")


def test_system_sources_parse_if_present():
    files = aptsource.read_system_sources()
    if not files:
        pytest.skip("no APT sources on this machine")
    entries = aptsource.parse_sources(files)
    assert aptsource.main_archive_uri(entries, aptsource.system_codename()).startswith(
        ("http", "file", "ftp")
    )


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("BATON_CACHE", str(tmp_path))
    assert build.bin_dir() == tmp_path / "k8s-v1.20.2"
    assert not build.binaries_present()


def test_verify_rejects_bad_checksum(tmp_path):
    f = tmp_path / build.K8S_ORIG_TARBALL
    f.write_bytes(b"not the tarball")
    with pytest.raises(build.BuildError, match="sha256 mismatch"):
        build.verify(f)


def test_ip_allocator_unique_and_stable():
    ips = IpAllocator()
    a, b = ips.get("uid-a"), ips.get("uid-b")
    assert a != b and a.startswith("10.244.") and ips.get("uid-a") == a
    ips.reserve("uid-c", "10.244.0.5")
    assert "10.244.0.5" not in {ips.get(f"u{i}") for i in range(10)}


def test_running_status_shape():
    pod = {
        "metadata": {"uid": "u1", "name": "p"},
        "spec": {
            "containers": [{"name": "c", "image": "img"}],
            "initContainers": [{"name": "i", "image": "x"}],
        },
    }
    st = running_status(pod, "10.244.0.9", "10.240.0.10", "2024-01-01T00:00:00Z")
    assert st["phase"] == "Running" and st["podIP"] == "10.244.0.9"
    assert st["containerStatuses"][0]["ready"] is True
    assert st["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    assert is_running_ready({"status": st})


def test_default_nodes_and_parsing():
    nodes = default_nodes()
    gpu = [n for n in nodes if n.gpus]
    assert {n.labels["baton.dev/pool"] for n in gpu} == {"prefill", "decode"}
    assert {n.labels["topology.kubernetes.io/zone"] for n in nodes} == {"zone-a", "zone-b"}
    assert all(n.capacity()["nvidia.com/gpu"] == "8" for n in gpu)
    cpu = [n for n in nodes if not n.gpus]
    assert cpu and cpu[0].capacity()["nvidia.com/gpu"] == "0"
    assert nodes[0].all_labels()["kubernetes.io/hostname"] == nodes[0].name
    parsed = parse_node_specs([{"name": "n1", "gpus": 4, "labels": {"baton.dev/pool": "x"}}])
    assert parsed == [NodeSpec(name="n1", gpus=4, labels={"baton.dev/pool": "x"})]


def test_start_failure_quotes_component_log(tmp_path):
    from baton.e2e.cluster import ClusterError, LocalCluster

    fake_etcd = tmp_path / "etcd"
    fake_etcd.write_text("#!/bin/sh\necho 'etcdmain: boom: cannot listen' >&2\nexit 3\n")
    fake_etcd.chmod(0o755)
    run = tmp_path / "run"
    cluster = LocalCluster(run_dir=run, bin_dir=tmp_path, etcd=str(fake_etcd), agent=None)
    with pytest.raises(ClusterError, match=r"(?s)etcd exited \(rc=3\).*boom: cannot listen"):
        cluster.start()
    assert not cluster.components
    assert (run / "logs" / "etcd.log").exists()  # logs kept for the post-mortem


def test_sweep_removes_only_dead_owners_run_dirs(tmp_path):
    import json
    import subprocess
    import sys

    from baton.e2e.cluster import RUN_DIR_PREFIX, sweep_stale_run_dirs

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    ).stdout.strip()
    dirs = {}
    for name, owner, detached in (
        ("dead", int(dead), False),
        ("live", os.getpid(), False),
        ("detached", int(dead), True),
    ):
        d = tmp_path / f"{RUN_DIR_PREFIX}{name}"
        d.mkdir()
        (d / "state.json").write_text(
            json.dumps({"owner_pid": owner, "detached": detached, "components": {}})
        )
        dirs[name] = d
    (tmp_path / f"{RUN_DIR_PREFIX}starting").mkdir()  # no state.json yet: left alone
    removed = sweep_stale_run_dirs(tmp_path)
    assert removed == [dirs["dead"]]
    assert (
        dirs["live"].exists()
        and dirs["detached"].exists()
        and (tmp_path / f"{RUN_DIR_PREFIX}starting").exists()
    )
