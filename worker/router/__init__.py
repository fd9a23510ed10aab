"""`baton router`: the OpenAI-compatible front that drives prefill/decode disaggregation.

A client's request goes to a prefill worker first (same body, `stream: false`, `max_tokens: 1`,
`kv_transfer_params: {"do_remote_decode": true}`); the prefill response's `kv_transfer_params` go into the
decode hop, whose response (JSON or SSE) is passed back to the client unchanged. See `app.py` for the flow,
fallbacks and retries, `prefill_tier.py` for the prefill hop, `hops.py` for upstream I/O and its timeouts,
`config.py` for the options, `policy.py` for worker selection, `discovery.py` for static lists and Kubernetes
Endpoints, `metrics.py` for the client-side TTFT/TPOT histograms (the SLO signals), `prefill_failure.py` for
what a failed prefill hop leads to (retry, recompute, 503), `stages.py` for the TTFT stage breakdown, and
`request.py` for the per-request state and body helpers.
"""

from baton.worker.router.app import create_app
from baton.worker.router.config import RouterConfig
from baton.worker.router.policy import POLICIES, make_policy

__all__ = ["POLICIES", "RouterConfig", "create_app", "make_policy"]
