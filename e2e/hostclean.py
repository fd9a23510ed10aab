"""What real nodes change on the host, recorded before they start and undone after they stop.

Real nodes (:mod:`baton.e2e.realnode`) are root processes that change the machine: a CNI bridge and veths,
network namespaces, iptables chains (kube-proxy's ``KUBE-*``, the bridge plugin's ``CNI-*``), cgroups, mounts
(container root filesystems, shm, netns, kubelet volumes), ``net.ipv4.ip_forward`` and a few host paths that
kubelet 1.20 / containerd 1.6 / libcni hard-code (``/var/log/pods``, ``/var/lib/kubelet``, ``/var/lib/cni``,
``/run/containerd``...). One real-node cluster runs per host at a time (they share the bridge, kube-proxy and
those paths), so the record is one file, :func:`record_path`, written by :func:`record_host` *before* anything
changes. :func:`teardown` undoes everything from that record alone -- no live Python object, no pid file that a
crash could have lost -- so ``baton cluster down`` recovers a host after a killed test run. It only touches what
is provably ours: processes whose command line names our node root or which live in our cgroups, mounts under
our root, netns that our CNI network created, our bridge, rules that name our chains or network, cgroups we
named, and hard-coded paths that did not exist before we started.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from baton.e2e.cluster import pid_alive, proc_stat_fields

CGROUP_FS = Path("/sys/fs/cgroup")
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
#: paths kubelet/containerd/CNI use whatever their flags say; removed at teardown only if we created them
HARDCODED_PATHS = (
    "/var/log/pods",
    "/var/log/containers",
    "/var/lib/kubelet",
    "/var/lib/cni",
    "/run/containerd",
    "/var/run/netns",
    "/run/netns",
    "/etc/cni/net.d",
)
#: top-level cgroups the kubelet may create whatever cgroupRoot says (removed only if we created them)
KUBELET_TOP_CGROUPS = ("kubepods", "kubepods.slice")

Log = Callable[[str], None]


def _quiet(msg: str) -> None:
    pass


@dataclasses.dataclass
class HostRecord:
    """Everything :func:`teardown` needs, written before the first change."""

    owner_pid: int
    root: str  # every node's containerd/kubelet files live below it
    bridge: str
    network: str  # the CNI network name (CNI-* chains carry it in their comments)
    pod_cidr: str
    cgroups: list[str]  # top-level cgroup names, created in every hierarchy
    ip_forward: str
    preexisting: list[str]  # of HARDCODED_PATHS and KUBELET_TOP_CGROUPS
    kube_proxy: str | None = None  # binary, for ``--cleanup``
    detached: bool = False  # a detached cluster outlives its owner: only `baton cluster down` ends it

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def record_path() -> Path:
    from baton.e2e.build import cache_root

    return cache_root() / "realnodes-host.json"


def read_record() -> HostRecord | None:
    try:
        return HostRecord(**json.loads(record_path().read_text()))
    except (OSError, ValueError, TypeError):
        return None


def cgroup_hierarchies() -> list[Path]:
    """Every mounted cgroup hierarchy (v1: one per controller set, plus ``unified``; v2: the root)."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            fstype = parts[parts.index("-") + 1]
            if fstype in ("cgroup", "cgroup2"):
                found.append(Path(parts[4]))
    return sorted(set(found))


def record_host(
    root: Path,
    bridge: str,
    network: str,
    pod_cidr: str,
    cgroups: list[str],
    kube_proxy: str | None,
    detached: bool = False,
    log: Log = _quiet,
) -> HostRecord:
    """Write the record. Refuses while another real-node cluster lives (a live owner, or a detached one whose
    processes run); sweeps the leftovers of a dead one first (a killed test run)."""
    old = read_record()
    if old is not None:
        live_owner = pid_alive(old.owner_pid) and old.owner_pid != os.getpid()
        if live_owner or (old.detached and processes_naming(old.root)):
            raise RuntimeError(
                f"another real-node cluster runs on this host (root {old.root}); stop it first: "
                "`baton cluster down` (with its --name)"
            )
        log(f"cleaning up after a real-node cluster that did not stop cleanly ({old.root})")
        teardown(old, log)
    pre = [p for p in HARDCODED_PATHS if os.path.lexists(p)]
    pre += [
        f"cgroup:{name}" for name in KUBELET_TOP_CGROUPS if any((h / name).exists() for h in cgroup_hierarchies())
    ]
    rec = HostRecord(
        owner_pid=os.getpid(),
        root=str(root),
        bridge=bridge,
        network=network,
        pod_cidr=pod_cidr,
        cgroups=cgroups,
        ip_forward=IP_FORWARD.read_text().strip(),
        preexisting=pre,
        kube_proxy=kube_proxy,
        detached=detached,
    )
    path = record_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(rec.to_json())
    os.replace(tmp, path)
    return rec


