"""The workload a running service sees, as the planner's input, and when it moved enough to re-plan. Pure.

From Prometheus (`prometheus.PrometheusSource.workload`): the request rate at the router (or the workers), and
the mean and p90 of the request length histograms vLLM and Baton workers export
(`vllm:request_prompt_tokens` on prefill workers, `vllm:request_generation_tokens` on decode workers). Lengths
become lognormal distributions with that mean and p90: two numbers a histogram gives reliably. That is a fit to
moments, used because the basis has no requests to replay (the histograms are aggregated over all requests
and lose which output went with which prompt); `baton plan --trace` replays real (input, output) pairs
instead (`Workload.from_trace`), and the plan says which it used (`status.plan.workload.lengths`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from baton.workload import LengthDist, Workload

Z90 = 1.2815515655446004  # the standard normal's 90th percentile


@dataclass(frozen=True)
class WorkloadBasis:
    rate: float          # requests/s
    input_mean: float    # tokens
    input_p90: float | None
    output_mean: float
    output_p90: float | None
    #: the KV hand-off bandwidth the fleet measured and the plan used (GB/s; None: the configured one, `link.py`)
    kv_link_gb_s: float | None = None

    def workload(self, max_model_len: int | None = None) -> Workload:
        """Lengths as lognormals fitted to the measured mean and p90 (moments only); with `max_model_len`,
        clipped so no request exceeds the model's context (a prompt keeps room for one output token; outputs are
        clipped to the context too)."""
        cap_in = max_model_len - 1 if max_model_len else None
        return Workload(self.rate, lognormal_from_mean_p90(self.input_mean, self.input_p90, cap_in),
                        lognormal_from_mean_p90(self.output_mean, self.output_p90, max_model_len))

    def to_status(self) -> dict:
        out = {"rate": round(self.rate, 4), "inputMean": round(self.input_mean, 1),
               "outputMean": round(self.output_mean, 1)}
        if self.kv_link_gb_s is not None:
            out["kvLinkGBps"] = round(self.kv_link_gb_s, 4)
        return out


def lognormal_from_mean_p90(mean: float, p90: float | None, cap: int | None = None) -> LengthDist:
    """The lognormal length distribution with this mean and 90th percentile (sd = mean when p90 is unknown or
    impossible for a lognormal), clipped to [1, 20 x mean] and to `cap`."""
    mean = max(1.0, mean)
    sd = mean
    if p90 is not None and p90 > 0:
        d = math.log(p90 / mean)  # = Z90*sigma - sigma^2/2 for a lognormal
        disc = Z90 * Z90 - 2 * d
        if disc >= 0:
            sigma = max(0.0, Z90 - math.sqrt(disc))  # the smaller root: the less skewed fit
            sd = mean * math.sqrt(math.expm1(sigma * sigma))
    hi = max(2, round(20 * mean))
    return LengthDist.lognormal(round(mean, 1), round(sd, 1), 1, min(hi, cap) if cap else hi)


def moved(basis: WorkloadBasis, planned: dict | None, hysteresis: float) -> bool:
    """Whether the workload left the band around the basis the current plan was made for (no plan: yes). A
    measured KV link counts too: one that appears (the plan used the configured constant) or leaves the band
    re-plans; one that disappears (no hand-offs in the window) does not."""
    if not planned:
        return True
    for key, now in (("rate", basis.rate), ("inputMean", basis.input_mean), ("outputMean", basis.output_mean)):
        then = planned.get(key)
        if not isinstance(then, int | float) or then <= 0:
            return True
        if abs(now - then) > hysteresis * then:
            return True
    if basis.kv_link_gb_s is not None:
        then = planned.get("kvLinkGBps")
        if not isinstance(then, int | float) or then <= 0:
            return True
        if abs(basis.kv_link_gb_s - then) > hysteresis * then:
            return True
    return False
