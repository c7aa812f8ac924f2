"""Load and races with real processes: 10,000 jobs due in the same second all run
(2 worker processes), and Cancel racing with the due time is consistent."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from crm.scheduler.v1 import scheduler_pb2 as pb
from crm_devstack import wait_until
from crm_scheduler.domain.model import JobRef, JobState
from crm_scheduler.store import SchedulerStore
from google.protobuf import timestamp_pb2
from scheduler_testlib import (
    TARGET_METHOD,
    ApiService,
    Procs,
    TargetServer,
    later,
    now,
    spec,
    succeeded_named,
)

pytestmark = pytest.mark.slow


def test_ten_thousand_jobs_due_in_the_same_second(
    procs: Procs, module_store: SchedulerStore, target: TargetServer
) -> None:
    workers = [
        procs.start("worker", wait=False, CRM_SCHEDULER_WORKER_CONCURRENCY="8") for _ in range(2)
    ]
    procs.start("pump", CRM_SCHEDULER_ENQUEUE_LEASE_S="10")
    for w in workers:
        wait_until(w.serving, "worker SERVING", timeout=30)
    second = (now() + timedelta(seconds=3)).replace(microsecond=0)
    keys = [f"burst-{i}" for i in range(10_000)]
    for start in range(0, len(keys), 2000):
        module_store.schedule_many(
            [
                spec("burst", target, second + timedelta(microseconds=i * 97), key=k)
                for i, k in enumerate(keys[start : start + 2000], start)
            ],
            now(),
        )
    wait_until(
        lambda: succeeded_named(module_store, "burst") == len(keys),
        "10,000 jobs to succeed",
        timeout=120,
        interval=0.5,
    )
    missing = [k for k in keys if target.effects.get(k) != 1]
    assert not missing, f"{len(missing)} without their effect, e.g. {missing[:3]}"


def test_cancel_racing_with_the_due_time(
    procs: Procs, api: ApiService, module_store: SchedulerStore, target: TargetServer
) -> None:
    worker = procs.start("worker", wait=False)
    procs.start("pump")
    wait_until(worker.serving, "worker SERVING", timeout=30)
    due = later(2.0)
    eta = timestamp_pb2.Timestamp()
    eta.FromDatetime(due)
    keys = [f"race-{i}" for i in range(200)]
    for k in keys:
        api.schedule(
            name="race",
            idempotency_key=k,
            eta=eta,
            target=pb.Target(method=TARGET_METHOD, address=target.address),
        )
    rng = random.Random(11)
    offsets = {k: rng.uniform(-0.3, 0.5) for k in keys}
    results: dict[str, str] = {}
    lock = threading.Lock()

    def cancel(key: str) -> None:
        time.sleep(max(0.0, (due - datetime.now(UTC)).total_seconds() + offsets[key]))
        try:
            api.stub.Cancel(pb.CancelRequest(idempotency_key=key), timeout=10)
            outcome = "CANCELLED"
        except grpc.RpcError as err:
            outcome = err.code().name
        with lock:
            results[key] = outcome

    with ThreadPoolExecutor(max_workers=50) as pool:
        list(pool.map(cancel, keys))
    assert set(results.values()) <= {"CANCELLED", "FAILED_PRECONDITION"}

    def settled() -> bool:
        return all(
            module_store.get(JobRef(idempotency_key=k)).state
            in (JobState.CANCELLED, JobState.SUCCEEDED)
            for k in keys
        )

    wait_until(settled, "every raced job to be final", timeout=30, interval=0.2)
    for k in keys:
        state = module_store.get(JobRef(idempotency_key=k)).state
        if results[k] == "CANCELLED":
            assert state is JobState.CANCELLED, k
            assert k not in target.calls, f"{k} was cancelled but ran"
        else:
            assert state is JobState.SUCCEEDED, k
            assert target.effects.get(k) == 1, k