# ------------------------------------------------------------------------------------------------
# what is ours, found on the host


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def processes_naming(root: str) -> dict[int, list[str]]:
    """Live processes whose command line mentions ``root`` (kubelets, containerds, their shims, kube-proxy)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        argv = _cmdline(int(entry))
        if any(root in a for a in argv):
            found[int(entry)] = argv
    return found


def cgroup_pids(cgroups: Iterable[str]) -> set[int]:
    """Every process in our cgroups (containers, pause processes), in any hierarchy."""
    pids: set[int] = set()
    for h in cgroup_hierarchies():
        for name in cgroups:
            base = h / name
            if not base.is_dir():
                continue
            for dirpath, _dirs, files in os.walk(base):
                if "cgroup.procs" in files:
                    with contextlib.suppress(OSError):
                        pids.update(int(x) for x in (Path(dirpath) / "cgroup.procs").read_text().split())
    return pids


def _mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4].replace("\\040", " ") for line in f]


def _kill(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while True:
        for pid in list(pids):
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
        alive = {p for p in pids if pid_alive(p) and not _zombie(p)}
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def _zombie(pid: int) -> bool:
    fields = proc_stat_fields(pid)
    return fields is None or fields[0] == "Z"


def stop_processes(pids: Iterable[int], timeout: float = 10.0) -> None:
    """SIGTERM, wait up to ``timeout``, SIGKILL what is left."""
    pids = set(pids)
    _kill(pids, signal.SIGTERM)
    left = _wait_gone(pids, timeout)
    _kill(left, signal.SIGKILL)
    _wait_gone(left, 5.0)


def _run(*argv: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), input=input, text=True, capture_output=True, check=False)


def our_netns(rec: HostRecord) -> set[str]:
    """Pod network namespaces of ours: mounted ``/run/netns/cni-*`` whose interfaces hold an address in our pod
    CIDR (containerd names them, libcni's cache does not record them). Run before the bridge goes."""
    import ipaddress

    net = ipaddress.ip_network(rec.pod_cidr)
    found = set()
    for mount in _mounts():
        name = os.path.basename(mount)
        if os.path.dirname(mount) not in ("/run/netns", "/var/run/netns") or not name.startswith("cni-"):
            continue
        out = _run("ip", "-n", name, "-4", "-o", "addr", "show").stdout
        for addr in re.findall(r"inet (\S+)", out):
            if ipaddress.ip_interface(addr).ip in net:
                found.add(mount)
    return found


def iptables_leftovers(save: str, rec: HostRecord) -> tuple[str, int]:
    """``iptables-save`` text with our chains and rules removed; and how many lines went.

    Ours: kube-proxy's and the kubelet's ``KUBE-*`` chains (nothing else on a test host makes them), the
    bridge plugin's ``CNI-*`` chains and rules whose comment names our network, rules that mention our
    bridge or our pod CIDR. Pure: tested on sample text."""
    out, dropped = [], 0
    ours_chains = set(re.findall(r"^:((?:KUBE|CNI)-[\w-]+)", save, flags=re.MULTILINE))
    cni_ours = {
        chain
        for chain in ours_chains
        if chain.startswith("CNI-")
        and (
            re.search(rf"-A {re.escape(chain)} .*name: \\?\"{re.escape(rec.network)}\\?\"", save)
            or chain.startswith(("CNI-HOSTPORT", "CNI-DN-"))
        )
    }
    drop_chains = {c for c in ours_chains if c.startswith("KUBE-")} | cni_ours
    for line in save.splitlines():
        m = re.match(r"^:(\S+)", line)
        if m and m.group(1) in drop_chains:
            dropped += 1
            continue
        if line.startswith("-A "):
            words = line.split()
            chain, target = words[1], (words[words.index("-j") + 1] if "-j" in words else "")
            if (
                chain in drop_chains
                or target in drop_chains
                or f"name: \\\"{rec.network}\\\"" in line
                or f'name: "{rec.network}"' in line
                or rec.bridge in words
                or rec.pod_cidr in words
            ):
                dropped += 1
                continue
        out.append(line)
    return "\n".join(out) + "\n", dropped


def _clean_iptables(rec: HostRecord, log: Log) -> None:
    if shutil.which("iptables-save") is None:
        return
    if rec.kube_proxy and os.access(rec.kube_proxy, os.X_OK):
        _run(rec.kube_proxy, "--cleanup")  # exits non-zero without ipset; the rules are gone all the same
    save = _run("iptables-save").stdout
    cleaned, dropped = iptables_leftovers(save, rec)
    if dropped:
        proc = _run("iptables-restore", input=cleaned)
        if proc.returncode != 0:
            log(f"iptables-restore failed: {proc.stderr.strip()[-300:]}")
        else:
            log(f"removed {dropped} iptables lines of ours")


def _rmdir_tree(path: Path) -> None:
    """rmdir a cgroup and its children, deepest first (cgroup dirs cannot be rm -r'ed)."""
    if not path.is_dir():
        return
    for dirpath, dirs, _files in os.walk(path, topdown=False):
        for d in dirs:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(dirpath, d))
    with contextlib.suppress(OSError):
        os.rmdir(path)


