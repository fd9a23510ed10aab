"""The arrival-rate model of the SLO autoscaler (operator/autoscale_policy.py): pure, no clock, no I/O.

Two estimates of the prompt-token arrival rate, both updated once per autoscaler evaluation:

- **Holt's linear smoothing** (level and trend, irregular time steps): the forecast `level + trend x h` sizes
  prefill *before* the measured rate catches up. A rate over a window of W seconds lags the arrival rate by
  about W/2 on a ramp, and a pod starts serving seconds to minutes after it is asked for, so the policy looks
  `W/2 + lead` ahead. The forecast only ever raises a scale-up; it never causes or blocks a scale-down.
- **A long-memory band** `mean + k x MAD` (exponentially weighted mean and mean absolute deviation of the rate,
  time constant `memory_s`): how high the load has been swinging recently. Scale-down sizes for the band rather
  than for the current rate, so a service whose traffic comes in bursts keeps the capacity for the bursts it
  has been seeing (as a Jacobson-style RTO keeps a margin of k deviations), while steady traffic (MAD -> 0)
  scales down to its mean.

`ArrivalModel.to_dict`/`from_dict` round-trip (the History is stored in the LLMService status).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ArrivalModel:
    """State of both estimates; `time_s` None = no sample yet. Rates in tokens/s, trend in tokens/s per s."""

    time_s: float | None = None
    level: float = 0.0
    trend: float = 0.0
    mean: float = 0.0
    mad: float = 0.0

    def update(self, rate: float, now_s: float, alpha: float, beta: float, memory_s: float,
               reset_after_s: float) -> ArrivalModel:
        """Fold in one measured rate. A gap longer than `reset_after_s` (an operator restart, lost metrics)
        restarts the trend from zero: a slope across a gap says nothing about now."""
        if self.time_s is None:
            return ArrivalModel(now_s, rate, 0.0, rate, 0.0)
        dt = now_s - self.time_s
        if dt <= 0:
            return self
        w = 1.0 - math.exp(-dt / memory_s) if memory_s > 0 else 1.0
        mean = self.mean + w * (rate - self.mean)
        mad = self.mad + w * (abs(rate - self.mean) - self.mad)
        if dt > reset_after_s:
            return ArrivalModel(now_s, rate, 0.0, mean, mad)
        predicted = self.level + self.trend * dt
        level = alpha * rate + (1 - alpha) * predicted
        trend = beta * (level - self.level) / dt + (1 - beta) * self.trend
        return ArrivalModel(now_s, level, trend, mean, mad)

    def forecast(self, horizon_s: float) -> float | None:
        """The rate `horizon_s` ahead (never negative); None before the first sample."""
        if self.time_s is None:
            return None
        return max(0.0, self.level + self.trend * horizon_s)

    def band(self, k: float) -> float | None:
        """`mean + k x MAD`: the rate the recent swings reach; None before the first sample."""
        if self.time_s is None:
            return None
        return self.mean + k * self.mad

    def to_dict(self) -> dict[str, Any]:
        return {"time": self.time_s, "level": self.level, "trend": self.trend, "mean": self.mean, "mad": self.mad}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> ArrivalModel:
        if not data or data.get("time") is None:
            return cls()
        return cls(float(data["time"]), float(data.get("level", 0.0)), float(data.get("trend", 0.0)),
                   float(data.get("mean", 0.0)), float(data.get("mad", 0.0)))
