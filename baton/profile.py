"""Latency profiles: how long one worker takes for a prefill batch and for a decode step.

The planner (`baton plan`, `spec.planner`), the simulator (`baton simulate`) and `baton profile` (which measures
the engine at hand) share this one file format, so a profile measured on one machine plans another:

    prefill batch time (ms) = a + b * sum(prompt tokens) + c * sum(prompt tokens ** 2)
    decode step time (ms)   = a + b * sum(context tokens) + c * batch size
                              (one fit below `decoding_large_small_bs_threshold` requests, one above)

which is the model DistServe fits (OSDI'24, and its simulator's estimators). A profile file holds fits per
model and tensor-parallel degree:

    {"format": "baton.profile/v1", "hardware": "...", "engine": "...", "source": "...",
     "models": {"<model>": {"<tp>": {"prefill": [a, b, c], "decoding_smallbs": [a, b, c],
                                     "decoding_largebs": [a, b, c], "decoding_large_small_bs_threshold": 95,
                                     "kv_capacity_tokens": 66144, "max_batch_tokens": 2048}}}}

An optional top-level `"kv_bytes_per_token": {"<model>": bytes}` sizes KV hand-offs for the planner's locality
choice. An optional `"chunked_prefill": true|false` says how the engine schedules a colocated worker (default:
true for `"engine": "baton"`, false otherwise); the planner's colocated model follows it. An optional `"pipeline_parallel": {"degrees": [1, 2, 4], "stage_overhead_ms": 1.0}` says the engine the
profile was measured on runs pipeline parallelism (vLLM, DistServe; the Baton engine does not) and how the
planner models it, as DistServe's simulator does: a batch's time on one stage is the whole model's time divided
by the stages, plus a per-stage overhead (activations sent on, a launch); see `PipelinedProfile`. Built-in profiles: `a100-80g-distserve` (the DistServe engine) and `a100-80g-vllm` (vLLM as DistServe
measured it for its colocated baseline), both the DistServe authors' A100-80G SXM fits (Apache-2.0). Pure apart
from reading and writing files.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

FORMAT = "baton.profile/v1"
BUILTIN = {"a100-80g-distserve": "a100-80g-distserve.json", "a100-80g-vllm": "a100-80g-vllm.json"}


@dataclass(frozen=True)
class WorkerProfile:
    """Latency curves of one worker of a given tensor-parallel degree (coefficients in milliseconds)."""

    prefill: tuple[float, float, float]
    decode_small: tuple[float, float, float]
    decode_large: tuple[float, float, float]
    large_bs_threshold: int
    kv_capacity_tokens: int
    tensor_parallel: int = 1
    #: the most prompt tokens the engine puts in one prefill batch (None: up to the KV capacity)
    max_batch_tokens: int | None = None

    def prefill_s(self, prompt_lens: Sequence[int]) -> float:
        a, b, c = self.prefill
        return (a + b * sum(prompt_lens) + c * sum(n * n for n in prompt_lens)) / 1000.0

    def decode_coeffs(self, batch: int) -> tuple[float, float, float]:
        return self.decode_large if batch >= self.large_bs_threshold else self.decode_small

    def decode_step_s(self, batch: int, context_tokens: int) -> float:
        a, b, c = self.decode_coeffs(batch)
        return (a + b * context_tokens + c * batch) / 1000.0

    def prefill_tokens_per_s(self, prompt_len: int, max_batch_tokens: int) -> float:
        """Throughput of full batches of `prompt_len`-token prompts."""
        n = max(1, max_batch_tokens // max(prompt_len, 1))
        return n * prompt_len / self.prefill_s([prompt_len] * n)

    @property
    def batch_token_limit(self) -> int:
        return self.max_batch_tokens or self.kv_capacity_tokens

    #: pipeline stages of the instance this profile times (one: no pipeline; see `PipelinedProfile`)
    stages = 1

    def prefill_stage_s(self, prompt_lens: Sequence[int]) -> float:
        """How long a prefill batch holds the first stage (one stage: the whole prefill)."""
        return self.prefill_s(prompt_lens)

    @classmethod
    def from_dict(cls, d: dict[str, Any], tensor_parallel: int | None = None) -> WorkerProfile:
        try:
            return cls(prefill=_triple(d["prefill"]), decode_small=_triple(d["decoding_smallbs"]),
                       decode_large=_triple(d.get("decoding_largebs", d["decoding_smallbs"])),
                       large_bs_threshold=int(d.get("decoding_large_small_bs_threshold", 1 << 30)),
                       kv_capacity_tokens=int(d["kv_capacity_tokens"]),
                       tensor_parallel=int(tensor_parallel or d.get("tensor_parallel", 1)),
                       max_batch_tokens=int(d["max_batch_tokens"]) if d.get("max_batch_tokens") else None)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"bad worker profile: {exc!r} (needs prefill, decoding_smallbs, "
                             "kv_capacity_tokens)") from exc

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"prefill": list(self.prefill), "decoding_smallbs": list(self.decode_small),
                             "decoding_largebs": list(self.decode_large),
                             "decoding_large_small_bs_threshold": self.large_bs_threshold,
                             "kv_capacity_tokens": self.kv_capacity_tokens}
        if self.max_batch_tokens:
            d["max_batch_tokens"] = self.max_batch_tokens
        return d

    @classmethod
    def builtin(cls, tensor_parallel: int = 1) -> WorkerProfile:
        """OPT-13B on A100-80G (DistServe fits)."""
        return ProfileSet.load("a100-80g-distserve").for_model("facebook/opt-13b").get(tensor_parallel)


@dataclass(frozen=True)
class PipelinedProfile:
    """An instance of `stages` pipeline stages of `base`'s tensor-parallel degree, in DistServe's model (its
    simulator's `get_prefill_time`/`get_decode_time`: stage time = whole time / stages + overhead).

    Prefill: a batch holds each stage for `prefill_s / stages + overhead` and passes all of them, so the first
    stage takes the next batch that much sooner (throughput up to `stages` x) while the batch's own latency is
    `prefill_s + stages x overhead` (no faster than one stage of the whole model).
    Decode: the running requests are split into `stages` micro-batches that take turns on the stages; each
    request gets a token per round, `base` time of one micro-batch + `stages` x overhead.
    KV capacity: the instance holds the weights once over `tensor_parallel x stages` GPUs, like a TP instance
    of that many GPUs (`ModelProfiles.pipelined` passes its capacity when the profile has it)."""

    base: WorkerProfile
    stages: int
    stage_overhead_s: float
    kv_capacity_tokens: int

    @property
    def tensor_parallel(self) -> int:
        return self.base.tensor_parallel

    @property
    def max_batch_tokens(self) -> int | None:
        return self.base.max_batch_tokens

    @property
    def batch_token_limit(self) -> int:
        return self.base.max_batch_tokens or self.kv_capacity_tokens

    def prefill_s(self, prompt_lens: Sequence[int]) -> float:
        """A prefill batch's latency through every stage."""
        return self.base.prefill_s(prompt_lens) + self.stages * self.stage_overhead_s

    def prefill_stage_s(self, prompt_lens: Sequence[int]) -> float:
        return self.base.prefill_s(prompt_lens) / self.stages + self.stage_overhead_s

    def decode_step_s(self, batch: int, context_tokens: int) -> float:
        """One round: every running request gets a token (its micro-batch passes all stages)."""
        if batch <= 0:
            return self.stages * self.stage_overhead_s
        micro = -(-batch // self.stages)
        return self.base.decode_step_s(micro, round(context_tokens * micro / batch)) + \
            self.stages * self.stage_overhead_s


def _triple(x: Any) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in x)
    return a, b, c


@dataclass(frozen=True)
class ModelProfiles:
    """One model's profiles, by tensor-parallel degree."""

    model: str
    by_tp: dict[int, WorkerProfile]
    hardware: str = ""
    engine: str = ""
    #: bytes of KV cache one token takes (2 x layers x KV heads x head dim x dtype bytes); 0: unknown
    kv_bytes_per_token: int = 0
    #: pipeline-parallel degrees the profile's engine runs ((1,): none) and the per-stage overhead it is modelled with
    pipeline_degrees: tuple[int, ...] = (1,)
    pipeline_stage_overhead_s: float = 0.0
    #: the engine's colocated (`both`) worker runs chunked prefill (decodes and prompt chunks in every step, up to
    #: `max_batch_tokens`) rather than whole-prompt prefill steps that stall the running decodes
    chunked_prefill: bool = False

    @property
    def tensor_parallel_degrees(self) -> list[int]:
        return sorted(self.by_tp)

    def pipelined(self, tensor_parallel: int, stages: int) -> WorkerProfile | PipelinedProfile:
        """The profile of a TP x PP instance (PP 1: the measured one). KV capacity: the profile's for TP
        `tensor_parallel x stages` when it has one (the same GPUs holding the weights once, as DistServe's
        max_num_tokens table shows), else `stages` x the TP degree's (a lower bound: each stage also frees the
        weights of the layers it does not hold)."""
        base = self.get(tensor_parallel)
        if stages == 1:
            return base
        same_gpus = self.by_tp.get(tensor_parallel * stages)
        kv = same_gpus.kv_capacity_tokens if same_gpus else base.kv_capacity_tokens * stages
        return PipelinedProfile(base, stages, self.pipeline_stage_overhead_s, kv)

    def get(self, tensor_parallel: int) -> WorkerProfile:
        if tensor_parallel not in self.by_tp:
            raise ValueError(f"profile of {self.model} has tensor-parallel {self.tensor_parallel_degrees}, "
                             f"not {tensor_parallel}")
        return self.by_tp[tensor_parallel]


@dataclass(frozen=True)
class ProfileSet:
    """A profile file: fits per model and tensor-parallel degree, and where they came from."""

    models: dict[str, dict[int, WorkerProfile]]
    hardware: str = ""
    engine: str = ""
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def for_model(self, model: str | None = None) -> ModelProfiles:
        if model is None:
            if len(self.models) != 1:
                raise ValueError(f"the profile holds models {sorted(self.models)}; choose one")
            model = next(iter(self.models))
        if model not in self.models:
            raise ValueError(f"the profile has no model {model!r} (it has {', '.join(sorted(self.models))})")
        kv = self.extra.get("kv_bytes_per_token", {})
        degrees, overhead = self.pipeline_parallel()
        return ModelProfiles(model, self.models[model], self.hardware, self.engine,
                             int(kv.get(model, 0)) if isinstance(kv, dict) else 0, degrees, overhead,
                             self.chunked_prefill())

    def chunked_prefill(self) -> bool:
        """Whether the profile's engine schedules a colocated worker with chunked prefill: the file's
        `chunked_prefill` (true/false), else true for a Baton-engine profile (its `both` worker chunks by
        default) and false otherwise (the shipped vLLM profile is vLLM as DistServe measured it, before
        chunked prefill was its default)."""
        value = self.extra.get("chunked_prefill", self.engine == "baton")
        if not isinstance(value, bool):
            raise ValueError(f"chunked_prefill: expected true or false, got {value!r}")  # noqa: TRY004 - a bad file, reported like the rest
        return value

    def pipeline_parallel(self) -> tuple[tuple[int, ...], float]:
        """(pipeline-parallel degrees, per-stage overhead in seconds) the profile declares; ((1,), 0.0) when it
        declares none (its engine runs no pipeline). ValueError naming the field when malformed."""
        pp = self.extra.get("pipeline_parallel")
        if pp is None:
            return (1,), 0.0
        where = "pipeline_parallel"
        if not isinstance(pp, dict):
            raise ValueError(f"{where}: expected an object with degrees and stage_overhead_ms, got {pp!r}")  # noqa: TRY004 - a bad file, reported like the rest
        degrees = pp.get("degrees")
        if (not isinstance(degrees, list) or not degrees
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in degrees)):
            raise ValueError(f"{where}.degrees: expected a list of integers >= 1, got {degrees!r}")
        overhead = pp.get("stage_overhead_ms", 0.0)
        if isinstance(overhead, bool) or not isinstance(overhead, int | float) or overhead < 0:
            raise ValueError(f"{where}.stage_overhead_ms: expected a number >= 0, got {overhead!r}")
        return tuple(sorted({1, *degrees})), overhead / 1000.0

    @classmethod
    def from_dict(cls, doc: dict[str, Any], where: str = "profile") -> ProfileSet:
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("models"), dict):
            raise ValueError(f"{where}: not a Baton profile (expected \"format\": \"{FORMAT}\" and \"models\")")
        models: dict[str, dict[int, WorkerProfile]] = {}
        for model, tps in doc["models"].items():
            try:
                models[model] = {int(tp): WorkerProfile.from_dict(d, int(tp)) for tp, d in tps.items()}
            except (ValueError, AttributeError) as exc:
                raise ValueError(f"{where}: model {model}: {exc}") from None
        known = {"format", "models", "hardware", "engine", "source"}
        return cls(models, str(doc.get("hardware", "")), str(doc.get("engine", "")), str(doc.get("source", "")),
                   {k: v for k, v in doc.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "hardware": self.hardware, "engine": self.engine, "source": self.source,
                **self.extra,
                "models": {m: {str(tp): p.to_dict() for tp, p in sorted(tps.items())}
                           for m, tps in self.models.items()}}

    @classmethod
    def load(cls, name_or_path: str | Path) -> ProfileSet:
        """A built-in profile by name (`a100-80g-distserve`) or a profile file."""
        if str(name_or_path) in BUILTIN:
            text = resources.files("baton").joinpath("profile_data", BUILTIN[str(name_or_path)]).read_text(
                encoding="utf-8")
            return cls.from_dict(json.loads(text), str(name_or_path))
        path = Path(name_or_path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"{path}: no such profile file (built-in profiles: {', '.join(BUILTIN)})") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON: {exc.msg} at line {exc.lineno}") from None
        return cls.from_dict(doc, str(path))

    def save(self, path: str | Path) -> None:
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        tmp.replace(path)


# ------------------------------------------------------------------------------------------ fitting


def least_squares(rows: Sequence[Sequence[float]], ys: Sequence[float]) -> list[float]:
    """Ordinary least squares for a few coefficients (normal equations, Gaussian elimination with partial
    pivoting): no numpy, so the control plane can fit too. Columns that are all zero get coefficient 0."""
    k = len(rows[0])
    ata = [[sum(r[i] * r[j] for r in rows) for j in range(k)] for i in range(k)]
    aty = [sum(r[i] * y for r, y in zip(rows, ys, strict=True)) for i in range(k)]
    active = [i for i in range(k) if ata[i][i] > 0]
    m = [[ata[i][j] for j in active] + [aty[i]] for i in active]
    n = len(active)
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[piv][col]) < 1e-300:
            raise ValueError("the measurements do not determine the fit (too few distinct points)")
        m[col], m[piv] = m[piv], m[col]
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                for c in range(col, n + 1):
                    m[r][c] -= f * m[col][c]
    sol = [0.0] * k
    for idx, i in enumerate(active):
        sol[i] = m[idx][n] / m[idx][idx]
    return sol


