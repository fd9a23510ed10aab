"""`spec.networkPolicy` of an LLMService: the models (kept out of api.py, which is long enough).

The NetworkPolicies themselves are rendered by `render_network.py`; this module only says what a user may
write. Selectors follow Kubernetes' LabelSelector and NetworkPolicyPeer shapes, so they read like the
NetworkPolicy they end up in.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel


class _Model(BaseModel):
    # The same configuration as api._Model (camelCase aliases, unknown fields refused); not imported from
    # there because api.py imports this module.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              validate_assignment=False)


class LabelSelectorRequirement(_Model):
    key: Annotated[str, Field(min_length=1)]
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _values_fit_operator(self) -> LabelSelectorRequirement:
        from baton.operator.api import field_problems

        if self.operator in ("In", "NotIn") and not self.values:
            raise field_problems([("values", f"must not be empty with operator {self.operator}")])
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise field_problems([("values", f"must be empty with operator {self.operator}")])
        return self


class LabelSelector(_Model):
    """A Kubernetes LabelSelector; `{}` selects everything."""

    match_labels: dict[str, str] = Field(default_factory=dict)
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list)

    def manifest(self) -> dict:
        """As it goes into a NetworkPolicy: only the parts that are set (`{}` = everything)."""
        out: dict = {}
        if self.match_labels:
            out["matchLabels"] = dict(sorted(self.match_labels.items()))
        if self.match_expressions:
            out["matchExpressions"] = [
                {"key": e.key, "operator": e.operator, **({"values": list(e.values)} if e.values else {})}
                for e in self.match_expressions]
        return out


class NetworkPeer(_Model):
    """Who may connect, as a NetworkPolicyPeer: pods matching `podSelector` in the namespaces matching
    `namespaceSelector`. Only podSelector: pods of the LLMService's namespace; only namespaceSelector: every
    pod of those namespaces; `namespaceSelector: {}`: every namespace."""

    namespace_selector: LabelSelector | None = None
    pod_selector: LabelSelector | None = None

    @model_validator(mode="after")
    def _one_selector(self) -> NetworkPeer:
        from baton.operator.api import field_problems

        if self.namespace_selector is None and self.pod_selector is None:
            raise field_problems([("", "set namespaceSelector, podSelector or both")])
        return self

    def manifest(self) -> dict:
        out: dict = {}
        if self.namespace_selector is not None:
            out["namespaceSelector"] = self.namespace_selector.manifest()
        if self.pod_selector is not None:
            out["podSelector"] = self.pod_selector.manifest()
        return out


class NetworkPolicySpec(_Model):
    """Per-role NetworkPolicies (ingress): workers take HTTP only from their router's pods and the metrics
    scraper, KV ports only from the other worker role of this LLMService; the router takes HTTP from
    `routerFrom`. Policies are enforced only by a CNI plugin that implements them (Calico, Cilium, ...)."""

    enabled: bool | None = Field(
        default=None, description="Render the NetworkPolicies. Default: the operator's setting (Helm value "
        "networkPolicy.enabled, on).")
    metrics_from: list[NetworkPeer] | None = Field(
        default=None, description="Who may scrape the pods' metrics (served on each pod's HTTP port, so these "
        "peers reach the HTTP API too). Default: the operator's setting (Helm value networkPolicy.metricsFrom: "
        "pods labelled app.kubernetes.io/name=prometheus in any namespace). An empty list: nobody.")
    router_from: list[NetworkPeer] | None = Field(
        default=None, description="Who may call the router (the client endpoint). Default: anyone. An empty "
        "list: nobody but the metrics peers.")
