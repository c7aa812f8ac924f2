"""The store's concurrency contract on real MariaDB, and the worker's runner against a
real gRPC target (no Celery: messages are handed to the runner directly)."""

from __future__ import annotations

import random
import threading
from datetime import timedelta

import pytest
from crm_common.errors import FailedPrecondition, NotFound
from crm_scheduler.domain.model import Dispatch, JobRef, JobState
from crm_scheduler.domain.retry import AttemptOutcome
from crm_scheduler.store import SchedulerStore
from crm_scheduler.worker.runner import JobRunner
from scheduler_testlib import TargetServer, now, spec


def _one(store: SchedulerStore, key: str) -> JobState:
    return store.get(JobRef(idempotency_key=key)).state


def test_due_jobs_move_once_even_with_concurrent_pumps(store: SchedulerStore) -> None:
    t0 = now()
    due = [spec("due", "127.0.0.1:1", t0 - timedelta(seconds=1), key=f"d{i}") for i in range(600)]
    future = [spec("later", "127.0.0.1:1", t0 + timedelta(hours=1), key=f"f{i}") for i in range(50)]
    store.schedule_many(due + future, t0)
    got: list[Dispatch] = []
    lock = threading.Lock()

    def pump() -> None:
        while batch := store.enqueue_due(now(), 50, 10):
            with lock:
                got.extend(batch)

    threads = [threading.Thread(target=pump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    keys = [d.idempotency_key for d in got]
    assert len(keys) == len(set(keys)) == 600
    assert all(d.attempt == 1 and d.run_attempt == 1 for d in got)
    counts = store.count_by_state()
    assert counts[JobState.ENQUEUED] == 600
    assert counts[JobState.SCHEDULED] == 50
    assert store.in_flight_count() == 600


def test_claim_is_once_per_attempt(store: SchedulerStore) -> None:
    t0 = now()
    store.schedule_many([spec("c", "127.0.0.1:1", t0, key="c1")], t0)
    [d] = store.enqueue_due(now(), 10, 10)
    assert store.claim(d, now(), 5, "w1")
    assert not store.claim(d, now(), 5, "w2")  # duplicate delivery: no-op
    job = store.get(JobRef(idempotency_key="c1"))
    assert job.state is JobState.RUNNING
    assert job.attempts == job.total_attempts == 1
    # a failed attempt, then the retry's message; the first message is stale now
    fail = AttemptOutcome(JobState.RETRY_WAIT, now() - timedelta(milliseconds=1))
    assert store.record_failure(d, now(), fail, "UNAVAILABLE", "down")
    assert not store.record_failure(d, now(), fail, "UNAVAILABLE", "again")
    [d2] = store.enqueue_due(now(), 10, 10)
    assert (d2.attempt, d2.run_attempt) == (2, 2)
    assert not store.claim(d, now(), 5, "w1")
    assert store.claim(d2, now(), 5, "w1")
    assert store.record_success(d2, now())
    job = store.get(JobRef(idempotency_key="c1"))
    assert job.state is JobState.SUCCEEDED
    assert job.last_error_code == "UNAVAILABLE"
    assert job.finished_at is not None


def test_reaper_resends_lost_messages_and_retries_dead_workers(store: SchedulerStore) -> None:
    t0 = now()
    store.schedule_many(
        [
            spec("r", "127.0.0.1:1", t0, key="lost-msg"),
            spec("r", "127.0.0.1:1", t0, key="dead-worker"),
            spec("r", "127.0.0.1:1", t0, key="dead-worker-last", max_retries=0),
        ],
        t0,
    )
    ds = {d.idempotency_key: d for d in store.enqueue_due(now(), 10, 0.01)}
    assert store.claim(ds["dead-worker"], now(), 0.01, "w-dead")
    assert store.claim(ds["dead-worker-last"], now(), 0.01, "w-dead")
    assert store.reap_expired(now() - timedelta(seconds=5), 10, 10).resend == []
    reaped = store.reap_expired(now() + timedelta(seconds=1), 10, 10)
    assert reaped.dead == 1
    assert (reaped.lost_enqueued, reaped.lost_running) == (1, 2)
    again = {d.idempotency_key: d for d in reaped.resend}
    assert set(again) == {"lost-msg", "dead-worker"}
    assert (again["lost-msg"].attempt, again["lost-msg"].run_attempt) == (1, 1)
    assert (again["dead-worker"].attempt, again["dead-worker"].run_attempt) == (2, 2)
    dead = store.get(JobRef(idempotency_key="dead-worker-last"))
    assert dead.state is JobState.DEAD
    assert dead.last_error_code == "LEASE_EXPIRED"
    # both the lost and the re-sent message of "lost-msg" can claim it, only once
    assert store.claim(ds["lost-msg"], now(), 5, "w")
    assert not store.claim(again["lost-msg"], now(), 5, "w")
    # the dead worker's late success is kept (the effect happened), its stale claim not
    assert not store.claim(ds["dead-worker"], now(), 5, "w")
    assert store.record_success(ds["dead-worker"], now())
    assert _one(store, "dead-worker") is JobState.SUCCEEDED
    assert not store.claim(again["dead-worker"], now(), 5, "w")


def test_cancel_and_rerun_rules(store: SchedulerStore) -> None:
    t0 = now()
    store.schedule_many(
        [spec("x", "127.0.0.1:1", t0, key=k, max_retries=0) for k in ("a", "b", "c")], t0
    )
    ds = {d.idempotency_key: d for d in store.enqueue_due(now(), 10, 10)}
    assert store.cancel(JobRef(idempotency_key="a"), now()).state is JobState.CANCELLED
    assert store.cancel(JobRef(idempotency_key="a"), now()).state is JobState.CANCELLED
    assert not store.claim(ds["a"], now(), 5, "w")  # cancelled while enqueued: never runs
    assert store.claim(ds["b"], now(), 5, "w")
    with pytest.raises(FailedPrecondition, match="RUNNING"):
        store.cancel(JobRef(idempotency_key="b"), now())
    dead = AttemptOutcome(JobState.DEAD, None)
    assert store.record_failure(ds["b"], now(), dead, "NOT_FOUND", "gone")
    with pytest.raises(FailedPrecondition, match="DEAD"):
        store.cancel(JobRef(idempotency_key="b"), now())
    with pytest.raises(FailedPrecondition, match="only a DEAD job"):
        store.rerun(JobRef(idempotency_key="c"), now())
    rerun = store.rerun(JobRef(idempotency_key="b"), now())
    assert rerun.state is JobState.SCHEDULED
    assert (rerun.attempts, rerun.total_attempts, rerun.reruns) == (0, 1, 1)
    [d] = [d for d in store.enqueue_due(now(), 10, 10) if d.idempotency_key == "b"]
    assert (d.attempt, d.run_attempt) == (2, 1)
    with pytest.raises(NotFound):
        store.cancel(JobRef(idempotency_key="nope"), now())


def _runner(store: SchedulerStore) -> JobRunner:
    return JobRunner(
        lambda: store, worker_name="t", lease_grace_s=1, clock=now, rng=random.Random(3)
    )


def _run_all(store: SchedulerStore, runner: JobRunner, rounds: int = 50) -> list[str]:
    outcomes: list[str] = []
    for _ in range(rounds):
        batch = store.enqueue_due(now(), 100, 10)
        outcomes.extend(runner.handle(d.to_message()) for d in batch)
        if not batch and not store.count_by_state().get(JobState.RETRY_WAIT):
            break
        threading.Event().wait(0.03)
    return outcomes


def test_runner_calls_with_metadata_retries_and_gives_up(
    store: SchedulerStore, target: TargetServer
) -> None:
    t0 = now()
    target.script.update(
        {
            "run-retry": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
            "run-final": ["FAILED_PRECONDITION"],
            "run-exhausted": ["UNAVAILABLE"] * 5,
        }
    )
    store.schedule_many(
        [
            spec("r", target, t0, key="run-ok", deadline_ms=2500, request=b"\x01\x02"),
            spec("r", target, t0, key="run-retry"),
            spec("r", target, t0, key="run-final"),
            spec("r", target, t0, key="run-exhausted", max_retries=2),
            spec("r", "127.0.0.1:1", t0, key="run-nowhere", max_retries=0, deadline_ms=300),
        ],
        t0,
    )
    runner = _runner(store)
    try:
        _run_all(store, runner)
    finally:
        runner.close()
    assert target.calls["run-ok"] == [1]
    assert target.requests["run-ok"] == b"\x01\x02"
    # the attempt deadline travels with the call: about 2.5 s left when it arrives (a call
    # without one has none). How much less depends on how busy the shared machine is, so no
    # lower bound but > 0; and gRPC computes each end's deadline from its own cached clock
    # (seen 2.509 s at load 14), so the upper bound allows 0.1 s of slack.
    assert 0 < target.deadlines["run-ok"] <= 2.6
    assert target.calls["run-retry"] == [1, 2, 3]
    assert target.calls["run-final"] == [1]
    assert target.calls["run-exhausted"] == [1, 2, 3]
    states = {k: store.get(JobRef(idempotency_key=k)) for k in target.calls}
    assert states["run-ok"].state is JobState.SUCCEEDED
    assert states["run-retry"].state is JobState.SUCCEEDED
    assert states["run-retry"].attempts == 3
    assert states["run-final"].state is JobState.DEAD
    assert states["run-final"].last_error_code == "FAILED_PRECONDITION"
    assert states["run-exhausted"].state is JobState.DEAD
    assert states["run-exhausted"].last_error_code == "UNAVAILABLE"
    nowhere = store.get(JobRef(idempotency_key="run-nowhere"))
    assert nowhere.state is JobState.DEAD
    assert nowhere.last_error_code in {"UNAVAILABLE", "DEADLINE_EXCEEDED"}
    assert sum(target.effects.values()) == 2


def test_runner_drops_malformed_and_duplicate_messages(
    store: SchedulerStore, target: TargetServer
) -> None:
    t0 = now()
    store.schedule_many([spec("m", target, t0, key="dup")], t0)
    [d] = store.enqueue_due(now(), 10, 10)
    runner = _runner(store)
    try:
        assert runner.handle({"v": 1, "job_id": "x"}) == "malformed"
        assert runner.handle(d.to_message()) == "succeeded"
        assert runner.handle(d.to_message()) == "skipped"
    finally:
        runner.close()
    assert target.calls["dup"] == [1]


def test_jobs_handed_over_early_are_held_cancellable_until_claimed_and_called_when_due(
    store: SchedulerStore, target: TargetServer
) -> None:
    t0 = now()
    etas = {f"early-{i}": t0 + timedelta(seconds=0.3 + 0.1 * i) for i in range(4)}
    etas["early-late"] = t0 + timedelta(seconds=4)  # cancelled while the worker holds it
    store.schedule_many([spec("early", target, eta, key=k) for k, eta in etas.items()], t0)
    move = store.move_due(now(), now() + timedelta(seconds=5), 100, 10, 1000)
    assert sorted(d.idempotency_key for d in move.dispatches) == sorted(etas)
    assert move.in_flight == 0
    assert move.next_due is None
    # the lease runs from the end of the lead window: holding a job eats none of it
    lease = store.get(JobRef(idempotency_key="early-late")).lease_until
    assert lease is not None
    assert lease >= etas["early-late"]
    # the message lists them out of due order; the runner holds them all
    messages = [d.to_message() for d in sorted(move.dispatches, key=lambda d: d.uid)]
    keys = [d.idempotency_key for d in sorted(move.dispatches, key=lambda d: d.uid)]
    runner = _runner(store)
    try:
        ticket = runner.submit(messages)  # returns at once: the Celery message is acked
        # held, not claimed yet: Cancel still succeeds
        assert _one(store, "early-late") is JobState.ENQUEUED
        assert store.cancel(JobRef(idempotency_key="early-late"), now()).state is (
            JobState.CANCELLED
        )
        assert ticket.wait(30)
    finally:
        runner.close()
    outcomes = dict(zip(keys, ticket.outcomes, strict=True))
    assert outcomes.pop("early-late") == "skipped"  # its claim failed: cancelled jobs never run
    assert set(outcomes.values()) == {"succeeded"}
    assert "early-late" not in target.calls
    for key in outcomes:
        assert target.received_at[key] >= etas[key].timestamp(), f"{key} ran before it was due"
        assert target.calls[key] == [1]
        assert _one(store, key) is JobState.SUCCEEDED


def test_runner_close_drains_held_jobs(store: SchedulerStore, target: TargetServer) -> None:
    """A worker stopping (SIGTERM) still runs what it holds at its due time and records
    every result before it exits."""
    t0 = now()
    etas = {f"drain-{i}": t0 + timedelta(seconds=0.5 + 0.05 * i) for i in range(5)}
    store.schedule_many([spec("drain", target, eta, key=k) for k, eta in etas.items()], t0)
    move = store.move_due(now(), now() + timedelta(seconds=5), 100, 10, 1000)
    runner = _runner(store)
    runner.submit([d.to_message() for d in move.dispatches])
    assert runner.close(drain_timeout_s=30)
    for key, eta in etas.items():
        assert _one(store, key) is JobState.SUCCEEDED
        assert target.received_at[key] >= eta.timestamp(), f"{key} ran before it was due"
        assert target.calls[key] == [1]
