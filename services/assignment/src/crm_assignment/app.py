"""Wiring of the assignment service: ``build_app(settings) -> App``.

Used by ``python -m crm_assignment serve``, the tests (in-process on port 0), the demo and
the benchmark::

    app = build_app(AssignmentSettings(port=0, metrics_port=-1, ...))
    async with app:                 # start(); stop() on exit
        await app.wait_ready(10)    # config loaded, database answers
        channel = grpc.aio.insecure_channel(app.target)

Building does no I/O; ``start()`` starts the config watcher (without waiting for etcd:
health stays NOT_SERVING until it has loaded), the gRPC server, the offer timeouts (the
local recycle loop; or, when ``scheduler_target`` is set, scheduler jobs plus a slow safety
sweep, see ``clients/scheduler_timeouts``) and, when ``bilog_target`` is set, the BI
outbox relay (``clients/bilog_outbox``);
``stop()`` ends the offer streams (UNAVAILABLE, so agents reconnect elsewhere), drains the
server, then closes the loop, the watcher, the executor and the engine.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from crm.assignment.v1 import assignment_pb2, assignment_pb2_grpc
from crm_common.aio import BlockingExecutor
from crm_common.app import ServiceApp, local_target
from crm_common.config_watch import ConfigSnapshot, ConfigWatcher
from crm_common.metrics import RpcMetrics
from crm_common.server import GrpcServer
from crm_scheduler.client import SchedulerClient
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge
from sqlalchemy import Engine

from crm_assignment import config
from crm_assignment.api.auth import AgentAuth
from crm_assignment.api.offers import OfferHub
from crm_assignment.api.servicer import AssignmentServicer
from crm_assignment.clients.bilog_outbox import OutboxRelay, watch_transitions
from crm_assignment.clients.recommendation import (
    NotConfigured,
    RecommendationAdapter,
    TaskRecommender,
)
from crm_assignment.clients.scheduler_timeouts import SchedulerOfferTimeouts
from crm_assignment.clients.timeouts import LocalRecycleLoop, OfferTimeouts
from crm_assignment.config import LineConfig, RoutingConfig
from crm_assignment.domain.model import (
    Clock,
    Offer,
    OutboxBacklog,
    Task,
    utc_now,
)
from crm_assignment.domain.phone import PhoneProtector
from crm_assignment.domain.token import TokenSigner
from crm_assignment.settings import AssignmentSettings
from crm_assignment.store import AssignmentStore, make_engine

__all__ = ["SERVICE_NAME", "App", "RoutingSource", "build_app"]

log = logging.getLogger("crm.assignment")

SERVICE_NAME: str = assignment_pb2.DESCRIPTOR.services_by_name["AssignmentService"].full_name


class RoutingSource:
    """The current RoutingConfig, rebuilt only when the watcher's snapshot changes."""

    def __init__(
        self, watcher: ConfigWatcher[LineConfig], *, require_line_config: bool = False
    ) -> None:
        self._watcher = watcher
        self._require = require_line_config
        self._snapshot: ConfigSnapshot[LineConfig] | None = None
        self._current = RoutingConfig(require_line_config=require_line_config)

    def __call__(self) -> RoutingConfig:
        snapshot = self._watcher.snapshot
        if snapshot is not self._snapshot:
            self._current = RoutingConfig.from_values(
                snapshot.values, snapshot.revision, require_line_config=self._require
            )
            self._snapshot = snapshot
        return self._current


@dataclass
class App(ServiceApp):
    """The assembled service (see module doc); attributes are for tests and tools."""

    settings: AssignmentSettings
    clock: Clock
    engine: Engine
    store: AssignmentStore
    executor: BlockingExecutor
    watcher: ConfigWatcher[LineConfig]
    routing: RoutingSource
    hub: OfferHub
    protector: PhoneProtector
    timeouts: OfferTimeouts
    servicer: AssignmentServicer
    server: GrpcServer
    metrics: RpcMetrics
    recommendations: TaskRecommender = field(default_factory=NotConfigured)
    outbox: OutboxRelay | None = None
    """Publishes task transitions, call records and presence changes to bilog (None when
    ``bilog_target`` is empty)."""

    async def start(self) -> None:
        if not self.settings.auth_token_secret and self.settings.auth_token_secret_required:
            raise RuntimeError(
                "CRM_ASSIGNMENT_AUTH_TOKEN_SECRET is not set but required "
                "(CRM_ASSIGNMENT_AUTH_TOKEN_SECRET_REQUIRED): with several replicas a "
                "console token signed by one would fail on the others"
            )
        if not self.settings.auth_token_secret:
            log.warning(
                "CRM_ASSIGNMENT_AUTH_TOKEN_SECRET is not set: console tokens are signed with "
                "a random secret of this process; they will not survive a restart and other "
                "replicas will not accept them"
            )
        if self.settings.uses_dev_keys:
            log.warning(
                "phone hash/encryption keys are the development defaults: set "
                "CRM_ASSIGNMENT_PHONE_HASH_KEY and CRM_ASSIGNMENT_PHONE_ENCRYPTION_KEY "
                "outside development"
            )
        await self.watcher.start(wait=False)
        await self.server.start()
        await self.timeouts.start()
        if self.outbox is not None:
            await self.outbox.start()
        else:
            log.info("bilog_target is empty: BI events are not sent to the BI log")

    async def before_stop(self) -> None:
        """End the offer streams before the server drains (they would hold it open)."""
        self.hub.shutdown()


