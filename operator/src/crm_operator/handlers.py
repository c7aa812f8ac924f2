"""kopf handlers: CRMConfig -> etcd keys, BILogSink -> Kafka Connect connector or Deployment.

Nothing is registered at import time: :func:`register` adds every handler to a kopf
registry (``python -m crm_operator`` and the tests each build their own). Handlers are thin
and idempotent; the I/O lives in :mod:`crm_operator.etcd`, :mod:`crm_operator.connect` and
:mod:`crm_operator.builtin`, the status shapes in :mod:`crm_operator.statuses`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import kopf
from crm_common.config_watch import config_key, rollout_key

from crm_operator import schemas, statuses
from crm_operator.builtin import (
    DeploymentClient,
    NetworkPolicyClient,
    builtin_spec_problems,
    deployment_name,
    render_deployment,
    render_network_policy,
)
from crm_operator.conditions import condition
from crm_operator.connect import (
    RESERVED_CONFIG,
    ConnectClient,
    ConnectError,
    connector_config,
    connector_name,
)
from crm_operator.etcd import Applied, ConfigStore, Declared, DriftGuard, envelope
from crm_operator.metrics import OperatorMetrics
from crm_operator.settings import OperatorSettings

__all__ = [
    "BILOGSINK",
    "CRMCONFIG",
    "GROUP",
    "ROLLBACK_ANNOTATION",
    "VALIDATE_BILOGSINK",
    "VALIDATE_CRMCONFIG",
    "Runtime",
    "register",
]

log = logging.getLogger("crm.operator")

GROUP = "crm.platform.io"
VERSION = "v1alpha1"
CRMCONFIG = (GROUP, VERSION, "crmconfigs")
BILOGSINK = (GROUP, VERSION, "bilogsinks")
ROLLBACK_ANNOTATION = f"{GROUP}/rollback-to"
FINALIZER = f"{GROUP}/finalizer"
KOPF_PREFIX = f"operator.{GROUP}"
VALIDATE_CRMCONFIG = "validate-crmconfig"
VALIDATE_BILOGSINK = "validate-bilogsink"


@dataclass
class TaskBackoff:
    restarts: int = 0
    next_at: float = 0.0
    running_since: float | None = None
    delays: list[float] = field(default_factory=list)


@dataclass
class Runtime:
    """Everything the handlers share (kept in kopf's memo, built at startup)."""

    settings: OperatorSettings
    store: ConfigStore
    guard: DriftGuard
    session: aiohttp.ClientSession
    connect: ConnectClient
    metrics: OperatorMetrics
    deployments: DeploymentClient | None
    policies: NetworkPolicyClient | None = None
    configs: dict[str, statuses.ConfigState] = field(default_factory=dict)
    drift_events: dict[str, asyncio.Queue[str]] = field(default_factory=dict)
    backoffs: dict[str, dict[int, TaskBackoff]] = field(default_factory=dict)
    metrics_port: int = 0
    resync_task: asyncio.Task[None] | None = None

    def drift_queue(self, uid: str) -> asyncio.Queue[str]:
        return self.drift_events.setdefault(uid, asyncio.Queue(maxsize=100))

    def deployment_client(self) -> DeploymentClient:
        if self.deployments is None:
            self.deployments = DeploymentClient(self.settings.kube_api_server)
        return self.deployments

    def policy_client(self) -> NetworkPolicyClient:
        if self.policies is None:
            self.policies = NetworkPolicyClient(self.settings.kube_api_server)
        return self.policies


def _normal(body: kopf.Body, *, reason: str, message: str) -> None:
    """A Normal Event (kopf.info is muted with posting.level WARNING, which keeps kopf's
    own per-handler chatter out of the Events)."""
    kopf.event(body, type="Normal", reason=reason, message=message)


def _rt(memo: Any) -> Runtime:
    rt: Runtime = memo["crm"]
    return rt


def _gen(meta: Mapping[str, Any]) -> int | None:
    g = meta.get("generation")
    return int(g) if g is not None else None


# =========================================================================== lifecycle


def _make_startup(cfg_factory: Callable[[], OperatorSettings]) -> Any:
    async def startup(
        settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger, **_: Any
    ) -> None:
        cfg = cfg_factory()
        settings.persistence.finalizer = FINALIZER
        # kopf's own annotations live under a prefix of their own: kopf ignores every
        # annotation under its storage prefix, and crm.platform.io/rollback-to must be seen
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=KOPF_PREFIX, key="last-handled-configuration"
        )
        settings.posting.level = logging.WARNING  # handler chatter stays in the logs
        settings.watching.server_timeout = 300
        settings.networking.request_timeout = 30
        if cfg.webhook_host:
            settings.admission.server = kopf.WebhookServer(
                port=cfg.webhook_port,
                host=cfg.webhook_host,
                certfile=cfg.webhook_cert_file or None,
                pkeyfile=cfg.webhook_key_file or None,
                cafile=cfg.webhook_ca_file or None,
            )
        else:
            settings.admission.server = kopf.WebhookServer(
                addr="127.0.0.1", port=cfg.webhook_port, insecure=True
            )
        settings.admission.managed = cfg.webhook_managed or None

        metrics = OperatorMetrics()
        port = metrics.serve(cfg.metrics_port) if cfg.metrics_port >= 0 else 0
        store = ConfigStore(cfg.etcd_endpoints, cfg.config_prefix, cfg.history_limit)
        session = aiohttp.ClientSession()
        rt_box: list[Runtime] = []

        async def on_drift(key: str, declared: Declared, found: bytes | None, rev: int) -> None:
            rt = rt_box[0]
            rt.metrics.drift_repairs.inc()
            what = "deleted" if found is None else "changed"
            with contextlib.suppress(asyncio.QueueFull):
                rt.drift_queue(declared.owner).put_nowait(
                    f"{key} was {what} outside the operator; the declared value was put back "
                    f"at etcd revision {rev}"
                )

        guard = DriftGuard(store, cfg.etcd_endpoints, on_drift)
        rt = Runtime(
            settings=cfg,
            store=store,
            guard=guard,
            session=session,
            connect=ConnectClient(session, cfg.connect_timeout_s),
            metrics=metrics,
            deployments=None,
            metrics_port=port,
        )
        rt_box.append(rt)
        guard.start()

        async def resync() -> None:
            while True:
                await asyncio.sleep(cfg.drift_resync_s)
                try:
                    await guard.resync()
                except Exception as exc:
                    logger.warning(f"drift resync failed: {exc}")

        rt.resync_task = asyncio.create_task(resync(), name="drift-resync")
        memo["crm"] = rt
        logger.info(
            f"crm-operator: etcd {cfg.etcd_endpoints} prefix {cfg.config_prefix}, "
            f"metrics port {port}, webhook port {cfg.webhook_port}"
        )

    return startup