def teardown(rec: HostRecord | None = None, log: Log = _quiet) -> list[str]:
    """Undo everything of ours on the host (idempotent); returns what was still there to undo."""
    rec = rec or read_record()
    if rec is None:
        return []
    done: list[str] = []
    root = rec.root
    t0 = last = time.monotonic()
    took: list[str] = []  # where the time went, steps of a second or more (the run's phase table has the total)

    def lap(step: str) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= 1.0:
            took.append(f"{step} {now - last:.0f}s")
        last = now
    # 1. kubelets first (they would restart containers), then every process in our cgroups (containers and
    #    pause), then the shims, containerds and kube-proxy: all name our root on their command line.
    procs = processes_naming(root)
    kubelets = {p for p, argv in procs.items() if os.path.basename(argv[0]) == "kubelet"}
    if kubelets:
        stop_processes(kubelets, 10.0)
        done.append(f"{len(kubelets)} kubelet(s)")
    lap("kubelets")
    for _ in range(3):  # a dying shim can leave a straggler for one round
        inside = cgroup_pids(rec.cgroups)
        if not inside:
            break
        _kill(inside, signal.SIGKILL)
        _wait_gone(inside, 5.0)
        done.append(f"{len(inside)} container process(es)")
    rest = set(processes_naming(root))
    if rest:
        stop_processes(rest, 10.0)
        done.append(f"{len(rest)} containerd/shim/kube-proxy process(es)")
    lap("processes")
    # 2. mounts under our root (rootfs overlays, shm, kubelet volumes), deepest first; our netns
    netns = our_netns(rec)
    mounts = [m for m in _mounts() if m == root or m.startswith(root.rstrip("/") + "/") or m in netns]
    for m in sorted(set(mounts), key=len, reverse=True):
        if _run("umount", m).returncode != 0:
            _run("umount", "-l", m)
    if mounts:
        done.append(f"{len(set(mounts))} mount(s)")
    for ns in netns:
        with contextlib.suppress(OSError):
            os.unlink(ns)
    lap("mounts")
    # 3. network: veths on our bridge, the bridge, iptables
    if Path(f"/sys/class/net/{rec.bridge}").exists():
        for port in (Path(f"/sys/class/net/{rec.bridge}/brif").iterdir() if Path(f"/sys/class/net/{rec.bridge}/brif").is_dir() else []):
            _run("ip", "link", "delete", port.name)
        _run("ip", "link", "delete", rec.bridge)
        done.append(f"bridge {rec.bridge}")
    _clean_iptables(rec, log)
    lap("network")
    # 4. cgroups
    for h in cgroup_hierarchies():
        for name in rec.cgroups:
            if (h / name).exists():
                _rmdir_tree(h / name)
        for name in KUBELET_TOP_CGROUPS:
            if f"cgroup:{name}" not in rec.preexisting and (h / name).exists():
                _rmdir_tree(h / name)
    # 5. hard-coded host paths we created, our root, ip_forward
    for p in HARDCODED_PATHS:
        if p not in rec.preexisting and os.path.lexists(p):
            if os.path.islink(p):
                os.unlink(p)
            else:
                shutil.rmtree(p, ignore_errors=True)
            done.append(p)
    lap("cgroups and host paths")
    if os.path.lexists(root):
        shutil.rmtree(root, ignore_errors=True)
    lap(f"removing {root}")
    with contextlib.suppress(OSError):
        if IP_FORWARD.read_text().strip() != rec.ip_forward:
            IP_FORWARD.write_text(rec.ip_forward + "\n")
            done.append(f"ip_forward={rec.ip_forward}")
    with contextlib.suppress(OSError):
        record_path().unlink()
    if done:
        log(f"host cleaned in {time.monotonic() - t0:.0f}s: " + ", ".join(done)
            + (f" (slow steps: {', '.join(took)})" if took else ""))
    return done


def leftovers(rec: HostRecord) -> list[str]:
    """What of ours is still on the host (empty after a good :func:`teardown`); for tests and ``status``."""
    found = []
    procs = processes_naming(rec.root)
    found += [f"process {pid}: {' '.join(argv)[:120]}" for pid, argv in procs.items()]
    found += [f"process {pid} in our cgroups" for pid in cgroup_pids(rec.cgroups)]
    found += [f"mount {m}" for m in _mounts() if m.startswith(rec.root)]
    if Path(f"/sys/class/net/{rec.bridge}").exists():
        found.append(f"interface {rec.bridge}")
    if shutil.which("iptables-save"):
        save = _run("iptables-save").stdout
        found += [f"iptables chain {c}" for c in re.findall(r"^:((?:KUBE|CNI)-[\w-]+)", save, flags=re.MULTILINE)]
    for h in cgroup_hierarchies():
        found += [f"cgroup {h / n}" for n in rec.cgroups if (h / n).exists()]
        found += [
            f"cgroup {h / n}"
            for n in KUBELET_TOP_CGROUPS
            if f"cgroup:{n}" not in rec.preexisting and (h / n).exists()
        ]
    found += [f"path {p}" for p in HARDCODED_PATHS if p not in rec.preexisting and os.path.lexists(p)]
    if IP_FORWARD.read_text().strip() != rec.ip_forward:
        found.append("net.ipv4.ip_forward changed")
    return found
