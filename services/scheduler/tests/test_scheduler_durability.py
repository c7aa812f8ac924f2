"""Durability with real processes: kill -9 of a worker mid-job and of the pump, Redis
flushed and restarted while jobs are pending. Every job still runs, and the target
(idempotent by ``x-idempotency-key``) applies each job's effect exactly once."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest
from crm_devstack import wait_until
from crm_scheduler.domain.model import JobRef, JobState
from crm_scheduler.store import SchedulerStore
from scheduler_testlib import Procs, RedisServer, TargetServer, later, now, spec, succeeded


@pytest.fixture(autouse=True)
def _clean_target(target: TargetServer) -> Iterator[None]:
    yield
    target.script.clear()
    target.hang_first.clear()
    target.hanging.clear()


def _jobs_queued(raw_messages: list[bytes]) -> int:
    """Jobs carried by Celery messages (each message a batch of job dispatches)."""
    jobs = 0
    for raw in raw_messages:
        envelope = json.loads(raw)
        _args, kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        jobs += len(kwargs["messages"])
    return jobs


def _all_succeeded(store: SchedulerStore, keys: list[str]) -> bool:
    return succeeded(store, keys) == len(keys)


def _assert_each_effect_once(target: TargetServer, keys: list[str]) -> None:
    missing = [k for k in keys if target.effects.get(k) != 1]
    assert not missing, f"{len(missing)} job(s) without their effect, e.g. {missing[:5]}"


def _schedule(
    store: SchedulerStore,
    target: TargetServer,
    prefix: str,
    n: int,
    spread_s: float,
    start_s: float = 0.3,
    deadline_ms: int = 5000,
) -> list[str]:
    keys = [f"{prefix}-{i}" for i in range(n)]
    store.schedule_many(
        [
            spec(prefix, target, later(start_s + spread_s * i / n), key=k, deadline_ms=deadline_ms)
            for i, k in enumerate(keys)
        ],
        now(),
    )
    return keys


def test_worker_killed_mid_job(
    procs: Procs, module_store: SchedulerStore, target: TargetServer
) -> None:
    first = procs.start("worker", wait=False)
    procs.start("pump")
    wait_until(first.serving, "worker SERVING", timeout=30)
    target.hang_first.add("hang")
    module_store.schedule_many(
        [spec("hang", target, now(), key="hang", deadline_ms=3000, max_retries=3)], now()
    )
    keys = ["hang", *_schedule(module_store, target, "wk", 60, 1.0)]
    wait_until(target.hanging.is_set, "the target to hang on its first call")
    first.kill9()  # the worker dies in the middle of the call (and with what it held)
    procs.start("worker")
    wait_until(lambda: _all_succeeded(module_store, keys), "every job to succeed", timeout=40)
    _assert_each_effect_once(target, keys)
    assert target.calls["hang"] == [1, 2]
    job = module_store.get(JobRef(idempotency_key="hang"))
    assert job.last_error_code == "LEASE_EXPIRED"  # the reaper, not the call deadline
    assert job.total_attempts == 2


def test_pump_killed(procs: Procs, module_store: SchedulerStore, target: TargetServer) -> None:
    # a pump that died between its commit and its send: ENQUEUED rows, no messages
    orphans = _schedule(module_store, target, "orphan", 20, 0, start_s=-0.1)
    assert len(module_store.enqueue_due(now(), 100, 0.5)) == 20
    keys = orphans + _schedule(module_store, target, "pk", 300, 3.0, start_s=1.0)
    worker = procs.start("worker", wait=False)
    pump = procs.start("pump")
    wait_until(worker.serving, "worker SERVING", timeout=30)
    wait_until(lambda: sum(1 for k in keys[20:] if target.effects.get(k)) > 30, "some jobs run")
    pump.kill9()
    procs.start("pump")
    wait_until(lambda: _all_succeeded(module_store, keys), "every job to succeed", timeout=40)
    _assert_each_effect_once(target, keys)
    assert all(target.calls[k] == [1] for k in orphans)


def test_redis_flushed_with_jobs_in_the_queue(
    procs: Procs, module_store: SchedulerStore, target: TargetServer, redis_server: RedisServer
) -> None:
    pump = procs.start("pump")  # no worker yet: the sent jobs wait in Redis
    keys = _schedule(module_store, target, "fl", 100, 0.2, start_s=0)
    queue = redis_server.client()
    try:
        wait_until(lambda: _jobs_queued(queue.lrange("crm-scheduler", 0, -1)) >= 100, "jobs queued")
    finally:
        queue.close()
    assert module_store.count_by_state().get(JobState.ENQUEUED) == 100
    redis_server.flushall()
    procs.start("worker")
    wait_until(lambda: _all_succeeded(module_store, keys), "every job to succeed", timeout=40)
    _assert_each_effect_once(target, keys)
    [reaped] = [
        line.split()[-1]
        for line in pump.metrics().splitlines()
        if line.startswith('crm_scheduler_reaped_total{state="ENQUEUED"}')
    ]
    assert float(reaped) >= 100  # re-sent (once per lease, backing off while unclaimed)


def test_redis_restarted_with_jobs_pending(
    procs: Procs, module_store: SchedulerStore, target: TargetServer, redis_server: RedisServer
) -> None:
    worker = procs.start("worker", wait=False)
    procs.start("pump")
    wait_until(worker.serving, "worker SERVING", timeout=30)
    keys = _schedule(module_store, target, "rs", 200, 4.0, start_s=0.5)
    wait_until(
        lambda: len(target.effects) > 0 and any(k in target.effects for k in keys), "first job"
    )
    redis_server.restart()  # no persistence: whatever was queued is gone
    wait_until(lambda: _all_succeeded(module_store, keys), "every job to succeed", timeout=60)
    _assert_each_effect_once(target, keys)
    assert worker.alive


def test_pump_and_worker_report_health_and_metrics(
    procs: Procs, target: TargetServer, module_store: SchedulerStore
) -> None:
    worker = procs.start("worker", wait=False)
    pump = procs.start("pump")
    wait_until(worker.serving, "worker SERVING", timeout=30)
    keys = _schedule(module_store, target, "mx", 5, 0.1)
    wait_until(lambda: _all_succeeded(module_store, keys), "jobs to succeed")
    pump_metrics = pump.metrics()
    assert "crm_scheduler_due_lag_seconds_bucket" in pump_metrics
    assert 'crm_scheduler_queue_depth{queue="in_flight"}' in pump_metrics
    worker_metrics = wait_until(
        lambda: next((m for m in [worker.metrics()] if 'outcome="succeeded"' in m), ""),
        "worker metrics",
    )
    assert "crm_scheduler_start_lag_seconds_bucket" in worker_metrics
    assert "crm_scheduler_receive_margin_seconds_bucket" in worker_metrics
    assert "crm_scheduler_held_jobs" in worker_metrics
    assert 'crm_scheduler_attempts_total{code="OK",outcome="succeeded"}' in worker_metrics


def test_worker_stopped_runs_what_it_holds(
    procs: Procs, module_store: SchedulerStore, target: TargetServer
) -> None:
    """SIGTERM: the worker stops taking messages, but the jobs it already holds (acked
    messages, handed over up to ``pump_lead_s`` early) still run at their due time and
    are recorded before it exits: nothing is left to the leases."""
    worker = procs.start("worker", wait=False)
    pump = procs.start("pump", CRM_SCHEDULER_PUMP_LEAD_S="4")  # held long before due
    wait_until(worker.serving, "worker SERVING", timeout=30)
    keys = _schedule(module_store, target, "term", 20, 0.3, start_s=6.0)

    def held() -> float:
        lines = [
            m for m in worker.metrics().splitlines() if m.startswith("crm_scheduler_held_jobs")
        ]
        return float(lines[0].split()[-1]) if lines else 0.0

    wait_until(lambda: held() == len(keys), "the worker to hold every job", timeout=30)
    assert not any(k in target.calls for k in keys)  # held, none due yet
    worker.stop(timeout=30)
    assert worker.popen.returncode is not None
    etas = {k: module_store.get(JobRef(idempotency_key=k)).eta.timestamp() for k in keys}
    assert _all_succeeded(module_store, keys)  # recorded before the worker exited
    assert all(target.calls[k] == [1] for k in keys)
    assert all(target.received_at[k] >= etas[k] for k in keys), "a job ran before its ETA"
    [reaped] = [
        line.split()[-1]
        for line in pump.metrics().splitlines()
        if line.startswith('crm_scheduler_reaped_total{state="ENQUEUED"}')
    ]
    assert float(reaped) == 0  # nothing was left to the leases
