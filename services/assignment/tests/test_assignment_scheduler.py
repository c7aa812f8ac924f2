"""Offer timeouts and revisit wake-ups through the real scheduler: its API in-process, a
pump and a worker as processes, its own MariaDB database and redis-server. The local
recycle loop runs as a slow safety sweep (600 s) so only the scheduler can recycle, except
in the scheduler-down test where a short sweep is the safety net."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from assignment_testlib import OfferReader, Service, put_config, settings_for
from crm.assignment.v1 import assignment_pb2 as pb
from crm_assignment.clients.scheduler_timeouts import (
    EXPIRE_OFFER_JOB,
    WAKE_REVISIT_JOB,
    SchedulerOfferTimeouts,
    expire_offer_key,
    wake_revisit_key,
)
from crm_assignment.domain.model import utc_now
from crm_common.config_watch import put_json
from crm_devstack import wait_until
from crm_devstack.stack import Stack, refusing_port
from google.protobuf.timestamp_pb2 import Timestamp
from scheduler_testlib import RealScheduler, real_scheduler


@pytest.fixture(scope="module")
def scheduler(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealScheduler]:
    with real_scheduler(tmp_path_factory.mktemp("scheduler")) as running:
        yield running


def _service(
    migrated_db: str, etcd_endpoint: str, config_prefix: str, accept_timeout_s: int, **kw: Any
) -> Service:
    values: dict[str, Any] = {"recycle_safety_sweep_s": 600.0, "scheduler_timeout_s": 2.0}
    values.update(kw)
    svc = Service(settings_for(migrated_db, etcd_endpoint, config_prefix, **values), utc_now)
    settings = svc.settings
    rev = svc.call(
        put_json(
            settings.etcd_endpoints,
            settings.assignment_config_prefix + "SALE",
            {"accept_timeout_s": accept_timeout_s},
        )
    )
    svc.call(svc.app.watcher.wait_for_revision(rev, 10))
    return svc


def _timeouts(svc: Service) -> SchedulerOfferTimeouts:
    timeouts = svc.app.timeouts
    assert isinstance(timeouts, SchedulerOfferTimeouts)
    return timeouts


def _events(svc: Service, task_id: int, kind: str) -> list[pb.TaskEvent]:
    return [e for e in svc.task(task_id).history if e.kind == kind]


def _offer_once(svc: Service, agent_id: int, key: str, phone: str) -> tuple[int, int]:
    """An offer to the agent (its stream closed again); returns (task id, offer event id)."""
    task_id = svc.clue(key, phone).task.id
    reader = OfferReader(svc.stub, agent_id)
    try:
        assert reader.next().task.id == task_id
    finally:
        reader.close()
    (offered,) = _events(svc, task_id, "OFFERED")
    return task_id, offered.id


def _revisit_of(
    svc: Service, reader: OfferReader, agent_id: int, key: str, phone: str, in_s: float
) -> tuple[int, datetime]:
    """A new task offered to the agent on ``reader``, accepted and completed with a revisit
    due ``in_s`` from now: (revisit task id, its due time)."""
    task_id = svc.clue(key, phone).task.id
    assert reader.next().task.id == task_id
    svc.stub.AcceptTask(pb.AcceptTaskRequest(task_id=task_id, agent_id=agent_id))
    revisit_at = datetime.now(UTC) + timedelta(seconds=in_s)
    ts = Timestamp()
    ts.FromDatetime(revisit_at)
    done = svc.stub.CompleteTask(
        pb.CompleteTaskRequest(task_id=task_id, agent_id=agent_id, revisit_at=ts)
    )
    return done.revisit.id, revisit_at


def test_unaccepted_offer_recycled_by_scheduler_job(
    scheduler: RealScheduler, migrated_db: str, etcd_endpoint: str, config_prefix: str
) -> None:
    svc = _service(migrated_db, etcd_endpoint, config_prefix, 1, scheduler_target=scheduler.target)
    try:
        svc.agent(1)
        task_id, event_id = _offer_once(svc, 1, "sch-1", "13800138700")
        key = expire_offer_key(task_id, event_id)
        job = wait_until(lambda: scheduler.succeeded(key), "expire job SUCCEEDED", 20)
        assert job.name == EXPIRE_OFFER_JOB
        assert job.target.method == "/crm.assignment.v1.AssignmentService/ExpireOffer"
        assert job.target.address == svc.app.target
        assert pb.ExpireOfferRequest.FromString(job.target.request) == pb.ExpireOfferRequest(
            task_id=task_id, offer_event_id=event_id
        )
        (timed_out,) = _events(svc, task_id, "TIMED_OUT")
        assert timed_out.agent_id == 1
        assert svc.task(task_id).task.status == pb.STATUS_RECYCLED
        timeouts = _timeouts(svc)
        assert timeouts.sweep.recycled_total == 0  # not the (600 s) safety sweep
        assert timeouts.failed_total == 0
    finally:
        svc.close()


def test_accepted_offer_expire_is_a_noop(
    scheduler: RealScheduler, migrated_db: str, etcd_endpoint: str, config_prefix: str
) -> None:
    svc = _service(migrated_db, etcd_endpoint, config_prefix, 2, scheduler_target=scheduler.target)
    try:
        svc.agent(1)
        task_id, event_id = _offer_once(svc, 1, "sch-2", "13800138701")
        svc.stub.AcceptTask(pb.AcceptTaskRequest(task_id=task_id, agent_id=1))
        key = expire_offer_key(task_id, event_id)
        wait_until(lambda: scheduler.succeeded(key), "expire job SUCCEEDED (no-op)", 20)
        again = svc.stub.ExpireOffer(
            pb.ExpireOfferRequest(task_id=task_id, offer_event_id=event_id)
        )
        assert again.recycled is False
        assert svc.task(task_id).task.status == pb.STATUS_IN_PROGRESS
        assert _events(svc, task_id, "TIMED_OUT") == []
        # a task that does not exist (any more) is a no-op too
        gone = svc.stub.ExpireOffer(pb.ExpireOfferRequest(task_id=999999, offer_event_id=1))
        assert gone.recycled is False
    finally:
        svc.close()


def test_expire_twice_recycles_once_and_early_call_retries(
    migrated_db: str, etcd_endpoint: str, config_prefix: str
) -> None:
    """Direct calls (the scheduler configured but unreachable, the sweep slow), so
    nothing else recycles the offer meanwhile."""
    with refusing_port() as dead:  # the scheduler is down
        svc = _service(
            migrated_db,
            etcd_endpoint,
            config_prefix,
            1,
            scheduler_target=f"127.0.0.1:{dead}",
            scheduler_timeout_s=0.5,
        )
        try:
            svc.agent(1)
            task_id, event_id = _offer_once(svc, 1, "sch-3", "13800138702")
            request = pb.ExpireOfferRequest(task_id=task_id, offer_event_id=event_id)
            with pytest.raises(grpc.RpcError) as early:  # before the deadline: try later
                svc.stub.ExpireOffer(request)
            assert early.value.code() == grpc.StatusCode.UNAVAILABLE
            stale = pb.ExpireOfferRequest(task_id=task_id, offer_event_id=event_id - 1)
            time.sleep(1.2)
            assert svc.stub.ExpireOffer(stale).recycled is False  # not the current offer
            metadata = (("x-idempotency-key", expire_offer_key(task_id, event_id)),)
            first = svc.stub.ExpireOffer(request, metadata=(*metadata, ("x-attempt", "1")))
            second = svc.stub.ExpireOffer(request, metadata=(*metadata, ("x-attempt", "2")))
            assert (first.recycled, second.recycled) == (True, False)
            assert len(_events(svc, task_id, "TIMED_OUT")) == 1
            assert svc.task(task_id).task.status == pb.STATUS_RECYCLED
            assert _timeouts(svc).sweep.recycled_total == 0
        finally:
            svc.close()


def test_due_revisit_offered_when_wake_job_fires(
    scheduler: RealScheduler, migrated_db: str, etcd_endpoint: str, config_prefix: str
) -> None:
    svc = _service(
        migrated_db,
        etcd_endpoint,
        config_prefix,
        5,
        scheduler_target=scheduler.target,
        dispatch_poll_s=60.0,  # an idle stream does not poll: only a wake-up finds the revisit
    )
    reader: OfferReader | None = None
    try:
        svc.agent(1)
        reader = OfferReader(svc.stub, 1)
        revisit_id, revisit_at = _revisit_of(svc, reader, 1, "sch-4", "13800138703", 2)
        offer = reader.next(timeout=10)
        offered_at = datetime.now(UTC)
        assert offer.task.id == revisit_id
        assert offered_at >= revisit_at
        assert (offered_at - revisit_at).total_seconds() < 5  # promptly, not the 60 s poll
        job = wait_until(
            lambda: scheduler.succeeded(wake_revisit_key(revisit_id)), "wake job SUCCEEDED", 10
        )
        assert job.name == WAKE_REVISIT_JOB
        # a repeated wake-up of a task no longer waiting is a no-op OK
        again = svc.stub.WakeRevisit(pb.WakeRevisitRequest(task_id=revisit_id))
        assert again.woken is False
    finally:
        if reader is not None:
            reader.close()
        svc.close()


def test_scheduler_down_safety_sweep_recycles(
    migrated_db: str, etcd_endpoint: str, config_prefix: str
) -> None:
    with refusing_port() as dead:  # the scheduler is down
        svc = _service(
            migrated_db,
            etcd_endpoint,
            config_prefix,
            1,
            scheduler_target=f"127.0.0.1:{dead}",
            scheduler_timeout_s=0.5,
            recycle_safety_sweep_s=0.3,
        )
        try:
            svc.agent(1)
            task_id, _ = _offer_once(svc, 1, "sch-5", "13800138704")
            wait_until(lambda: _events(svc, task_id, "TIMED_OUT"), "TIMED_OUT by the sweep", 10)
            timeouts = _timeouts(svc)
            assert timeouts.sweep.recycled_total == 1
            wait_until(lambda: timeouts.failed_total >= 1, "the failed Schedule counted", 5)
            assert timeouts.scheduled_total == 0
        finally:
            svc.close()


def test_revisit_offered_to_others_when_its_reservation_ends(
    migrated_db: str, etcd_endpoint: str, config_prefix: str
) -> None:
    """A due revisit stays reserved for its agent ``revisit_same_agent_window_s``; another
    agent's stream that looked meanwhile is woken when the reservation ends, not by its
    60 s poll. (WakeRevisit is called here as the scheduler would call it.)"""
    window_s = 2
    svc = _service(migrated_db, etcd_endpoint, config_prefix, 30, dispatch_poll_s=60.0)
    first: OfferReader | None = None
    other: OfferReader | None = None
    try:
        put_config(svc, "SALE", {"accept_timeout_s": 30, "revisit_same_agent_window_s": window_s})
        svc.agent(1)
        first = OfferReader(svc.stub, 1)
        revisit_id, revisit_at = _revisit_of(svc, first, 1, "sch-reserved", "13800138709", 1)
        first.close()  # agent 1 is away: its revisit waits for it during the window
        first = None
        svc.agent(2)
        other = OfferReader(svc.stub, 2)
        time.sleep(max((revisit_at - datetime.now(UTC)).total_seconds(), 0) + 0.2)
        assert svc.stub.WakeRevisit(pb.WakeRevisitRequest(task_id=revisit_id)).woken
        offer = other.next(timeout=20)  # the poll alone would take 60 s
        offered_at = datetime.now(UTC)
        assert offer.task.id == revisit_id
        assert offered_at >= revisit_at + timedelta(seconds=window_s)  # the reservation held
    finally:
        for reader in (first, other):
            if reader is not None:
                reader.close()
        svc.close()
