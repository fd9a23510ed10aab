"""``baton cluster build|up|down|status``: the local Kubernetes control plane from the command line.

``up`` runs in the foreground (Ctrl-C stops everything) or, with ``--detach``, leaves the cluster
running and records it in ``$BATON_CACHE/clusters/NAME/state.json``; ``down`` stops it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path


def _error(msg: str) -> Exception:
    try:
        from baton.cli import CommandError
    except ImportError:  # pragma: no cover - baton.cli always exists in the distribution
        return SystemExit(f"error: {msg}")
    return CommandError(msg)


def state_dir(name: str) -> Path:
    from baton.e2e.build import cache_root

    return cache_root() / "clusters" / name


def _log(msg: str) -> None:
    print(f"[baton cluster] {msg}", file=sys.stderr, flush=True)


def cmd_build(args: argparse.Namespace) -> int:
    from baton.e2e import build

    t0 = time.monotonic()
    try:
        names = build.SERVER_BINARIES if args.control_plane_only else build.ALL_BINARIES
        path = build.ensure_binaries(log=_log, force=args.force, names=names)
    except build.BuildError as exc:
        raise _error(str(exc)) from exc
    print(f"{path} ({time.monotonic() - t0:.1f}s)")
    for name in (*build.ALL_BINARIES, "kubectl"):
        print(f"  {path / name}{'' if os.access(path / name, os.X_OK) else ' (missing)'}")
    return 0


def _load_nodes(path: str | None):
    if not path:
        return None
    import yaml
    from baton.e2e.cluster import parse_node_specs

    data = yaml.safe_load(Path(path).read_text())
    items = data.get("nodes", data) if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise _error(f"{path}: expected a list of nodes (or a mapping with 'nodes:')")
    return parse_node_specs(items)


def _running_components(run: Path) -> dict[str, bool]:
    from baton.e2e.cluster import component_status

    if not (run / "state.json").exists():
        return {}
    try:
        return component_status(run)
    except (OSError, ValueError):
        return {}


def cmd_up(args: argparse.Namespace) -> int:
    from baton.e2e.build import BuildError
    from baton.e2e.cluster import ClusterError, LocalCluster

    run = state_dir(args.name)
    if any(_running_components(run).values()):
        raise _error(f"cluster {args.name!r} is already running (state in {run}); `baton cluster down` first")
    if args.real_nodes < 0:
        raise _error(f"--real-nodes must be 0 or more, not {args.real_nodes}")
    archives = _images_for(args) if args.real_nodes else []
    shutil.rmtree(run, ignore_errors=True)
    cluster = LocalCluster(
        real_nodes=args.real_nodes,
        images=[a.path for a in archives],
        nodes=_load_nodes(args.nodes),
        run_dir=run,
        detached=args.detach,
        agent="process" if args.detach else "thread",
        log=_log,
        keep_run_dir=args.detach,
    )
    from baton.e2e.realnode import RealNodeError

    try:
        cluster.start()
    except (BuildError, ClusterError, RealNodeError, RuntimeError) as exc:
        raise _error(str(exc)) from exc
    print(f"cluster {args.name!r} ready in {cluster.startup_seconds:.1f}s at {cluster.server}")
    print(f"kubeconfig: {cluster.kubeconfig}")
    if cluster.real is not None:
        names = ", ".join(f"{s.name} ({s.labels['baton.dev/pool']})" for s in cluster.real.specs)
        print(f"real nodes: {names}; images: {', '.join(a.ref for a in archives) or 'pause only'}")
    print(f"export KUBECONFIG={cluster.kubeconfig}", flush=True)
    if args.detach:
        print(f"stop with: baton cluster down --name {args.name}")
        return 0
    print("running in the foreground; Ctrl-C stops it", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(1)
            if not all(c.running() for c in cluster.components.values()):
                print(cluster.diagnostics(), file=sys.stderr)
                raise _error("a control-plane component exited")
    except KeyboardInterrupt:
        print("stopping...", file=sys.stderr)
    finally:
        cluster.stop()
        shutil.rmtree(run, ignore_errors=True)
    return 0


def _images_for(args: argparse.Namespace):
    from baton.e2e import images

    names = [n for n in (args.images or "").split(",") if n]
    try:
        return [images.build_image(n, log=_log) for n in names]
    except images.ImageError as exc:
        raise _error(str(exc)) from exc


def _remove_interrupted_builds() -> None:
    """`baton cluster down` also removes what interrupted image builds left (buildah working containers)."""
    from baton.e2e import images

    try:
        removed = images.remove_interrupted_builds()
    except images.ImageError as exc:
        print(f"could not check for interrupted image builds: {exc}", file=sys.stderr)
        return
    if removed is None:
        print("an image build is running: its buildah storage is left alone")
    elif removed:
        print(f"removed {len(removed)} working container(s) that interrupted image builds left: {', '.join(removed)}")


def cmd_down(args: argparse.Namespace) -> int:
    from baton.e2e import hostclean
    from baton.e2e.cluster import stop_from_state

    _remove_interrupted_builds()
    run = state_dir(args.name)
    if not (run / "state.json").exists():
        # a crashed test run leaves no named cluster, but perhaps real-node processes and host changes
        rec = hostclean.read_record()
        if rec is not None and not (rec.detached and hostclean.processes_naming(rec.root)):
            done = hostclean.teardown(rec, log=_log)
            print(f"no cluster {args.name!r}; cleaned up real-node leftovers: {', '.join(done) or 'none'}")
            return 0
        raise _error(f"no cluster {args.name!r} recorded in {run}")
    stopped = stop_from_state(run, remove=not args.keep)
    print(f"cluster {args.name!r} stopped ({', '.join(stopped) or 'nothing was running'})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from baton.e2e.cluster import _http_get

    run = state_dir(args.name)
    state_file = run / "state.json"
    if not state_file.exists():
        print(f"cluster {args.name!r}: not running")
        return 1
    state = json.loads(state_file.read_text())
    comps = _running_components(run)
    ready = False
    try:
        import ssl

        ctx = ssl.create_default_context(cafile=str(run / "pki" / "ca.crt"))
        token = (run / "pki" / "tokens.csv").read_text().split(",", 1)[0]
        ready = _http_get(f"{state['server']}/readyz", ctx, token, timeout=2) == b"ok"
    except (OSError, ValueError, KeyError, IndexError):
        ready = False
    print(f"cluster {args.name!r}: {'ready' if ready else 'NOT ready'} at {state['server']}")
    for name, alive in comps.items():
        print(f"  {name:<24} {'running' if alive else 'stopped'}  pid {state['components'][name]['pid']}")
    print(f"export KUBECONFIG={state['kubeconfig']}")
    return 0 if ready and all(comps.values()) else 1


def cmd_images_build(args: argparse.Namespace) -> int:
    from baton.e2e import images

    names = args.names or list(images.IMAGE_NAMES)
    t0 = time.monotonic()
    try:
        built = [images.pause_image(log=_log)] + [
            images.build_image(n, log=_log, force=args.force) for n in names
        ]
    except images.ImageError as exc:
        raise _error(str(exc)) from exc
    for img in built:
        size = img.path.stat().st_size / 2**20
        how = f"built in {img.seconds:.0f}s" if img.seconds else "cached"
        print(f"{img.ref}  {img.path}  {size:.0f} MiB  ({how})")
    print(f"({time.monotonic() - t0:.1f}s)")
    return 0


def register_images(subparsers) -> None:
    p = subparsers.add_parser(
        "images",
        help="build the worker/operator images locally (no registry, no Docker) for real nodes",
        description="Build docker/*.Dockerfile with buildah on a local Debian bookworm base; archives cached "
        "by content hash under $BATON_CACHE/images and imported into real nodes by `baton cluster up`.",
    )
    sub = p.add_subparsers(dest="images_command", metavar="ACTION")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    b = sub.add_parser("build", help="build (or reuse) images; prints each reference and archive")
    b.add_argument("names", nargs="*", metavar="NAME", help="worker, operator and/or vllm (default: all three)")
    b.add_argument("--force", action="store_true", help="rebuild even if the content hash is cached")
    b.set_defaults(func=cmd_images_build)


def register(subparsers) -> None:
    register_images(subparsers)
    p = subparsers.add_parser(
        "cluster", help="local Kubernetes v1.20 control plane for tests", description=__doc__
    )
    sub = p.add_subparsers(dest="cluster_command", metavar="ACTION")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    b = sub.add_parser(
        "build", help="fetch (apt) and build kube-apiserver/controller-manager/scheduler/kubelet/kube-proxy; cached"
    )
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.add_argument(
        "--control-plane-only",
        action="store_true",
        help="only kube-apiserver/controller-manager/scheduler (no kubelet/kube-proxy for real nodes)",
    )
    b.set_defaults(func=cmd_build)

    u = sub.add_parser("up", help="start a cluster (foreground; --detach to leave it running)")
    u.add_argument("--name", default="default")
    u.add_argument("--detach", "-d", action="store_true", help="leave it running; stop with `down`")
    u.add_argument(
        "--nodes", metavar="YAML", help="node list (name, labels, gpus, cpu, memory, pods, taints)"
    )
    u.add_argument(
        "--real-nodes",
        type=int,
        default=0,
        metavar="N",
        help="N real nodes (kubelet + containerd + runc + CNI; root): real-0 prefill pool, real-1 decode "
        "pool, ...; they replace the fake default nodes",
    )
    u.add_argument(
        "--images",
        default="worker,operator",
        metavar="NAMES",
        help="with --real-nodes: images to build (cached) and import into every node (default: %(default)s; "
        "'' for none)",
    )
    u.set_defaults(func=cmd_up)

    d = sub.add_parser("down", help="stop a detached cluster")
    d.add_argument("--name", default="default")
    d.add_argument("--keep", action="store_true", help="keep the run dir (logs, certificates)")
    d.set_defaults(func=cmd_down)

    s = sub.add_parser("status", help="show whether a cluster is running and ready")
    s.add_argument("--name", default="default")
    s.set_defaults(func=cmd_status)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m baton.e2e.cli build``) for CI scripts."""
    parser = argparse.ArgumentParser(prog="python -m baton.e2e.cli")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    args = parser.parse_args(["cluster", *(argv if argv is not None else sys.argv[1:])])
    try:
        return int(args.func(args) or 0)
    except Exception as exc:
        if type(exc).__name__ == "CommandError":
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
