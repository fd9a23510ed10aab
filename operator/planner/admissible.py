"""What a plan may offer and run: one validation path with the webhook.

A plan is only worth making if the service it describes is one the cluster accepts, so the planner asks the
same code a user's spec goes through rather than keeping its own copy of the rules:

* `tensor_parallel_rule(llmservice)`: which tensor-parallel degrees the search may offer for this service.
  A degree is laid over the service (`overlay.lay`, both roles) and judged by the webhook's own
  `admission.review`: the API's power-of-two rule, the engine's (the Baton engine runs TP 1 only), GPU limits;
  only problems the degree adds count, not ones the spec already had.
* `role_tensor_parallel_problem(tp)`: the API's rule for one role's `tensorParallel` alone (`api.RoleSpec`),
  for `baton plan`, which has no service to lay a degree over.
* `heads_problem(tp, heads)`: the model's rule, when its attention-head count is known (profile extra
  `attention_heads: {MODEL: N}`): each rank holds whole heads, so TP must divide them (vLLM refuses otherwise).
* `layout_problems(llmservice, layout)`: the gate before a plan runs: the webhook's review of the service
  with the layout laid over it. A plan that fails it is reported, never applied.

Pure: no I/O.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from baton.operator import admission, api
from baton.operator.planner.overlay import ROLES, effective, lay, running_layout
from pydantic import ValidationError

from baton.profile import ProfileSet

#: a tensor-parallel degree -> why it may not be offered, or None
TensorParallelRule = Callable[[int], str | None]


def role_tensor_parallel_problem(tensor_parallel: int) -> str | None:
    """Why the API refuses `tensorParallel` for a role (as the webhook words it), or None."""
    try:
        api.RoleSpec.model_validate({"tensorParallel": tensor_parallel})
    except ValidationError as exc:
        return "; ".join(api.format_validation_error(exc, api.RoleSpec))
    return None


def heads_problem(tensor_parallel: int, attention_heads: int | None) -> str | None:
    """Why the model cannot be split `tensor_parallel` ways, or None (also when its head count is unknown)."""
    if attention_heads and attention_heads % tensor_parallel:
        return f"the model's {attention_heads} attention heads do not split evenly over {tensor_parallel} GPUs"
    return None


def profile_attention_heads(profiles: ProfileSet, model: str) -> int | None:
    """The model's attention-head count when the profile file names it (`attention_heads: {MODEL: N}`)."""
    heads = profiles.extra.get("attention_heads")
    value = heads.get(model) if isinstance(heads, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def layout_problems(llmservice: dict, layout: Mapping[str, Any]) -> list[str]:
    """The webhook's problems with `llmservice` running `layout` (`status.plan.applied`'s shape)."""
    return admission.review(lay(llmservice, layout))


def tensor_parallel_rule(llmservice: dict) -> TensorParallelRule:
    """The degrees this service admits (see the module docstring). The returned function is pure."""
    running = running_layout(llmservice)
    already = set(admission.review(effective(llmservice)))

    def problem(tensor_parallel: int) -> str | None:
        layout = {**running, **{r: {**running[r], "tensorParallel": tensor_parallel} for r in ROLES}}
        new = [p for p in layout_problems(llmservice, layout) if p not in already]
        return "; ".join(new) or None

    return problem


__all__ = ["TensorParallelRule", "heads_problem", "layout_problems", "profile_attention_heads",
           "role_tensor_parallel_problem", "tensor_parallel_rule"]
