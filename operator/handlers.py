"""kopf handlers: when to reconcile. What to do lives in `reconcile` (I/O) and `render`/`status` (pure).

- LLMService create/update/resume: reconcile now; failures are retried by kopf with backoff.
- Any event on a child object (a Deployment deleted or edited by hand, pods becoming ready): reconcile the
  owner, debounced, so drift is corrected and status follows the children.
- Per LLMService, the operator's own loops (`service_loops`; not kopf timers or daemons, which would put a
  finalizer on every LLMService), kept in step with its spec by its watch events and stopped when it is deleted:
  a slow resync (a safety net that re-applies and refreshes status even if a watch event was missed); with
  `spec.planner.mode` recommend or apply, the planner (planner/online.py); with autoscaling mode baton for a
  role (`spec.autoscaling.mode`/`enabled`, `spec.<role>.autoscaling.mode`), the autoscaler ticking every
  `spec.autoscaling.interval` (`autoscaler`), sharing the Reconciler's per-object lock for status writes.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

import kopf
from baton.operator import autoscaler
from baton.operator.admission import review
from baton.operator.api import baton_autoscales
from baton.operator.kube import GROUP, PLURAL, VERSION, Kube, KubeError
from baton.operator.labels import LABEL_MANAGED_BY, MANAGED_BY
from baton.operator.planner import online as online_planner
from baton.operator.reconcile import reconcile
from baton.operator.service_loops import NOT_WANTED, ServiceLoops, StopFlag
from baton.operator.webhook import OPTIONS as WEBHOOK_OPTIONS
from baton.operator.webhook import WEBHOOK_CONFIGURATION, configure_admission, remove_managed_configuration

log = logging.getLogger("baton.operator")

MANAGED = {LABEL_MANAGED_BY: MANAGED_BY}
DEBOUNCE_SECONDS = 0.3
RESYNC_SECONDS = 60.0


class Reconciler:
    """Serialises reconciles per LLMService and coalesces bursts of child events into one run."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._pending: dict[tuple[str, str], asyncio.Task] = {}

    def lock(self, namespace: str, name: str) -> asyncio.Lock:
        """The per-LLMService lock: held by reconciles and by the autoscaler's replica and status writes."""
        return self._locks.setdefault((namespace, name), asyncio.Lock())

    async def run(self, namespace: str, name: str):
        async with self.lock(namespace, name):
            body_for_events: dict = {}

            def emit(kind: str, reason: str, message: str) -> None:
                if body_for_events:
                    kopf.event(body_for_events, type=kind, reason=reason, message=message)
                # The module logger, not kopf's per-object one: that one would post each line as an Event too.
                (log.warning if kind == "Warning" else log.info)("%s/%s: %s: %s", namespace, name, reason, message)

            llms = await asyncio.to_thread(self.kube.get, f"{GROUP}/{VERSION}", "LLMService", namespace, name)
            if llms is None:
                return None
            body_for_events.update(llms)
            return await asyncio.to_thread(reconcile, self.kube, namespace, name, emit)

    def kick(self, namespace: str, name: str) -> None:
        """Schedule a reconcile soon; kicks arriving before it starts are folded into it."""
        key = (namespace, name)
        task = self._pending.get(key)
        if task is not None and not task.done():
            return

        async def later() -> None:
            await asyncio.sleep(DEBOUNCE_SECONDS)
            self._pending.pop(key, None)
            try:
                await self.run(namespace, name)
            except Exception as exc:  # noqa: BLE001  logged; the next event or the resync timer retries
                log.warning("reconcile of %s/%s after a child event failed: %s", namespace, name, exc)

        self._pending[key] = asyncio.get_running_loop().create_task(later())

    def forget(self, namespace: str, name: str) -> None:
        task = self._pending.pop((namespace, name), None)
        if task:
            task.cancel()
        self._locks.pop((namespace, name), None)


def _reconciler(memo: kopf.Memo) -> Reconciler:
    if "reconciler" not in memo:
        memo["reconciler"] = Reconciler(Kube.from_environment())
    return memo["reconciler"]


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Keep kopf's bookkeeping in annotations, so `.status` holds only the LLMService's own fields.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="baton.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="baton.dev")
    # Actions are posted as Events explicitly; kopf's own log lines become Events only when they are warnings.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.execution.max_workers = 8
    configure_admission(settings)
    _reconciler(memo)
    _loops(memo)
    autoscaler.serve_metrics()


@kopf.on.cleanup()
async def stop_loops(memo: kopf.Memo, **_: Any) -> None:
    await _loops(memo).stop_all()


@kopf.on.cleanup()
def stop_metrics(**_: Any) -> None:
    autoscaler.stop_metrics()


@kopf.on.cleanup()
def remove_webhook_configuration(memo: kopf.Memo, logger: Any, **_: Any) -> None:
    try:
        if remove_managed_configuration(_reconciler(memo).kube):
            logger.info(f"removed the webhook configuration {WEBHOOK_CONFIGURATION!r} that pointed at this process")
    except KubeError as exc:  # exiting anyway; the next operator start replaces it
        logger.warning(f"could not remove the webhook configuration {WEBHOOK_CONFIGURATION!r}: {exc}")