def build_app(
    settings: AssignmentSettings,
    *,
    clock: Clock | None = None,
    engine: Engine | None = None,
) -> App:
    """Assemble the service from its settings (no I/O). ``clock`` replaces the real clock
    (tests); ``engine`` replaces the one built from ``settings.database_url``."""
    clock = clock or utc_now
    # lean: every use goes through TransactionRunner (no pre-ping, no reset ROLLBACK)
    engine = engine or make_engine(settings.database_url, settings.db_pool_size, lean=True)
    store = AssignmentStore(engine)
    executor = BlockingExecutor(settings.db_pool_size, name="crm-assignment-db")
    hub = OfferHub()
    metrics = RpcMetrics("assignment")
    offers_total = PromCounter(
        "crm_assignment_offers_total",
        "Tasks offered (reserved) to agents.",
        ["business_line"],
        registry=metrics.registry,
    )
    recycled_total = PromCounter(
        "crm_assignment_recycled_total",
        "Offers recycled after their accept deadline.",
        registry=metrics.registry,
    )
    streams = Gauge(
        "crm_assignment_offer_streams", "Open offer streams.", registry=metrics.registry
    )
    streams.set_function(lambda: float(len(hub)))

    def on_apply(snapshot: ConfigSnapshot[LineConfig]) -> None:
        current = routing()
        log.info(
            "routing config applied",
            extra={
                "config_revision": snapshot.revision,
                "lines": sorted(snapshot.values),
                "open_lines": [current.name(b) for b in current.all_lines() if current.is_open(b)],
            },
        )
        if current.conflicts:
            log.warning(
                "routing config: keys ignored, their code belongs to a name sorting first",
                extra={"config_revision": snapshot.revision, "keys": list(current.conflicts)},
            )
        hub.wake_all()

    watcher: ConfigWatcher[LineConfig] = ConfigWatcher(
        settings.etcd_endpoints,
        settings.assignment_config_prefix,
        config.parse,
        on_apply=on_apply,
        name="assignment-routing",
        ack=settings.instance_name,  # rollouts and "which instances applied it"
    )
    routing = RoutingSource(watcher, require_line_config=settings.require_line_config)
    protector = PhoneProtector(settings.phone_hash_key_bytes, settings.phone_encryption_key_bytes)

    def on_recycled(tasks: list[Task]) -> None:
        recycled_total.inc(len(tasks))
        for line, count in Counter(t.business_line for t in tasks).items():
            hub.task_waiting(line, count)  # they wait in their queues again
        for t in tasks:
            if t.last_lost_agent_id is not None:
                hub.wake_agent(t.last_lost_agent_id)  # capacity freed

    def on_offer(offer: Offer) -> None:
        offers_total.labels(routing().name(offer.task.business_line)).inc()

    server_ref: list[GrpcServer] = []

    def self_target() -> str:
        if settings.self_target:
            return settings.self_target
        port = server_ref[0].port if server_ref else None
        if port is None:
            raise RuntimeError("the server is not started: no self_target yet")
        return local_target(settings.host, port)

    timeouts = _timeouts(settings, store, executor, clock, on_recycled, self_target)
    recommendations_total = PromCounter(
        "crm_assignment_recommendations_total",
        "Task details by recommendation outcome (OK, or why they are missing).",
        ["outcome"],
        registry=metrics.registry,
    )
    recommendations: TaskRecommender = (
        RecommendationAdapter(
            settings.recommendation_target,
            timeout_s=settings.recommendation_timeout_s,
            count=settings.recommendation_count,
            on_outcome=lambda outcome: recommendations_total.labels(outcome).inc(),
        )
        if settings.recommendation_target
        else NotConfigured()
    )
    outbox, unwatch = _outbox(settings, store, executor, clock, engine, metrics)
    secret = settings.auth_token_secret.encode() or secrets.token_bytes(32)
    auth = AgentAuth(TokenSigner(secret), clock)
    servicer = AssignmentServicer(
        store=store,
        executor=executor,
        clock=clock,
        routing=routing,
        hub=hub,
        protector=protector,
        timeouts=timeouts,
        dispatch_poll_s=settings.dispatch_poll_s,
        on_offer=on_offer,
        clue_batch_max=settings.clue_batch_max,
        recommendations=recommendations,
        on_recycled=on_recycled,
        auth=auth,
        token_ttl_s=settings.auth_token_ttl_s,
        host_name=settings.host_name,
    )

    async def db_ready() -> None:
        await executor.run(store.ping)

    async def config_ready() -> None:
        if not watcher.ready:
            raise RuntimeError("routing config not loaded from etcd yet")

    server = GrpcServer(
        [SERVICE_NAME],
        settings,
        [(assignment_pb2_grpc.add_AssignmentServiceServicer_to_server, servicer)],
        readiness_checks={"mysql": db_ready, "config": config_ready},
        metrics=metrics,
    )

    async def close_resources() -> None:
        await servicer.clues.aclose()
        await servicer.actions.aclose()
        await servicer.dispatcher.aclose()
        await timeouts.stop()
        if outbox is not None:
            await outbox.stop()
            unwatch()
        await recommendations.aclose()
        await watcher.stop()
        await executor.aclose()
        await asyncio.to_thread(engine.dispose)

    server_ref.append(server)
    server.on_stop.append(close_resources)
    return App(
        settings=settings,
        clock=clock,
        engine=engine,
        store=store,
        executor=executor,
        watcher=watcher,
        routing=routing,
        hub=hub,
        protector=protector,
        timeouts=timeouts,
        servicer=servicer,
        server=server,
        metrics=metrics,
        recommendations=recommendations,
        outbox=outbox,
    )


