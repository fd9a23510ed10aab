"""Where the workers are: static URL lists, or the Endpoints of the per-role headless Services.

Kubernetes discovery polls `Endpoints` objects (the API the operator's headless Services fill; works on 1.20
without EndpointSlice RBAC) every `interval` seconds with the official client: in-cluster config when
running in a pod, else the local kubeconfig ($KUBECONFIG, read when discovery starts, else ~/.kube/config).
Only ready addresses count; the port is the one named `http`
(else the only port). A Service that does not exist (yet) means no workers of that role; an API error
keeps the last known membership.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

from baton.worker.router.pool import HealthChecker, Pool

log = logging.getLogger("baton.router.discovery")


def endpoints_urls(endpoints: Any, port_name: str = "http") -> list[str]:
    """URLs of the ready addresses of a `V1Endpoints` (or its dict form)."""
    subsets = _get(endpoints, "subsets") or []
    urls: list[str] = []
    for subset in subsets:
        ports = _get(subset, "ports") or []
        port = None
        for p in ports:
            if _get(p, "name") == port_name:
                port = _get(p, "port")
        if port is None and len(ports) == 1:
            port = _get(ports[0], "port")
        if port is None:
            continue
        for addr in _get(subset, "addresses") or []:
            ip = _get(addr, "ip")
            if ip:
                host = f"[{ip}]" if ":" in ip else ip
                urls.append(f"http://{host}:{port}")
    return sorted(set(urls))


def _get(obj: Any, name: str) -> Any:
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


def load_kube_api():
    """A CoreV1Api from in-cluster config, else the kubeconfig ($KUBECONFIG, else ~/.kube/config).
    Raises RuntimeError with one line.

    The client gets its own Configuration (the process-wide default is left alone), and $KUBECONFIG is read
    now: the kubernetes package reads it once, when it is imported.
    """
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        path = os.environ.get("KUBECONFIG") or "~/.kube/config"
        try:
            config.load_kube_config(config_file=path, client_configuration=configuration,
                                    persist_config=False)
        except Exception as exc:  # noqa: BLE001
            raise RuntimeError(
                f"no Kubernetes configuration (not in a pod, and no usable kubeconfig at {path}: {exc})"
            ) from None
    return client.CoreV1Api(client.ApiClient(configuration))


class KubernetesDiscovery:
    """Polls the Endpoints of `services` ({role: service name}) in `namespace`."""

    def __init__(self, pool: Pool, checker: HealthChecker, namespace: str, services: dict[str, str],
                 interval: float = 2.0, api: Any = None) -> None:
        self.pool = pool
        self.checker = checker
        self.namespace = namespace
        self.services = services
        self.interval = interval
        self.api = api
        self._task: asyncio.Task | None = None

    def _read(self, name: str) -> list[str] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            ep = self.api.read_namespaced_endpoints(name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return []
            log.warning("cannot read Endpoints %s/%s: %s %s", self.namespace, name, exc.status, exc.reason)
            return None
        except Exception as exc:  # noqa: BLE001 - API server unreachable etc.: keep what we know
            log.warning("cannot read Endpoints %s/%s: %s", self.namespace, name, exc)
            return None
        return endpoints_urls(ep)

    async def poll_once(self) -> None:
        if self.api is None:
            self.api = await asyncio.to_thread(load_kube_api)
        for role, name in self.services.items():
            urls = await asyncio.to_thread(self._read, name)
            if urls is None:
                continue
            added = self.pool.set_urls(role, urls)
            if added:
                await self.checker.check_all(added)

    async def _run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("Endpoints discovery failed; retrying")
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="baton-router-discovery")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
