"""The KV hand-off link a plan assumes: the bandwidth the fleet measured, when there is one, else the configured
constant (`spec.planner.cluster`, `baton plan --intra-node-bw/--inter-node-bw`). Pure.

The measurement is what the decode workers saw (`baton_kv_transfer_*`, exported by Baton workers for every KV
import: bytes and seconds per transfer): `rate(bytes) / rate(seconds)` over the planner's window is the
effective bandwidth of a hand-off, connection set-up and framing included, which is what a request's TTFT pays.
It stands for the link those hand-offs crossed: inside a node when the running layout keeps each prefill next to
a decode pod (`locality: node`) or the cluster is one node, else between nodes (`any`/`zone` on several nodes:
some hops may have stayed inside a node, so the number is an upper bound of the inter-node link's). The other
link stays configured. Too few transfers in the window (`MIN_TRANSFERS`) and the configured constant is used,
and the plan says which.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from baton.operator.planner.search import Cluster

#: hand-offs a window needs before its bandwidth replaces the configured one (fewer: noise, or a cold fleet)
MIN_TRANSFERS = 10


@dataclass(frozen=True)
class LinkMeasurement:
    """What Prometheus says about the fleet's KV hand-offs over one window (None: no data)."""

    bytes_per_s: float | None      # sum(rate(baton_kv_transfer_bytes_total))
    seconds_per_s: float | None    # sum(rate(baton_kv_transfer_seconds_sum)): transfer-seconds per second
    transfers_per_s: float | None  # sum(rate(baton_kv_transfer_seconds_count))
    window_s: float

    @property
    def transfers(self) -> float:
        return (self.transfers_per_s or 0.0) * self.window_s

    @property
    def gb_s(self) -> float | None:
        """The effective bandwidth in GB/s (bytes, not bits); None when nothing was measured."""
        if not self.bytes_per_s or not self.seconds_per_s or self.bytes_per_s <= 0 or self.seconds_per_s <= 0:
            return None
        return self.bytes_per_s / self.seconds_per_s / 1e9


@dataclass(frozen=True)
class LinkChoice:
    """The cluster a plan is made for (one link maybe replaced by the measurement) and where each number is from."""

    cluster: Cluster
    source: str                 # "configured" | "measured"
    link: str | None = None     # "node" | "cross-node": which link the measurement replaced
    measured_gb_s: float | None = None
    transfers: float = 0.0
    why: str = ""               # one line for the report and status.plan (`Plan.link_source`)


def choose_link(cluster: Cluster, measured: LinkMeasurement | None, running_locality: str,
                min_transfers: int = MIN_TRANSFERS) -> LinkChoice:
    """The link bandwidths to plan with (see the module docstring)."""
    configured = (f"configured: {cluster.intra_node_gb_s:g} GB/s in a node, {cluster.inter_node_gb_s:g} GB/s "
                  "across")
    if measured is None or measured.gb_s is None:
        return LinkChoice(cluster, "configured", why=f"{configured} (no KV hand-off measured)")
    gb_s, n = measured.gb_s, measured.transfers
    if n < min_transfers:
        return LinkChoice(cluster, "configured", measured_gb_s=gb_s, transfers=n,
                          why=f"{configured} (only {n:.0f} KV hand-offs measured, fewer than {min_transfers})")
    if running_locality == "node" or cluster.nodes == 1:
        link, new = "node", dataclasses.replace(cluster, intra_node_gb_s=gb_s)
        where = "in a node"
    else:
        link, new = "cross-node", dataclasses.replace(cluster, inter_node_gb_s=gb_s)
        where = "across nodes"
    return LinkChoice(new, "measured", link, gb_s, n,
                      f"measured: {gb_s:.3g} GB/s {where} over {n:.0f} KV hand-offs (baton_kv_transfer_*), "
                      f"instead of the configured {cluster.intra_node_gb_s if link == 'node' else cluster.inter_node_gb_s:g} GB/s")


__all__ = ["MIN_TRANSFERS", "LinkChoice", "LinkMeasurement", "choose_link"]