async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    rt = memo.get("crm")
    if not isinstance(rt, Runtime):
        return
    if rt.resync_task is not None:
        rt.resync_task.cancel()
        await asyncio.wait({rt.resync_task})
    await rt.guard.stop()
    await rt.store.close()
    await rt.session.close()
    if rt.deployments is not None:
        rt.deployments.close()
    if rt.policies is not None:
        rt.policies.close()
    rt.metrics.close()


async def probe_etcd(memo: kopf.Memo, **_: Any) -> bool:
    """Liveness detail: whether the drift guard's etcd watch is up."""
    rt = memo.get("crm")
    return isinstance(rt, Runtime) and rt.guard.watching


# =========================================================================== CRMConfig


def index_config_owner(
    spec: kopf.Spec, namespace: str | None, name: str, **_: Any
) -> dict[tuple[str, str], str]:
    """(service, key) -> namespace/name: one CRMConfig per etcd key."""
    return {(str(spec.get("service")), str(spec.get("key"))): f"{namespace}/{name}"}


def validate_crmconfig(
    spec: kopf.Spec,
    namespace: str | None,
    name: str,
    annotations: kopf.Annotations,
    **kwargs: Any,
) -> None:
    """Refuse, at kubectl apply time, what the service would refuse (naming the field)."""
    old: Any = kwargs.get("old")
    operation: str = kwargs.get("operation", "")
    owners: kopf.Index[tuple[str, str], str] = kwargs["index_config_owner"]
    service, key = spec.get("service"), spec.get("key")
    try:
        schemas.validate(str(service), str(key), spec.get("data"))
    except schemas.ConfigInvalid as exc:
        raise kopf.AdmissionError(str(exc), code=422) from exc
    percent = (spec.get("rollout") or {}).get("percent")
    if percent is not None and (
        isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100
    ):
        raise kopf.AdmissionError("spec.rollout.percent: must be an integer 0..100", code=422)
    if operation == "UPDATE" and old is not None:
        old_spec = old.get("spec") or {}
        for f in ("service", "key"):
            if old_spec.get(f) != spec.get(f):
                raise kopf.AdmissionError(f"spec.{f}: is immutable (delete and create)", code=422)
    if operation == "CREATE":
        others = [o for o in owners.get((str(service), str(key)), [])
                  if o != f"{namespace}/{name}"]  # fmt: skip
        if others:
            raise kopf.AdmissionError(
                f"spec.key: {service}/{key} is already declared by CRMConfig {others[0]}",
                code=409,
            )
    rollback = annotations.get(ROLLBACK_ANNOTATION)
    if rollback is not None and not str(rollback).isdigit():
        raise kopf.AdmissionError(
            f"metadata.annotations.{ROLLBACK_ANNOTATION}: must be a revision number "
            f"(see status.history), got {rollback!r}",
            code=422,
        )


