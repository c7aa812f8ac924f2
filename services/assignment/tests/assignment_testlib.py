"""Test helpers: a manual clock, the service running in a thread of its own, polling."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import grpc
from crm.assignment.v1 import assignment_pb2 as pb
from crm.assignment.v1 import assignment_pb2_grpc
from crm.common.v1 import common_pb2
from crm_assignment.app import App, build_app
from crm_assignment.domain.model import BusinessLine, NewClue
from crm_assignment.domain.phone import PhoneProtector
from crm_assignment.settings import AssignmentSettings
from crm_common.config_watch import delete_key, put_json
from crm_devstack.apps import AppThread

T = TypeVar("T")

SALE = common_pb2.BUSINESS_LINE_SALE
AFTER_SALE = common_pb2.BUSINESS_LINE_AFTER_SALE
FINANCE = common_pb2.BUSINESS_LINE_FINANCE

PROTECTOR = PhoneProtector(b"k" * 32, b"e" * 32)
"""The phone keys of the store-level tests."""


def new_clue(
    key: str,
    phone: str,
    request_hash: str,
    *,
    priority: int = 0,
    city: str = "beijing",
    brands: tuple[str, ...] = (),
    intent_car_ids: tuple[int, ...] = (),
) -> NewClue:
    """A SALE clue from the app, as validation makes it (phone protected by PROTECTOR),
    for the store-level tests."""
    return NewClue(
        idempotency_key=key,
        phone=PROTECTOR.protect(phone),
        business_line=BusinessLine.SALE,
        source="app",
        city=city,
        intent_car_ids=intent_car_ids,
        brands=brands,
        budget_min_yuan=0,
        budget_max_yuan=0,
        priority=priority,
        request_hash=request_hash,
    )


class ManualClock:
    """A clock the test moves (thread-safe); starts at the real time."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime.now(UTC)
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> datetime:
        with self._lock:
            self._now += timedelta(seconds=seconds)
            return self._now


class Service(AppThread[App]):
    """The assignment app served from a background thread with its own event loop, so
    tests use plain (blocking) gRPC stubs and threads."""

    def __init__(self, settings: AssignmentSettings, clock: Callable[[], datetime]) -> None:
        self.settings = settings
        self.clock = clock
        super().__init__(lambda: build_app(settings, clock=clock))
        self.stub = assignment_pb2_grpc.AssignmentServiceStub(self.channel)

    def new_stub(self) -> tuple[grpc.Channel, assignment_pb2_grpc.AssignmentServiceStub]:
        channel = self.new_channel()
        return channel, assignment_pb2_grpc.AssignmentServiceStub(channel)

    # ----------------------------------------------------------------- shortcuts

    def agent(
        self,
        agent_id: int,
        *,
        line: int = SALE,
        capacity: int = 1,
        cities: tuple[str, ...] = (),
        categories: tuple[int, ...] = (),
        brands: tuple[str, ...] = (),
        idle: bool = True,
    ) -> pb.Agent:
        self.stub.UpsertAgent(
            pb.UpsertAgentRequest(
                agent=pb.Agent(
                    id=agent_id,
                    name=f"agent {agent_id}",
                    business_line=line,
                    cities=list(cities),
                    categories=list(categories),
                    brands=list(brands),
                    capacity=capacity,
                )
            )
        )
        if idle:
            return self.stub.SetPresence(
                pb.SetPresenceRequest(agent_id=agent_id, presence=pb.PRESENCE_IDLE)
            ).agent
        return self.stub.GetAgent(pb.GetAgentRequest(id=agent_id)).agent

    def clue(self, key: str, phone: str, **kw: Any) -> pb.CreateClueResponse:
        fields: dict[str, Any] = {"business_line": SALE, "source": "app", "city": "beijing"}
        fields.update(kw)
        return self.stub.CreateClue(
            pb.CreateClueRequest(idempotency_key=key, phone=phone, **fields)
        )

    def task(self, task_id: int) -> pb.GetTaskResponse:
        return self.stub.GetTask(pb.GetTaskRequest(id=task_id))


def settings_for(database_url: str, etcd: str, prefix: str, **kw: Any) -> AssignmentSettings:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": -1,
        "database_url": database_url,
        "db_pool_size": 8,
        "etcd_endpoints": etcd,
        "config_prefix": prefix,
        "recycle_poll_s": 0.05,
        "dispatch_poll_s": 0.2,
        "shutdown_grace_s": 2.0,
        "readiness_interval_s": 0.2,
    }
    values.update(kw)
    return AssignmentSettings(**values)


class OfferReader:
    """Reads one agent's offer stream in a thread; offers land in a queue."""

    def __init__(
        self,
        stub: assignment_pb2_grpc.AssignmentServiceStub,
        agent_id: int,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.agent_id = agent_id
        self.call = stub.StreamOffers(pb.StreamOffersRequest(agent_id=agent_id), metadata=metadata)
        self.offers: queue.Queue[pb.Offer] = queue.Queue()
        self.error: grpc.RpcError | None = None
        self.ended = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for msg in self.call:
                self.offers.put(msg.offer)
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.ended.set()

    def next(self, timeout: float = 15.0) -> pb.Offer:
        try:
            return self.offers.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"agent {self.agent_id}: no offer within {timeout}s (error: {self.error})"
            ) from None

    def drain(self) -> list[pb.Offer]:
        out: list[pb.Offer] = []
        while True:
            try:
                out.append(self.offers.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self.call.cancel()
        self._thread.join(10)


def put_config(svc: Service, key: str, value: object) -> None:
    """Put a routing config value under the service's prefix; wait until it is applied or
    rejected."""
    settings = svc.settings
    rev = svc.call(
        put_json(settings.etcd_endpoints, settings.assignment_config_prefix + key, value)
    )
    svc.call(svc.app.watcher.wait_for_revision(rev, 10))


def delete_config(svc: Service, key: str) -> None:
    """Delete a routing config key; wait until the service has seen it."""
    settings = svc.settings
    rev = svc.call(delete_key(settings.etcd_endpoints, settings.assignment_config_prefix + key))
    svc.call(svc.app.watcher.wait_for_revision(rev, 10))