def _timeouts(
    settings: AssignmentSettings,
    store: AssignmentStore,
    executor: BlockingExecutor,
    clock: Clock,
    on_recycled: Callable[[list[Task]], None],
    self_target: Callable[[], str],
) -> OfferTimeouts:
    """The local recycle loop every ``recycle_poll_s`` when ``scheduler_target`` is empty;
    otherwise scheduler jobs, with the loop as a safety sweep every
    ``recycle_safety_sweep_s`` (``clients/scheduler_timeouts``)."""
    if not settings.scheduler_target:
        return LocalRecycleLoop(store, executor, clock, settings.recycle_poll_s, on_recycled)
    sweep = LocalRecycleLoop(store, executor, clock, settings.recycle_safety_sweep_s, on_recycled)
    client = SchedulerClient.connect(
        settings.scheduler_target, default_timeout=settings.scheduler_timeout_s
    )
    log.info(
        "offer timeouts and revisits go through the scheduler",
        extra={
            "scheduler_target": settings.scheduler_target,
            "safety_sweep_s": settings.recycle_safety_sweep_s,
        },
    )
    return SchedulerOfferTimeouts(client, self_target, sweep)


def _outbox(
    settings: AssignmentSettings,
    store: AssignmentStore,
    executor: BlockingExecutor,
    clock: Clock,
    engine: Engine,
    metrics: RpcMetrics,
) -> tuple[OutboxRelay | None, Callable[[], None]]:
    """The BI outbox relay and its metrics (None when ``bilog_target`` is empty), and the
    function removing its commit hook."""
    if not settings.bilog_target:
        return None, lambda: None
    published = PromCounter(
        "crm_assignment_outbox_published_total",
        "BI events (transitions, calls, presence) acknowledged by bilog.",
        registry=metrics.registry,
    )
    rejected = PromCounter(
        "crm_assignment_outbox_rejected_total",
        "BI events bilog rejected (left with publish_error in their outbox table).",
        registry=metrics.registry,
    )
    pending = Gauge(
        "crm_assignment_outbox_pending",
        "BI events not yet published to bilog.",
        registry=metrics.registry,
    )
    oldest_age = Gauge(
        "crm_assignment_outbox_oldest_age_seconds",
        "Age of the oldest BI event (transition, call, presence) not yet published (0 when none).",
        registry=metrics.registry,
    )

    def on_backlog(backlog: OutboxBacklog) -> None:
        pending.set(backlog.pending)
        age = 0.0
        if backlog.oldest_at is not None:
            age = max((clock() - backlog.oldest_at).total_seconds(), 0.0)
        oldest_age.set(age)

    relay = OutboxRelay(
        store,
        executor,
        clock,
        settings.bilog_target,
        batch_size=settings.outbox_batch_size,
        poll_s=settings.outbox_poll_s,
        timeout_s=settings.bilog_timeout_s,
        backoff_max_s=settings.outbox_backoff_max_s,
        on_published=published.inc,
        on_rejected=rejected.inc,
        on_backlog=on_backlog,
    )
    return relay, watch_transitions(engine, relay.notify)
