"""The DistServe planner: per-phase parallelism, replicas and locality from SLOs, a workload and measured
latency profiles (pure functions; `baton plan` and the operator's `spec.planner` are their I/O shells)."""
from baton.operator.planner.instance import Targets, max_goodput
from baton.operator.planner.search import (
           COLOCATED,
           DISAGGREGATED,
           SLO,
           Cluster,
           FleetCheck,
           Layout,
           Plan,
           plan,
)

__all__ = ["COLOCATED", "DISAGGREGATED", "SLO", "Cluster", "FleetCheck", "Layout", "Plan", "Targets",
           "max_goodput", "plan"]
