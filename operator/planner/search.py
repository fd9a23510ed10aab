"""DistServe's placement search: parallelism, instance counts and locality per phase, and the colocated rival.

Pure: profile + SLO + workload + cluster in, a ranked list of layouts out. How:

0. Tensor-parallel degrees: those of the profile that fit a node, that the model splits into (its attention
   heads, when known) and that the service's webhook admits (`admissible.py`: one validation path, the
   API's own rules, not a copy); each one left out is a note. Pipeline-parallel degrees: those the profile
   declares (its engine runs them: vLLM's `--pipeline-parallel-size`, DistServe; the Baton engine none), when
   the caller asks for them (`pipeline=True`), each combined with every degree above so that one instance
   (TP x PP GPUs) fits a node. A pipelined instance is DistServe's model (`profile.PipelinedProfile`).
1. Per phase and (tensor, pipeline) degree, the most requests/s one instance carries within its own SLO
   (`instance.max_goodput`: prefill against TTFT, decode against TPOT, bisection on the rate of the same
   requests), as DistServe does. The prefill instance's TTFT includes the KV hand-off to its decode instance
   over the link the locality implies.
2. Locality: a request's KV cache is `prompt tokens x kv bytes per token`. When its p90 hand-off over the
   inter-node link takes more than `handoff_budget` of the TTFT target, the plan keeps each prefill next to a
   decode instance in one node (`kvTransfer.locality: node`, DistServe's low node-affinity case); else the
   phases go wherever there are GPUs (`any`). When the service's pools cannot share a node
   (`node_locality_blocked`), the plan is `any` with the hand-off over the inter-node link, and says why.
   A colocated choice is `any`: it hands no KV across.
3. Layouts: for each (prefill TP, decode TP) the fewest instances that carry the target rate (or, with no
   target, the mix that carries the most per GPU within the cluster). Capacity = min(n_p x g_p, n_d x g_d);
   the smaller side is the SLO that binds. The colocated rival: n instances of one TP, prefill and decode in
   each, against both SLOs, scheduled as its profile's engine does (chunked prefill, or whole-prompt steps
   that stall the decodes: `instance.colocated_latencies`). The best of all is chosen: colocation when it wins (the gain is then < 1x).
4. The best layout is simulated as a whole fleet (the autoscaler simulator with a fixed fleet), so the
   prediction includes queueing between the phases.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from baton.operator.planner.admissible import TensorParallelRule, heads_problem, role_tensor_parallel_problem
from baton.operator.planner.instance import (
    Latencies,
    Targets,
    colocated_latencies,
    decode_latencies,
    max_goodput,
    prefill_latencies,
)
from baton.operator.simulate import SimConfig, fixed_controller, simulate

from baton.profile import ModelProfiles
from baton.workload import Request, Workload, attainment, percentile, rescale

DISAGGREGATED, COLOCATED = "disaggregated", "colocated"


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float
    attainment: float = 0.9


@dataclass(frozen=True)
class Cluster:
    """The GPUs a plan may use. Bandwidths in GB/s (bytes, not bits)."""

    gpus_per_node: int
    nodes: int = 1
    intra_node_gb_s: float = 300.0   # NVLink-class
    inter_node_gb_s: float = 12.5    # 100 Gb/s Ethernet or one IB port

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass(frozen=True)
class Layout:
    """One candidate: instances per phase and their tensor-parallel degree, and what it carries."""

    kind: str
    prefill_tp: int
    decode_tp: int
    prefill_replicas: int
    decode_replicas: int
    gpus: int
    capacity_rps: float          # requests/s the layout carries within the SLO (min over the phases)
    binding: str                 # "ttft" | "tpot" | "both" (colocated: whichever fails first)
    prefill_instance_rps: float  # per-instance goodput of each phase (colocated: of one instance)
    decode_instance_rps: float
    prefill_pp: int = 1          # pipeline stages of each instance (1: none)
    decode_pp: int = 1

    @property
    def goodput_per_gpu(self) -> float:
        return self.capacity_rps / self.gpus if self.gpus else 0.0

    @property
    def pipelined(self) -> bool:
        """Whether an instance of either phase runs pipeline stages (an LLMService cannot say so yet)."""
        return self.prefill_pp > 1 or self.decode_pp > 1

    def describe(self) -> str:
        if self.kind == COLOCATED:
            return f"colocated {self.prefill_replicas} x {degree(self.prefill_tp, self.prefill_pp)}"
        return (f"prefill {self.prefill_replicas} x {degree(self.prefill_tp, self.prefill_pp)} + "
                f"decode {self.decode_replicas} x {degree(self.decode_tp, self.decode_pp)}")


def degree(tp: int, pp: int = 1) -> str:
    """`TP2`, or `TP1 PP2` for a pipelined instance."""
    return f"TP{tp}" if pp == 1 else f"TP{tp} PP{pp}"


@dataclass(frozen=True)
class FleetCheck:
    """The chosen layout simulated as a whole fleet at the planned rate."""

    rate_rps: float
    ttft_attainment: float
    tpot_attainment: float
    attainment: float
    ttft_p90_s: float | None
    tpot_p90_s: float | None


@dataclass(frozen=True)
class Plan:
    chosen: Layout | None
    colocated: Layout | None
    candidates: list[Layout]
    locality: str
    handoff_p90_s: dict[str, float]      # "node" | "cross-node" -> p90 KV hand-off seconds
    workload: Workload
    slo: SLO
    cluster: Cluster
    target_rps: float | None
    check: FleetCheck | None = None
    notes: list[str] = field(default_factory=list)
    #: per-instance goodput (req/s) by phase ("prefill", "decode", "colocated") and tensor-parallel degree
    instance_rps: dict[str, dict[int, float]] = field(default_factory=dict)
    #: why the locality is `any` although the hand-off wanted `node` (the pools cannot share a node); else ""
    locality_note: str = ""
    #: per-instance goodput of pipelined instances by phase and (tensor, pipeline) degree (pipeline > 1 only)
    pipeline_rps: dict[str, dict[tuple[int, int], float]] = field(default_factory=dict)
    #: where the KV hand-off bandwidths came from: "configured", or what the fleet measured (`link.py`)
    link_source: str = "configured"
    #: the best layout without pipeline parallelism: what an LLMService can run (`chosen` when it has none)
    applicable: Layout | None = None
    #: how the colocated rival was scheduled: its profile's engine runs chunked prefill, or whole-prompt steps
    colocated_chunked: bool = False

    @property
    def gain_over_colocated(self) -> float | None:
        if not self.chosen or not self.colocated or self.colocated.goodput_per_gpu <= 0:
            return None
        return self.chosen.goodput_per_gpu / self.colocated.goodput_per_gpu

    def why(self) -> str:
        """One line: which SLO binds the chosen layout and why this locality."""
        if not self.chosen:
            return "no layout meets the SLO on this cluster at any rate"
        c = self.chosen
        if c.kind == COLOCATED:
            splits = [x for x in self.candidates if x.kind == DISAGGREGATED]
            if self.target_rps:  # ranked by the fewest GPUs that carry the target
                fewest = min((x.gpus for x in splits), default=None)
                than = f"the best split needs {fewest}" if fewest is not None else "no split carries it"
                return (f"colocated carries the target {self.target_rps:.2f} req/s with {c.gpus} GPU(s), the "
                        f"fewest of any layout ({than})")
            best = max((x.goodput_per_gpu for x in splits), default=0.0)
            return (f"colocated carries {c.goodput_per_gpu:.2f} req/s per GPU, more than any disaggregated "
                    f"layout ({best:.2f}): at these SLOs the phases do not interfere enough to split them")
        side = {"ttft": f"TTFT {self.slo.ttft_s * 1000:g} ms binds (prefill is the bottleneck)",
                "tpot": f"TPOT {self.slo.tpot_s * 1000:g} ms binds (decode is the bottleneck)",
                "both": "TTFT and TPOT bind alike"}[c.binding]
        cross = self.handoff_p90_s.get("cross-node", 0.0)
        loc = (f"locality node: a p90 KV hand-off across nodes takes {cross * 1000:.0f} ms of the "
               f"{self.slo.ttft_s * 1000:g} ms TTFT budget" if self.locality == "node" else
               f"locality any: a p90 KV hand-off across nodes takes {cross * 1000:.1f} ms")
        if self.locality_note:
            loc += (f" of the {self.slo.ttft_s * 1000:g} ms TTFT budget, enough to keep the phases in one node, "
                    f"but {self.locality_note}")
        return f"{side}; {loc}"


def _handoff(kv_bytes_per_token: float, gb_s: float):
    if kv_bytes_per_token <= 0 or gb_s <= 0:
        return None
    per_token = kv_bytes_per_token / (gb_s * 1e9)
    return lambda r: r.prompt_tokens * per_token


def _fewest(target: float, per_instance: float) -> int:
    return max(1, math.ceil(target / per_instance - 1e-9))


#: one instance's parallelism: (tensor-parallel degree, pipeline stages); it takes tp x pp GPUs
Parallel = tuple[int, int]


def _disagg_layout(par_p: Parallel, par_d: Parallel, g_p: float, g_d: float, n_p: int, n_d: int) -> Layout:
    (tp_p, pp_p), (tp_d, pp_d) = par_p, par_d
    cap_p, cap_d = n_p * g_p, n_d * g_d
    binding = "both" if math.isclose(cap_p, cap_d, rel_tol=1e-6) else ("ttft" if cap_p < cap_d else "tpot")
    return Layout(DISAGGREGATED, tp_p, tp_d, n_p, n_d, n_p * tp_p * pp_p + n_d * tp_d * pp_d, min(cap_p, cap_d),
                  binding, g_p, g_d, pp_p, pp_d)


def _best_mix(par_p: Parallel, par_d: Parallel, g_p: float, g_d: float, gpus: int) -> Layout | None:
    """The instance counts within `gpus` that carry the most per GPU (ties: the larger capacity)."""
    best: Layout | None = None
    size_p, size_d = par_p[0] * par_p[1], par_d[0] * par_d[1]
    for n_p in range(1, gpus // size_p + 1):
        for n_d in range(1, (gpus - n_p * size_p) // size_d + 1):
            lay = _disagg_layout(par_p, par_d, g_p, g_d, n_p, n_d)
            if best is None or (lay.goodput_per_gpu, lay.capacity_rps) > (best.goodput_per_gpu, best.capacity_rps):
                best = lay
    return best


def searchable_degrees(degrees: Sequence[int], gpus_per_node: int, rule: TensorParallelRule,
                       attention_heads: int | None, notes: list[str]) -> list[int]:
    """The degrees that fit a node and that the model and `rule` accept; a note for each one refused."""
    out = []
    for tp in degrees:
        if tp > gpus_per_node:
            continue
        why = heads_problem(tp, attention_heads) or rule(tp)
        if why is None:
            out.append(tp)
        elif (note := f"TP{tp} not searched: {why}") not in notes:
            notes.append(note)
    return out


def parallel_degrees(tps: Sequence[int], pipeline_degrees: Sequence[int], gpus_per_node: int) -> list[Parallel]:
    """Every (tensor, pipeline) pair of the searchable degrees whose instance fits a node, by GPUs then TP."""
    pairs = {(tp, pp) for tp in tps for pp in pipeline_degrees if tp * pp <= gpus_per_node}
    return sorted(pairs, key=lambda x: (x[0] * x[1], -x[1]))


def plan(profiles: ModelProfiles, workload: Workload, slo: SLO, cluster: Cluster, *,
         target_rps: float | None = None, kv_bytes_per_token: float | None = None, handoff_budget: float = 0.1,
         colocated_profiles: ModelProfiles | None = None, num_requests: int = 1000, seed: int = 0,
         check: bool = True, progress: Callable[[str], None] | None = None,
         tensor_parallel_rule: TensorParallelRule = role_tensor_parallel_problem,
         attention_heads: int | None = None, node_locality_blocked: str | None = None,
         pipeline: bool = True, link_source: str = "configured") -> Plan:
    """Search the layouts for `workload` (lengths; its rate is the target unless `target_rps` is given, and
    0 means "no target: the most per GPU the cluster allows"). See the module docstring.

    `colocated_profiles`: the engine the colocated rival runs (default: the same profiles; DistServe compared
    against vLLM's own fits). `kv_bytes_per_token` defaults to the profile's. `tensor_parallel_rule`: why a
    degree may not be offered (default the API's rule for a role; the operator passes its service's webhook
    review, `admissible.tensor_parallel_rule`); `attention_heads`: the model's, when known.
    `node_locality_blocked`: why the service's prefill and decode pods can never share a node (see
    `overlay.node_pairing_problem`), None when they can. `pipeline`: search the pipeline-parallel degrees the
    profile declares (the operator passes False: an LLMService has no pipeline field, so such a plan could not
    be applied). `link_source`: where `cluster`'s bandwidths came from, for the report (`link.py`)."""
    if kv_bytes_per_token is None:
        kv_bytes_per_token = profiles.kv_bytes_per_token
    coloc = colocated_profiles or profiles
    target = workload.rate if target_rps is None else target_rps
    target = target if target and target > 0 else None
    reqs = workload.requests(num_requests, seed, rate=1.0)  # lengths and arrival shape; re-timed per rate
    notes: list[str] = []
    tps = searchable_degrees(profiles.tensor_parallel_degrees, cluster.gpus_per_node, tensor_parallel_rule,
                             attention_heads, notes)
    coloc_tps = searchable_degrees(coloc.tensor_parallel_degrees, cluster.gpus_per_node, tensor_parallel_rule,
                                   attention_heads, notes)
    if not tps:
        notes.append(f"no tensor-parallel degree of the profile ({profiles.tensor_parallel_degrees}) fits a "
                     f"node of {cluster.gpus_per_node} GPUs and is admitted")
    units = parallel_degrees(tps, profiles.pipeline_degrees if pipeline else (1,), cluster.gpus_per_node)

    handoff_p90 = {}
    links = {"node": cluster.intra_node_gb_s, "cross-node": cluster.inter_node_gb_s}
    for name, bw in links.items():
        fn = _handoff(kv_bytes_per_token, bw)
        handoff_p90[name] = percentile([fn(r) for r in reqs], 90) if fn else 0.0
    locality = "node" if handoff_p90["cross-node"] > handoff_budget * slo.ttft_s else "any"
    locality_note = ""
    if locality == "node" and node_locality_blocked:
        locality, locality_note = "any", node_locality_blocked
        notes.append(f"locality any, not node: {node_locality_blocked}")
    if cluster.nodes == 1 and not node_locality_blocked:
        link = "node"  # one node: every hand-off stays inside it
    else:
        link = "node" if locality == "node" else "cross-node"
    handoff = _handoff(kv_bytes_per_token, links[link])

    ttft_only = Targets(slo.ttft_s, None, slo.attainment)
    tpot_only = Targets(None, slo.tpot_s, slo.attainment)
    both = Targets(slo.ttft_s, slo.tpot_s, slo.attainment)
    say = progress or (lambda _msg: None)
    g_p: dict[Parallel, float] = {}
    g_d: dict[Parallel, float] = {}
    g_c: dict[int, float] = {}
    for unit in units:
        say(f"goodput of one {degree(*unit)} prefill and one {degree(*unit)} decode instance")
        prof = profiles.pipelined(*unit)
        g_p[unit] = max_goodput(lambda rs, p=prof: prefill_latencies(p, rs, handoff), reqs, ttft_only)
        g_d[unit] = max_goodput(lambda rs, p=prof: decode_latencies(p, rs), reqs, tpot_only)
    for tp in coloc_tps:
        say(f"goodput of one colocated TP{tp} instance")
        prof = coloc.get(tp)
        g_c[tp] = max_goodput(lambda rs, p=prof: colocated_latencies(p, rs, chunked=coloc.chunked_prefill), reqs,
                              both)

    candidates: list[Layout] = []
    for u_p in units:
        for u_d in units:
            if g_p[u_p] <= 0 or g_d[u_d] <= 0:
                continue
            if locality == "node" and u_p[0] * u_p[1] + u_d[0] * u_d[1] > cluster.gpus_per_node:
                continue
            if target:
                lay = _disagg_layout(u_p, u_d, g_p[u_p], g_d[u_d], _fewest(target, g_p[u_p]),
                                     _fewest(target, g_d[u_d]))
            else:
                lay = _best_mix(u_p, u_d, g_p[u_p], g_d[u_d], cluster.gpus)
            if lay and lay.gpus <= cluster.gpus:
                candidates.append(lay)
    colocated: list[Layout] = []
    for tp, g in g_c.items():
        if g <= 0:
            continue
        n = _fewest(target, g) if target else cluster.gpus // tp
        if n * tp <= cluster.gpus and n > 0:
            colocated.append(Layout(COLOCATED, tp, tp, n, n, n * tp, n * g, "both", g, g))

    def rank(lay: Layout) -> tuple:
        # with a target: the fewest GPUs that carry it, then the most per GPU; without: the most per GPU. A tie
        # goes to the layout without pipeline stages (an LLMService can run it)
        return ((lay.gpus, -lay.goodput_per_gpu, lay.pipelined) if target else
                (-lay.goodput_per_gpu, lay.gpus, lay.pipelined))

    candidates.sort(key=rank)
    colocated.sort(key=rank)
    if target and not candidates:
        notes.append(f"no disaggregated layout carries {target:g} req/s within {cluster.gpus} GPUs")
    # the best layout overall: colocation is chosen when it beats every disaggregated layout
    chosen = min(candidates[:1] + colocated[:1], key=rank, default=None)
    if chosen is not None and chosen.kind == COLOCATED:
        # one pool of decode workers that compute their own prompts: no KV hand-off, no prefill pod to be near
        locality, locality_note = "any", ""
    flat = {"prefill": {tp: g for (tp, pp), g in g_p.items() if pp == 1},
            "decode": {tp: g for (tp, pp), g in g_d.items() if pp == 1}, "colocated": g_c}
    piped = {"prefill": {u: g for u, g in g_p.items() if u[1] > 1},
             "decode": {u: g for u, g in g_d.items() if u[1] > 1}}
    applicable = min([c for c in candidates if not c.pipelined][:1] + colocated[:1], key=rank, default=None)
    result = Plan(chosen, colocated[0] if colocated else None, candidates + colocated, locality, handoff_p90,
                  workload, slo, cluster, target, None, notes, flat, locality_note,
                  piped if any(piped.values()) else {}, link_source, applicable, coloc.chunked_prefill)
    if check and chosen and chosen.pipelined:
        notes.append("fleet sim not run: the fleet simulator has no pipeline stages (the per-instance "
                     "simulations above do)")
    elif check and chosen:
        say(f"simulating the chosen fleet ({chosen.describe()})")
        rate = min(target, chosen.capacity_rps) if target else chosen.capacity_rps
        fleet = check_fleet(chosen, coloc if chosen.kind == COLOCATED else profiles, reqs, slo, rate, handoff)
        result = dataclasses.replace(result, check=fleet)
    return result


