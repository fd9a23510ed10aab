"""What a simulation returns: per-request TTFT/TPOT, the replica timeline, GPU-hours, and the attainment and
percentiles computed from them with the shared workload model's definitions (`baton.workload`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from baton.workload import percentile


@dataclass(frozen=True)
class TimelinePoint:
    time_s: float
    prefill_replicas: int
    prefill_ready: int
    decode_replicas: int
    decode_ready: int
    prefill_reason: str
    decode_reason: str


@dataclass(frozen=True)
class RequestResult:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    ttft_s: float | None
    tpot_s: float | None

    def meets(self, ttft_slo_s: float, tpot_slo_s: float) -> bool:
        return (self.ttft_s is not None and self.ttft_s <= ttft_slo_s and self.tpot_s is not None
                and self.tpot_s <= tpot_slo_s)


@dataclass(frozen=True)
class SimResult:
    requests: list[RequestResult]
    timeline: list[TimelinePoint]
    gpu_hours: float
    end_s: float
    ttft_slo_s: float
    tpot_slo_s: float

    @property
    def attainment(self) -> float:
        """Share of requests meeting both TTFT and TPOT targets (unfinished requests count as misses)."""
        if not self.requests:
            return 1.0
        return sum(r.meets(self.ttft_slo_s, self.tpot_slo_s) for r in self.requests) / len(self.requests)

    @property
    def ttft_attainment(self) -> float:
        ok = sum(r.ttft_s is not None and r.ttft_s <= self.ttft_slo_s for r in self.requests)
        return ok / len(self.requests) if self.requests else 1.0

    @property
    def tpot_attainment(self) -> float:
        ok = sum(r.tpot_s is not None and r.tpot_s <= self.tpot_slo_s for r in self.requests)
        return ok / len(self.requests) if self.requests else 1.0

    def percentile(self, metric: str, q: float) -> float | None:
        """The q-th percentile (0..100) of `ttft_s` or `tpot_s` over the requests that have one."""
        return percentile([getattr(r, metric) for r in self.requests if getattr(r, metric) is not None], q)

    def summary(self) -> dict[str, Any]:
        return {"requests": len(self.requests), "attainment": self.attainment,
                "ttft_attainment": self.ttft_attainment, "tpot_attainment": self.tpot_attainment,
                "ttft_p90_s": self.percentile("ttft_s", 90), "tpot_p90_s": self.percentile("tpot_s", 90),
                "gpu_hours": self.gpu_hours, "end_s": self.end_s,
                "max_prefill": max((p.prefill_replicas for p in self.timeline), default=0),
                "max_decode": max((p.decode_replicas for p in self.timeline), default=0)}