def _declare(
    rt: Runtime, uid: str, service: str, key: str, value: bytes, percent: int | None,
    applied: Applied | None,
) -> None:  # fmt: skip
    """Tell the drift guard what the keys must hold. Called before the write (so the
    operator's own write is never taken for drift; since = the last known revision) and
    after it (since = the revision written: older watch events are old news)."""
    prefix = rt.store.config_prefix
    stable_k, rollout_k = config_key(prefix, service, key), rollout_key(prefix, service, key)
    guard = rt.guard

    def since(k: str, written: int) -> int:
        if applied is not None:
            return written
        d = guard.declared(k)
        return d.since if d is not None else 0

    if percent is None or percent >= 100:
        guard.declare(
            stable_k, Declared(value, since(stable_k, applied.revision if applied else 0), uid)
        )
        guard.declare(
            rollout_k, Declared(None, since(rollout_k, applied.revision if applied else 0), uid)
        )
    else:
        rollout_rev = applied.rollout_revision if applied else 0
        guard.declare(
            rollout_k, Declared(envelope(percent, value), since(rollout_k, rollout_rev), uid)
        )


async def reconcile_config(
    body: kopf.Body,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    uid: str,
    patch: kopf.Patch,
    memo: kopf.Memo,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    """Write the declared value into etcd (stable key or rollout) and report it in status."""
    rt = _rt(memo)
    gen = _gen(meta)
    service, key = str(spec.get("service")), str(spec.get("key"))
    try:
        value = schemas.validate(service, key, spec.get("data"))
    except schemas.ConfigInvalid as exc:  # only when the webhook is not installed
        rt.metrics.reconciles.labels("CRMConfig", "invalid").inc()
        reason = "InvalidConfig"
        statuses.patch_status(patch, status, {"observedGeneration": gen}, [
            condition("Synced", "False", reason, str(exc), gen),
            condition("Ready", "False", reason, str(exc), gen),
        ])  # fmt: skip
        kopf.warn(body, reason=reason, message=str(exc))
        return
    percent = (spec.get("rollout") or {}).get("percent")
    _declare(rt, uid, service, key, value, percent, None)
    try:
        applied = await rt.store.apply(service, key, value, percent, gen)
        history = await rt.store.history(service, key)
        acks = await rt.store.acks(service)
    except Exception as exc:
        rt.metrics.reconciles.labels("CRMConfig", "etcd_error").inc()
        msg = f"etcd: {type(exc).__name__}: {exc}"
        statuses.patch_status(patch, status, {}, [
            condition("Synced", "False", "EtcdUnavailable", msg, gen),
            condition("Ready", "False", "EtcdUnavailable", msg, gen),
        ])  # fmt: skip
        raise kopf.TemporaryError(msg, delay=5) from exc
    _declare(rt, uid, service, key, value, percent, applied)
    state = statuses.ConfigState(
        service=service,
        key=key,
        generation=gen,
        revision=applied.revision,
        rollout_percent=percent if percent is not None and percent < 100 else None,
        rollout_revision=applied.rollout_revision,
        history=history,
    )
    rt.configs[uid] = state
    rt.metrics.configs.set(len(rt.configs))
    rt.metrics.reconciles.labels("CRMConfig", "ok").inc()
    if applied.wrote:
        rt.metrics.etcd_writes.inc()
        where = (
            f"rollout to {percent}% at revision {applied.rollout_revision}"
            if state.rollout_percent is not None
            else f"revision {applied.revision}"
        )
        _normal(body, reason="Written", message=f"{service}/{key} written to etcd: {where}")
        logger.info(f"{service}/{key} written: {where}")
    fields, conds = statuses.config_status(state, acks)
    statuses.patch_status(patch, status, fields, conds)


async def config_status_timer(
    status: kopf.Status, uid: str, patch: kopf.Patch, memo: kopf.Memo, **_: Any
) -> None:
    """Mirror the instances' acknowledgements into status (appliedBy, Ready)."""
    rt = _rt(memo)
    state = rt.configs.get(uid)
    if state is None:
        return  # not reconciled yet (kopf's resume handler will)
    try:
        acks = await rt.store.acks(state.service)
    except Exception as exc:
        raise kopf.TemporaryError(f"etcd: {exc}", delay=5) from exc
    fields, conds = statuses.config_status(state, acks)
    statuses.patch_status(patch, status, fields, conds)


async def drift_event_daemon(
    body: kopf.Body, uid: str, memo: kopf.Memo, stopped: kopf.DaemonStopped, **_: Any
) -> None:
    """Post a Warning Event for each drift the guard repaired on this object's keys."""
    rt = _rt(memo)
    queue = rt.drift_queue(uid)
    while not stopped:
        try:
            message = await asyncio.wait_for(queue.get(), timeout=0.5)
        except TimeoutError:
            continue
        kopf.warn(body, reason="DriftRepaired", message=message)


async def rollback_config(
    body: kopf.Body,
    spec: kopf.Spec,
    annotations: kopf.Annotations,
    patch: kopf.Patch,
    memo: kopf.Memo,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    """``crm.platform.io/rollback-to: "<revision>"``: set spec.data back to that kept
    version (the reconcile then writes it) and remove the annotation."""
    rt = _rt(memo)
    raw = str(annotations.get(ROLLBACK_ANNOTATION, ""))
    patch.metadata.setdefault("annotations", {})[ROLLBACK_ANNOTATION] = None
    service, key = str(spec.get("service")), str(spec.get("key"))
    try:
        history = await rt.store.history(service, key)
    except Exception as exc:
        raise kopf.TemporaryError(f"etcd: {exc}", delay=5) from exc
    target = next((e for e in history if raw.isdigit() and e.revision == int(raw)), None)
    if target is None:
        kept = ", ".join(str(e.revision) for e in history) or "none"
        kopf.warn(body, reason="RollbackFailed",
                  message=f"revision {raw!r} is not in the kept history ({kept})")  # fmt: skip
        return
    current = dict(spec.get("data") or {})
    if current != target.data:
        patch.spec["data"] = statuses.merge_patch(current, target.data)
    rt.metrics.rollbacks.inc()
    _normal(body, reason="RolledBack",
              message=f"spec.data set to the value of revision {target.revision}")  # fmt: skip
    logger.info(f"rolled back {service}/{key} to revision {target.revision}")


async def delete_config(
    spec: kopf.Spec, uid: str, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    """Remove the keys (stable, rollout, history) before the finalizer is released."""
    rt = _rt(memo)
    service, key = str(spec.get("service")), str(spec.get("key"))
    prefix = rt.store.config_prefix
    rt.guard.forget(config_key(prefix, service, key), uid)
    rt.guard.forget(rollout_key(prefix, service, key), uid)
    try:
        revision = await rt.store.remove(service, key)
    except Exception as exc:
        raise kopf.TemporaryError(f"etcd: {exc}", delay=5) from exc
    rt.configs.pop(uid, None)
    rt.drift_events.pop(uid, None)
    rt.metrics.configs.set(len(rt.configs))
    logger.info(f"{service}/{key} deleted from etcd at revision {revision}")


# =========================================================================== BILogSink


def validate_bilogsink(spec: kopf.Spec, **_: Any) -> None:
    target = spec.get("target") or {}
    chosen = [k for k in ("kafkaConnect", "builtin") if target.get(k) is not None]
    if len(chosen) != 1:
        raise kopf.AdmissionError("spec.target: set exactly one of kafkaConnect, builtin", code=422)
    if not spec.get("topics"):
        raise kopf.AdmissionError("spec.topics: at least one topic", code=422)
    if chosen == ["kafkaConnect"]:
        kc = target["kafkaConnect"]
        if not str(kc.get("url", "")).startswith(("http://", "https://")):
            raise kopf.AdmissionError("spec.target.kafkaConnect.url: must be http(s)://", code=422)
        reserved = sorted(set(kc.get("config") or {}) & RESERVED_CONFIG)
        if reserved:
            raise kopf.AdmissionError(
                f"spec.target.kafkaConnect.config.{reserved[0]}: is set by the operator from "
                "the typed spec fields", code=422,
            )  # fmt: skip
    if chosen == ["builtin"]:
        for path, message in builtin_spec_problems(spec):
            raise kopf.AdmissionError(f"{path}: {message}", code=422)


_WANT = {"running": "RUNNING", "paused": "PAUSED", "stopped": "STOPPED"}


async def _converge_connector(
    rt: Runtime, spec: Mapping[str, Any], url: str, name: str, *, write_config: bool
) -> Any:
    """Config, then state, then the resulting status (each call time-boxed)."""
    if write_config:
        await rt.connect.put_config(url, name, connector_config(spec, name))
    state = spec.get("state", "running")
    current = await rt.connect.status(url, name)
    if current is None:  # deleted behind our back: create it again
        await rt.connect.put_config(url, name, connector_config(spec, name))
        current = await rt.connect.status(url, name)
    have = current.state if current is not None else "UNASSIGNED"
    if have != _WANT[state]:
        if state == "paused":
            await rt.connect.pause(url, name)
        elif state == "stopped":
            await rt.connect.stop(url, name)
        else:
            await rt.connect.resume(url, name)
        current = await rt.connect.status(url, name)
    return current


async def reconcile_sink(
    body: kopf.Body,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    namespace: str | None,
    name: str,
    uid: str,
    patch: kopf.Patch,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    rt = _rt(memo)
    gen = _gen(meta)
    rt.backoffs.pop(uid, None)  # a new spec: task restarts start from scratch
    if (spec.get("target") or {}).get("builtin") is not None:
        await _reconcile_builtin(rt, body, spec, str(namespace), name, gen, patch, status)
        return
    url = str(spec["target"]["kafkaConnect"]["url"])
    cname = connector_name(str(namespace), name)
    try:
        state = await _converge_connector(rt, spec, url, cname, write_config=True)
    except ConnectError as exc:
        rt.metrics.connect_errors.labels(exc.reason).inc()
        rt.metrics.reconciles.labels("BILogSink", "connect_error").inc()
        statuses.patch_status(patch, status, {"connectorName": cname}, [
            condition("Ready", "False", exc.reason, str(exc), gen),
        ])  # fmt: skip
        raise kopf.TemporaryError(str(exc), delay=rt.settings.sink_poll_interval_s) from exc
    rt.metrics.reconciles.labels("BILogSink", "ok").inc()
    fields, conds = statuses.sink_status(spec, state, gen, cname, {})
    statuses.patch_status(patch, status, fields, conds)


async def _reconcile_builtin(
    rt: Runtime, body: kopf.Body, spec: Mapping[str, Any], namespace: str, name: str,
    gen: int | None, patch: kopf.Patch, status: Mapping[str, Any],
) -> None:  # fmt: skip
    problems = builtin_spec_problems(spec)
    if problems:  # only without the admission webhook
        message = "; ".join(f"{path}: {msg}" for path, msg in problems)
        statuses.patch_status(patch, status, {"observedGeneration": gen}, [
            condition("Ready", "False", "InvalidSpec", message, gen),
        ])  # fmt: skip
        return
    policy_spec = rt.settings.sink_network_policy_spec
    if policy_spec is not None:  # first: the sink's pods never run without it
        policy = render_network_policy(name, namespace, policy_spec)
        kopf.adopt(policy, owner=body)
        try:
            await rt.policy_client().apply(policy)
        except Exception as exc:
            msg = f"NetworkPolicy {policy['metadata']['name']}: {type(exc).__name__}: {exc}"
            statuses.patch_status(patch, status, {}, [
                condition("Ready", "False", "NetworkPolicyError", msg, gen),
            ])  # fmt: skip
            raise kopf.TemporaryError(msg, delay=10) from exc
    manifest = render_deployment(
        name, namespace, spec, rt.settings.bilog_sink_image,
        kafka_bootstrap=rt.settings.bilog_sink_kafka_bootstrap,
        schema_registry_url=rt.settings.bilog_sink_schema_registry_url,
    )  # fmt: skip
    kopf.adopt(manifest, owner=body)
    try:
        deployment = await rt.deployment_client().apply(manifest)
    except Exception as exc:
        statuses.patch_status(patch, status, {}, [
            condition("Ready", "False", "DeploymentError", f"{type(exc).__name__}: {exc}", gen),
        ])  # fmt: skip
        raise kopf.TemporaryError(f"deployment: {exc}", delay=10) from exc
    fields, conds = statuses.builtin_status(spec, deployment, gen)
    statuses.patch_status(patch, status, fields, conds)


async def monitor_sink(
    body: kopf.Body,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    namespace: str | None,
    name: str,
    uid: str,
    patch: kopf.Patch,
    memo: kopf.Memo,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    """Poll connector and task states into status; restart failed tasks with backoff."""
    rt = _rt(memo)
    gen = _gen(meta)
    if (spec.get("target") or {}).get("builtin") is not None:
        deployment = await rt.deployment_client().get(str(namespace), deployment_name(name))
        policy_gone = (
            rt.settings.sink_network_policy_spec is not None
            and await rt.policy_client().get(str(namespace), deployment_name(name)) is None
        )
        if deployment is None or policy_gone or builtin_spec_problems(spec):
            await _reconcile_builtin(rt, body, spec, str(namespace), name, gen, patch, status)
            return
        fields, conds = statuses.builtin_status(spec, deployment, gen)
        statuses.patch_status(patch, status, fields, conds)
        return
    url = str(spec["target"]["kafkaConnect"]["url"])
    cname = connector_name(str(namespace), name)
    backoffs = rt.backoffs.setdefault(uid, {})
    try:
        state = await _converge_connector(rt, spec, url, cname, write_config=False)
        if state is not None and spec.get("state", "running") == "running":
            await _restart_failed(rt, body, url, cname, state, backoffs, logger)
    except ConnectError as exc:
        rt.metrics.connect_errors.labels(exc.reason).inc()
        statuses.patch_status(patch, status, {"connectorName": cname}, [
            condition("Ready", "False", exc.reason, str(exc), gen),
        ])  # fmt: skip
        return
    fields, conds = statuses.sink_status(spec, state, gen, cname, backoffs)
    statuses.patch_status(patch, status, fields, conds)


async def _restart_failed(
    rt: Runtime, body: kopf.Body, url: str, cname: str, state: Any,
    backoffs: dict[int, TaskBackoff], logger: kopf.Logger,
) -> None:  # fmt: skip
    loop = asyncio.get_running_loop()
    now = loop.time()
    cfg = rt.settings
    for task in state.tasks:
        b = backoffs.setdefault(task.id, TaskBackoff())
        if task.state == "RUNNING":
            b.running_since = b.running_since or now
            if b.restarts and now - b.running_since >= cfg.task_restart_backoff_max_s:
                backoffs[task.id] = TaskBackoff()  # healthy for long enough: forgive
            continue
        b.running_since = None
        if task.state != "FAILED" or now < b.next_at:
            continue
        await rt.connect.restart_task(url, cname, task.id)
        b.restarts += 1
        delay = min(cfg.task_restart_backoff_s * 2 ** (b.restarts - 1),
                    cfg.task_restart_backoff_max_s)  # fmt: skip
        b.delays.append(delay)
        b.next_at = now + delay
        rt.metrics.task_restarts.inc()
        msg = (f"task {task.id} of {cname} failed; restarted (restart {b.restarts}), "
               f"next restart no sooner than {delay:g}s")  # fmt: skip
        logger.info(msg)
        kopf.warn(body, reason="TaskRestarted", message=msg)


async def delete_sink(
    body: kopf.Body,
    spec: kopf.Spec,
    namespace: str | None,
    name: str,
    uid: str,
    retry: int,
    memo: kopf.Memo,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    rt = _rt(memo)
    rt.backoffs.pop(uid, None)
    if (spec.get("target") or {}).get("builtin") is not None:
        await rt.deployment_client().delete(str(namespace), deployment_name(name))
        if rt.settings.sink_network_policy_spec is not None:  # after its pods' Deployment
            await rt.policy_client().delete(str(namespace), deployment_name(name))
        return
    url = str(spec["target"]["kafkaConnect"]["url"])
    cname = connector_name(str(namespace), name)
    try:
        await rt.connect.delete(url, cname)
    except ConnectError as exc:
        if retry < 5:
            raise kopf.TemporaryError(str(exc), delay=min(30, 2 ** (retry + 1))) from exc
        msg = f"could not delete connector {cname} from {url}: {exc}; delete it by hand"
        logger.error(msg)
        kopf.warn(body, reason="ConnectorOrphaned", message=msg)


# =========================================================================== registration


def register(
    registry: kopf.OperatorRegistry,
    settings: Callable[[], OperatorSettings] = OperatorSettings,
) -> OperatorSettings:
    """Register every handler into ``registry``; ``settings`` builds the operator settings
    (timer intervals are read once, here). Returns the settings used for the intervals."""
    cfg = settings()
    on = kopf.on
    on.startup(registry=registry)(_make_startup(settings))
    on.cleanup(registry=registry)(cleanup)
    on.probe(registry=registry, id="etcd_watch")(probe_etcd)

    kopf.index(*CRMCONFIG, registry=registry, id="index_config_owner")(index_config_owner)
    on.validate(*CRMCONFIG, registry=registry, id=VALIDATE_CRMCONFIG,
                operations=["CREATE", "UPDATE"])(validate_crmconfig)  # fmt: skip
    rollback_filter = {ROLLBACK_ANNOTATION: kopf.PRESENT}
    for decorator in (on.create, on.update, on.resume):
        decorator(*CRMCONFIG, registry=registry, id="rollback",
                  annotations=rollback_filter)(rollback_config)  # fmt: skip
        decorator(*CRMCONFIG, registry=registry, id="reconcile")(reconcile_config)
    on.delete(*CRMCONFIG, registry=registry, id="delete")(delete_config)
    kopf.timer(*CRMCONFIG, registry=registry, id="status", interval=cfg.status_interval_s,
               initial_delay=cfg.status_interval_s)(config_status_timer)  # fmt: skip
    kopf.daemon(*CRMCONFIG, registry=registry, id="drift_events",
                cancellation_timeout=1.0)(drift_event_daemon)  # fmt: skip

    on.validate(*BILOGSINK, registry=registry, id=VALIDATE_BILOGSINK,
                operations=["CREATE", "UPDATE"])(validate_bilogsink)  # fmt: skip
    for decorator in (on.create, on.update, on.resume):
        decorator(*BILOGSINK, registry=registry, id="reconcile")(reconcile_sink)
    on.delete(*BILOGSINK, registry=registry, id="delete")(delete_sink)
    kopf.timer(*BILOGSINK, registry=registry, id="monitor", interval=cfg.sink_poll_interval_s,
               initial_delay=cfg.sink_poll_interval_s)(monitor_sink)  # fmt: skip
    return cfg