def nonnegative_least_squares(rows: Sequence[Sequence[float]], ys: Sequence[float]) -> list[float]:
    """Least squares with every coefficient >= 0: a term whose fit comes out negative is dropped and the rest
    refitted (an active set, enough for three terms). Latency terms are costs: a negative one would predict
    negative step times outside the measured range."""
    k = len(rows[0])
    active = list(range(k))
    while True:
        sub = least_squares([[r[i] for i in active] for r in rows], ys)
        if all(v >= 0 for v in sub):
            out = [0.0] * k
            for i, v in zip(active, sub, strict=True):
                out[i] = v
            return out
        active.pop(min(range(len(sub)), key=lambda j: sub[j]))
        if not active:
            return [0.0] * k


def fit_prefill(samples: Sequence[tuple[Sequence[int], float]]) -> tuple[float, float, float]:
    """(prompt lengths of a batch, milliseconds) -> (a, b, c) >= 0 of a + b*sum(n) + c*sum(n^2)."""
    rows = [(1.0, float(sum(lens)), float(sum(n * n for n in lens))) for lens, _ in samples]
    a, b, c = nonnegative_least_squares(rows, [ms for _, ms in samples])
    return a, b, c


def fit_decode(samples: Sequence[tuple[int, int, float]]) -> tuple[float, float, float]:
    """(batch size, context tokens, milliseconds per step) -> (a, b, c) >= 0 of a + b*context + c*batch."""
    rows = [(1.0, float(ctx), float(bs)) for bs, ctx, _ in samples]
    a, b, c = nonnegative_least_squares(rows, [ms for _, _, ms in samples])
    return a, b, c