def check_fleet(layout: Layout, profiles: ModelProfiles, reqs: Sequence[Request], slo: SLO, rate: float,
                handoff=None) -> FleetCheck:
    """Simulate the whole layout at `rate` (the same requests, re-timed) with the fleet simulator."""


    timed = rescale(list(reqs), rate)
    if layout.kind == COLOCATED:
        prof = profiles.get(layout.prefill_tp)
        # n identical instances behind round-robin: each sees every n-th request
        n = layout.prefill_replicas
        ttft: list[float | None] = [None] * len(timed)
        tpot: list[float | None] = [None] * len(timed)
        for j in range(n):
            idx = list(range(j, len(timed), n))
            lat = colocated_latencies(prof, [timed[i] for i in idx], chunked=profiles.chunked_prefill)
            for k, i in enumerate(idx):
                ttft[i], tpot[i] = lat.ttft[k], lat.tpot[k]
        lat = Latencies(ttft, tpot)
    else:
        p, d = profiles.get(layout.prefill_tp), profiles.get(layout.decode_tp)
        mean_handoff = sum(handoff(r) for r in timed) / len(timed) if handoff and timed else 0.0
        cfg = SimConfig(p, d, ttft_slo_s=slo.ttft_s, tpot_slo_s=slo.tpot_s,
                        max_batch_tokens=p.batch_token_limit, kv_transfer_s=mean_handoff, interval_s=1e9,
                        drain_limit_s=1e6, initial_prefill=layout.prefill_replicas,
                        initial_decode=layout.decode_replicas)
        res = simulate(cfg, timed, fixed_controller(layout.prefill_replicas, layout.decode_replicas))
        lat = Latencies([r.ttft_s for r in res.requests], [r.tpot_s for r in res.requests])
    n = len(timed)
    both = sum(1 for a, b in zip(lat.ttft, lat.tpot, strict=True)
               if a is not None and b is not None and a <= slo.ttft_s and b <= slo.tpot_s) / n if n else 1.0
    return FleetCheck(rate, attainment(lat.ttft, slo.ttft_s), attainment(lat.tpot, slo.tpot_s), both,
                      percentile([x for x in lat.ttft if x is not None], 90),
                      percentile([x for x in lat.tpot if x is not None], 90))