async def _reconcile_now(name: str, namespace: str, memo: kopf.Memo) -> None:
    # Returns nothing: kopf would store a handler's result in `.status`, which belongs to the LLMService.
    result = await _reconciler(memo).run(namespace, name)
    if result is not None and result.error:
        raise kopf.TemporaryError(result.error, delay=10)


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
@kopf.on.resume(GROUP, VERSION, PLURAL)
async def llmservice_changed(name: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    await _reconcile_now(name, namespace, memo)


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
async def llmservice_deleted(name: str, namespace: str, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    # No finalizer: owner references let the garbage collector delete the children.
    _reconciler(memo).forget(namespace, name)
    logger.info(f"{namespace}/{name} deleted; its children are garbage-collected through owner references")


async def _resync(memo: kopf.Memo, namespace: str, name: str, service_memo: dict, stopped: StopFlag) -> None:
    """The safety net: a reconcile every RESYNC_SECONDS even if a watch event was missed."""
    while not await stopped.wait(RESYNC_SECONDS):
        _reconciler(memo).kick(namespace, name)


def _emitter(namespace: str, name: str, service_memo: dict) -> autoscaler.EventSink:
    """Events on the LLMService as its latest watch event showed it (a loop outlives the body it started with)."""

    def emit(kind: str, reason: str, message: str) -> None:
        body = service_memo.get("body")
        if body:
            kopf.event(body, type=kind, reason=reason, message=message)
        (log.warning if kind == "Warning" else log.info)("%s/%s: %s: %s", namespace, name, reason, message)

    return emit


async def _autoscale(memo: kopf.Memo, namespace: str, name: str, service_memo: dict, stopped: StopFlag) -> None:
    """The SLO autoscaler (see `autoscaler`), ticking every `spec.autoscaling.interval`."""
    reconciler = _reconciler(memo)
    await autoscaler.run(reconciler.kube, lambda: reconciler.lock(namespace, name), namespace, name,
                         service_memo, stopped, _emitter(namespace, name, service_memo))
    if stopped.reason == NOT_WANTED:  # switched off: switched on again later, it starts afresh (as reconcile
        service_memo.pop("autoscaler", None)  # clears status.autoscaler)


async def _plan(memo: kopf.Memo, namespace: str, name: str, service_memo: dict, stopped: StopFlag) -> None:
    """The online planner (spec.planner, see planner/online.py)."""
    reconciler = _reconciler(memo)
    if "planner" not in service_memo:
        service_memo["planner"] = autoscaler.AutoscalerState()  # its Prometheus client; no history
    await online_planner.run(reconciler.kube, lambda: reconciler.lock(namespace, name), namespace, name,
                             service_memo["planner"], stopped, _emitter(namespace, name, service_memo),
                             lambda: reconciler.kick(namespace, name))


def _loops(memo: kopf.Memo) -> ServiceLoops:
    if "loops" not in memo:
        loops = {"resync": _resync, "autoscaler": _autoscale, "planner": _plan}
        memo["loops"] = ServiceLoops({k: functools.partial(fn, memo) for k, fn in loops.items()})
    return memo["loops"]


def wanted_loops(spec: dict) -> set[str]:
    """The loops an LLMService's spec asks for: the resync always, the autoscaler when some role's autoscaling
    mode is baton (not external, not off), the planner unless its mode is off."""
    loops = {"resync"}
    if baton_autoscales(spec):
        loops.add("autoscaler")
    if (spec.get("planner") or {}).get("mode", "off") not in ("off", False, None):
        loops.add("planner")
    return loops


@kopf.on.event(GROUP, VERSION, PLURAL)
async def llmservice_event(type: str | None, body: kopf.Body, name: str, namespace: str, memo: kopf.Memo,
                           **_: Any) -> None:
    """Keep this LLMService's loops in step with its spec; stop them when it is deleted (see service_loops:
    kopf's own timers and daemons would put a finalizer on it)."""
    loops = _loops(memo)
    if type == "DELETED" or body.get("metadata", {}).get("deletionTimestamp"):
        loops.forget(namespace, name)
        return
    loops.memo(namespace, name)["body"] = {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
                                           "metadata": dict(body.get("metadata") or {})}
    loops.want(namespace, name, wanted_loops(dict(body.get("spec") or {})))


def _owner(meta: dict) -> str | None:
    """The owning LLMService's name, from the controller owner reference that render puts on every child."""
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == "LLMService" and ref.get("apiVersion", "").startswith(f"{GROUP}/"):
            return ref.get("name")
    return None


@kopf.on.event("apps", "v1", "deployments", labels=MANAGED)
@kopf.on.event("", "v1", "services", labels=MANAGED)
@kopf.on.event("", "v1", "serviceaccounts", labels=MANAGED)
@kopf.on.event("rbac.authorization.k8s.io", "v1", "roles", labels=MANAGED)
@kopf.on.event("rbac.authorization.k8s.io", "v1", "rolebindings", labels=MANAGED)
@kopf.on.event("networking.k8s.io", "v1", "networkpolicies", labels=MANAGED)
async def child_event(meta: kopf.Meta, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    owner = _owner(dict(meta))
    if owner:
        _reconciler(memo).kick(namespace, owner)


def validate(body: kopf.Body, old: Any, **_: Any) -> None:
    problems = review(dict(body), dict(old) if old else None)
    if problems:
        raise kopf.AdmissionError("; ".join(problems), code=422)


# kopf refuses to run admission handlers without a webhook server, so `--no-webhook` registers none.
if WEBHOOK_OPTIONS.enabled:
    kopf.on.validate(GROUP, VERSION, PLURAL, id="validate-llmservice", operations=["CREATE", "UPDATE"])(validate)
