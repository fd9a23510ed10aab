"""Engine arguments that collide with the launch contract: refused, naming the flag and the field.

`spec.engine.args` and a role's `extraArgs` come last on a worker's command line, so a `--port` there would win
over the port Baton renders -- and the Service, the probes and the router would look for the worker on another
one; a second `--kv-transfer-config` would replace the KV role. Which flags Baton manages comes from the launch
contract (`launch.managed_flags`, derived from the command line it renders), never from a list here; this module
only says where each one is set instead.
"""
from __future__ import annotations

from baton import launch
from baton.launch import Flag

#: Where Baton takes a managed flag's value from, for the message (no entry: Baton itself).
WHERE = {
    Flag.MODEL: "spec.model.source",
    Flag.SERVED_MODEL_NAME: "spec.model.name",
    Flag.MAX_MODEL_LEN: "spec.model.maxModelLen",
    Flag.PORT: "spec.prefill.port and spec.decode.port",
    Flag.TENSOR_PARALLEL_SIZE: "spec.prefill.tensorParallel and spec.decode.tensorParallel",
    Flag.KV_TRANSFER_CONFIG: "the role (kv_producer, kv_consumer) and spec.accelerator",
    Flag.KV_TRANSPORT: "spec.kvTransfer.transport",
    Flag.KV_PORT: "spec.kvTransfer.port",
    Flag.OTLP_TRACES_ENDPOINT: "spec.observability.otlpEndpoint (or the operator's default)",
}


def arg_problems(engine: str, field: str, args: list[str]) -> list[tuple[str, str]]:
    """(field, message) for each managed flag in `args` (field relative to spec, e.g. `engine.args`)."""
    problems: list[tuple[str, str]] = []
    seen: set[str] = set()
    for arg in args:
        flag = launch.managed_flag_in(engine, arg)
        if flag is None or flag in seen:
            continue
        seen.add(flag)
        spelled = arg.split("=", 1)[0]
        shown = flag if spelled == flag else f"{spelled} ({flag})"
        where = WHERE.get(flag)
        source = f" from {where}" if where else ""
        problems.append((field, f"{shown} is set by Baton (launch contract){source}; remove it"))
    return problems


def spec_problems(spec) -> list[tuple[str, str]]:
    """Managed flags in `spec.engine.args` and `spec.{prefill,decode}.extraArgs` of a parsed LLMServiceSpec."""
    engine = spec.engine.kind
    problems = arg_problems(engine, "engine.args", list(spec.engine.args))
    for role in ("prefill", "decode"):
        problems += arg_problems(engine, f"{role}.extraArgs", list(getattr(spec, role).extra_args))
    return problems
