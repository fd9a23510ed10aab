"""A thin, synchronous Kubernetes client for the few calls the operator makes.

Why not the generated typed clients: the reconciler treats every child as a plain manifest (that is what
`render` returns) and applies it with server-side apply, which the typed clients do not express well. This
module maps (apiVersion, kind) to REST paths for the kinds Baton manages and speaks JSON; callers run it in a
thread (`asyncio.to_thread`) from kopf's event loop.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

#: Field manager used for everything the reconciler owns.
FIELD_MANAGER = "baton-operator"
#: Field manager that owns `spec.replicas` of role Deployments while autoscaling is on.
AUTOSCALER_FIELD_MANAGER = "baton-autoscaler"

GROUP, VERSION, PLURAL = "baton.dev", "v1alpha1", "llmservices"


@dataclass(frozen=True)
class KindInfo:
    """Where a kind lives in the REST API."""

    prefix: str  # "/api/v1" or "/apis/apps/v1"
    plural: str
    namespaced: bool = True


KINDS: dict[tuple[str, str], KindInfo] = {
    ("v1", "ServiceAccount"): KindInfo("/api/v1", "serviceaccounts"),
    ("v1", "ConfigMap"): KindInfo("/api/v1", "configmaps"),
    ("v1", "Service"): KindInfo("/api/v1", "services"),
    ("v1", "Secret"): KindInfo("/api/v1", "secrets"),
    ("v1", "Pod"): KindInfo("/api/v1", "pods"),
    ("v1", "Node"): KindInfo("/api/v1", "nodes", namespaced=False),
    ("apps/v1", "Deployment"): KindInfo("/apis/apps", "deployments"),
    ("rbac.authorization.k8s.io/v1", "Role"): KindInfo("/apis/rbac.authorization.k8s.io", "roles"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): KindInfo("/apis/rbac.authorization.k8s.io", "rolebindings"),
    ("networking.k8s.io/v1", "NetworkPolicy"): KindInfo("/apis/networking.k8s.io", "networkpolicies"),
    ("policy/v1beta1", "PodDisruptionBudget"): KindInfo("/apis/policy", "poddisruptionbudgets"),
    ("policy/v1", "PodDisruptionBudget"): KindInfo("/apis/policy", "poddisruptionbudgets"),
    (f"{GROUP}/{VERSION}", "LLMService"): KindInfo(f"/apis/{GROUP}", PLURAL),
    ("admissionregistration.k8s.io/v1", "ValidatingWebhookConfiguration"):
        KindInfo("/apis/admissionregistration.k8s.io", "validatingwebhookconfigurations", namespaced=False),
    ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration"):
        KindInfo("/apis/admissionregistration.k8s.io", "mutatingwebhookconfigurations", namespaced=False),
}


class KubeError(Exception):
    """An API call failed; `status` is the HTTP status (0 when the server could not be reached)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _path(api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
    try:
        info = KINDS[(api_version, kind)]
    except KeyError:
        raise KubeError(0, f"Baton does not manage {kind} in {api_version}") from None
    prefix = info.prefix if api_version == "v1" else f"{info.prefix}/{api_version.split('/', 1)[1]}"
    path = prefix
    if info.namespaced and namespace:
        path += f"/namespaces/{namespace}"
    path += f"/{info.plural}"
    if name:
        path += f"/{name}"
    return path


def _message(exc: ApiException) -> str:
    try:
        return json.loads(exc.body).get("message") or exc.reason
    except (TypeError, ValueError, AttributeError):
        return str(exc.reason)


class Kube:
    """The operator's API access: server-side apply, reads, scale and status patches."""

    def __init__(self, api_client: k8s.ApiClient) -> None:
        self.api = api_client

    @classmethod
    def from_environment(cls, kubeconfig: str | None = None) -> Kube:
        """In a pod: the service account; elsewhere: `kubeconfig` or $KUBECONFIG or ~/.kube/config."""
        configuration = k8s.Configuration()
        try:
            k8s_config.load_incluster_config(client_configuration=configuration)
        except k8s_config.ConfigException:
            # $KUBECONFIG is read here, not at import: the client fixes its default path when first imported.
            k8s_config.load_kube_config(config_file=kubeconfig or os.environ.get("KUBECONFIG"),
                                        client_configuration=configuration)
        return cls(k8s.ApiClient(configuration))

    def _call(self, method: str, path: str, *, body: Any = None, query: list[tuple[str, str]] | None = None,
              content_type: str = "application/json", timeout: float = 30.0) -> dict:
        try:
            method, url, headers, payload, _ = self.api.param_serialize(
                method, path, query_params=query or [], body=body, auth_settings=["BearerToken"],
                header_params={"Content-Type": content_type, "Accept": "application/json"})
            response = self.api.call_api(method, url, header_params=headers, body=payload,
                                         _request_timeout=timeout)
            raw = response.read()
        except ApiException as exc:
            raise KubeError(exc.status or 0, _message(exc)) from None
        except (OSError, urllib3.exceptions.HTTPError) as exc:  # refused, DNS, TLS: apiserver unreachable
            raise KubeError(0, f"cannot reach the Kubernetes API: {exc}") from None
        if response.status >= 400:
            try:
                message = json.loads(raw).get("message") or response.reason
            except ValueError:
                message = (raw or b"").decode(errors="replace")[:500] or response.reason
            raise KubeError(response.status, message)
        data = json.loads(raw) if raw else {}
        return data if isinstance(data, dict) else {}

    def create(self, manifest: dict) -> dict:
        meta = manifest["metadata"]
        return self._call("POST", _path(manifest["apiVersion"], manifest["kind"], meta.get("namespace")),
                          body=manifest)

    def apply(self, manifest: dict, *, field_manager: str = FIELD_MANAGER, force: bool = True) -> dict:
        """Server-side apply: create or update exactly the fields in `manifest`, owned by `field_manager`."""
        meta = manifest["metadata"]
        path = _path(manifest["apiVersion"], manifest["kind"], meta.get("namespace"), meta["name"])
        query = [("fieldManager", field_manager)] + ([("force", "true")] if force else [])
        # The body is sent as a JSON string: JSON is valid YAML, and the client only serialises dicts
        # for content types that contain "json".
        return self._call("PATCH", path, body=json.dumps(manifest), query=query,
                          content_type="application/apply-patch+yaml")

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict | None:
        try:
            return self._call("GET", _path(api_version, kind, namespace, name))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, api_version: str, kind: str, namespace: str | None, label_selector: str = "") -> list[dict]:
        query = [("labelSelector", label_selector)] if label_selector else []
        return self._call("GET", _path(api_version, kind, namespace), query=query).get("items", [])

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> bool:
        """Delete with foreground-independent background propagation; False when it was already gone."""
        try:
            self._call("DELETE", _path(api_version, kind, namespace, name),
                       body={"propagationPolicy": "Background"})
            return True
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise

    def patch_merge(self, api_version: str, kind: str, namespace: str | None, name: str, patch: dict,
                    subresource: str = "") -> dict:
        path = _path(api_version, kind, namespace, name) + (f"/{subresource}" if subresource else "")
        return self._call("PATCH", path, body=patch, content_type="application/merge-patch+json")

    def set_replicas(self, namespace: str, deployment: str, replicas: int,
                     field_manager: str = AUTOSCALER_FIELD_MANAGER) -> dict:
        """Scale a Deployment through its scale subresource, as an autoscaler (not the reconciler) would."""
        path = _path("apps/v1", "Deployment", namespace, deployment) + "/scale"
        return self._call("PATCH", path, body={"spec": {"replicas": replicas}},
                          query=[("fieldManager", field_manager)],
                          content_type="application/merge-patch+json")

    def patch_llmservice_status(self, namespace: str, name: str, status: dict) -> dict:
        return self.patch_merge(f"{GROUP}/{VERSION}", "LLMService", namespace, name, {"status": status},
                                subresource="status")
