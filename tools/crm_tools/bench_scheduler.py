"""Scheduler benchmarks (issue #4), called by `make bench` through ``run(seconds)``.

- lateness: 10,000 jobs spread evenly over ``seconds`` (10 s by default), each calling a
  recording gRPC target in this process; lateness = receive time - ETA; p50/p99
  (target p99 < 250 ms). The jobs are inserted in ETA order, starting 5 s ahead, and
  the row counts any inserted after their ETA (``inserted_after_eta``, should be 0).
- throughput: N no-op jobs due at once (bulk insert), until all are SUCCEEDED, against a
  raw Celery no-op task loop (same Redis, same pool, concurrency and worker processes,
  acks_late, prefetch 1; the task only counts itself) measured in the same run
  (target >= 0.5x). Both sides submit in bulk: our jobs by one bulk insert, the raw
  tasks (one message each) through kombu's pipelined batch publish, as our pump
  publishes. Our scheduler packs several jobs into one Celery message; the raw loop
  is plain Celery, one task per message: the ratio compares jobs/s to tasks/s.
- memory: RSS of a worker process before and after 100,000 future jobs are pending (it
  must stay flat: pending jobs live in MySQL, never in a worker).

Processes are started as in production (``python -m crm_scheduler pump|worker``) on the
local stack's MariaDB and Redis (own queue names). Standalone:
``python -m crm_tools.bench_scheduler [--seconds 10]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from crm_devstack import create_database, drop_database, free_port, up

from crm_tools.bench import OUT, pct
from crm_tools.noop_server import NOOP_METHOD
from crm_tools.procs import ServiceProc, run_module, start_service, wait_serving

__all__ = ["run"]

DB_NAME = "crm_bench_scheduler"
QUEUE = "crm-bench-scheduler"
RAW_QUEUE = "crm-bench-raw-celery"
RAW_COUNTER = "crm-bench-raw-celery-done"
WORKERS = 2
CONCURRENCY = 8
LATENESS_JOBS = 10_000
LATENESS_LEAD_S = 5.0
THROUGHPUT_JOBS = 4_000
PENDING_JOBS = 100_000
RECORD_SERVICE = "crm.bench.Record"
RECORD_METHOD = f"/{RECORD_SERVICE}/Hit"


class _Recorder:
    """A gRPC target in this process recording when each idempotency key arrived."""

    def __init__(self) -> None:
        self.received: dict[str, float] = {}
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
        handler = grpc.method_handlers_generic_handler(
            RECORD_SERVICE,
            {"Hit": grpc.unary_unary_rpc_method_handler(self._hit)},
        )
        self._server.add_generic_rpc_handlers((handler,))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def _hit(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        at = time.time()
        for key, value in context.invocation_metadata():
            if key == "x-idempotency-key":
                with self._lock:
                    self.received.setdefault(str(value), at)
        return b""

    def count(self) -> int:
        with self._lock:
            return len(self.received)

    def stop(self) -> None:
        self._server.stop(0)


def _env(db_url: str, redis_url: str, **extra: str) -> dict[str, str]:
    return {
        "CRM_SCHEDULER_DATABASE_URL": db_url,
        "CRM_SCHEDULER_REDIS_URL": redis_url,
        "CRM_SCHEDULER_QUEUE_NAME": QUEUE,
        "CRM_SCHEDULER_HOST": "127.0.0.1",
        "CRM_SCHEDULER_LOG_LEVEL": "WARNING",
        "CRM_SCHEDULER_WORKER_CONCURRENCY": str(CONCURRENCY),
        "CRM_SCHEDULER_READINESS_INTERVAL_S": "0.5",
        **extra,
    }


def _spawn(name: str, argv: list[str], port: int, env: dict[str, str]) -> ServiceProc:
    log_path = OUT / f"{name}.log"
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            argv,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return ServiceProc(name=name, port=port, popen=popen, log_path=log_path, env=env)


def _start(command: str, index: int, db_url: str, redis_url: str) -> ServiceProc:
    port = free_port()
    prefix = "PUMP" if command == "pump" else "WORKER"
    env = _env(
        db_url,
        redis_url,
        **{
            f"CRM_SCHEDULER_{prefix}_HEALTH_PORT": str(port),
            f"CRM_SCHEDULER_{prefix}_METRICS_PORT": str(free_port()),
        },
    )
    argv = [sys.executable, "-m", "crm_scheduler", command]
    return _spawn(f"scheduler-{command}-{index}", argv, port, env)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _specs(name: str, address: str, method: str, etas: list[datetime]) -> list[Any]:
    from crm_scheduler.domain.model import JobSpec, Target

    return [
        JobSpec(
            name=name,
            target=Target(method, address, b""),
            eta=eta,
            idempotency_key=f"{name}-{i}",
            max_retries=3,
            backoff_initial_ms=100,
            backoff_max_ms=1000,
            attempt_deadline_ms=5000,
            when=f"eta:{eta.isoformat()}",
        )
        for i, eta in enumerate(etas)
    ]


async def _insert(store: Any, specs: list[Any], chunk: int = 5000) -> None:
    for start in range(0, len(specs), chunk):
        await asyncio.to_thread(
            store.schedule_many, specs[start : start + chunk], datetime.now(UTC)
        )


async def _succeeded(store: Any, name: str) -> int:
    from crm_scheduler.store.schema import JobRow
    from sqlalchemy import func, select

    def count() -> int:
        with store.engine.connect() as conn:
            q = (
                select(func.count())
                .select_from(JobRow)
                .where(JobRow.name == name, JobRow.state == "SUCCEEDED")
            )
            return int(conn.execute(q).scalar_one())

    return await asyncio.to_thread(count)


async def _poll(cond: Any, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


async def _lateness(store: Any, recorder: _Recorder, seconds: float) -> dict[str, Any]:
    start = datetime.now(UTC) + timedelta(seconds=LATENESS_LEAD_S)
    step = seconds / LATENESS_JOBS
    etas = [start + timedelta(seconds=i * step) for i in range(LATENESS_JOBS)]
    specs = _specs("bench-late", f"127.0.0.1:{recorder.port}", RECORD_METHOD, etas)
    # in ETA order, in small transactions: each is committed long before its first ETA
    # (a job inserted after its ETA would be late through no fault of the scheduler;
    # such jobs are counted and reported)
    inserted_late = 0
    for at in range(0, len(specs), 500):
        chunk = specs[at : at + 500]
        await _insert(store, chunk)
        inserted_late += sum(1 for s in chunk if s.eta <= datetime.now(UTC))

    async def all_in() -> bool:
        return recorder.count() >= LATENESS_JOBS

    await _poll(all_in, seconds + 120, "every lateness job to arrive")
    late = [
        recorder.received[s.idempotency_key] - s.eta.timestamp()
        for s in specs
        if s.idempotency_key in recorder.received
    ]
    p50, p99 = pct(late, 0.5), pct(late, 0.99)
    return {
        "measure": f"scheduler fire lateness ({LATENESS_JOBS} jobs over {seconds:g} s)",
        "p50_ms": p50,
        "p99_ms": p99,
        "max_ms": max(late) * 1000,
        "inserted_after_eta": inserted_late,
        "unit": "ms",
        "value": p99,
        "target": "p99 < 250",
        "ok": p99 < 250,
    }


async def _throughput(store: Any, noop_target: str) -> float:
    etas = [datetime.now(UTC)] * THROUGHPUT_JOBS
    specs = _specs("bench-noop", noop_target, NOOP_METHOD, etas)
    t0 = time.perf_counter()
    await _insert(store, specs)

    async def done() -> bool:
        return await _succeeded(store, "bench-noop") >= THROUGHPUT_JOBS

    await _poll(done, 300, "the no-op jobs", interval=0.05)
    return THROUGHPUT_JOBS / (time.perf_counter() - t0)


async def _raw_celery(redis_url: str) -> float:
    import redis
    from crm_scheduler.settings import SchedulerSettings
    from crm_scheduler.worker.celery_app import make_celery

    client = redis.Redis.from_url(redis_url)
    client.delete(RAW_COUNTER, RAW_QUEUE)
    env = {"CRM_BENCH_REDIS_URL": redis_url}
    argv = [sys.executable, "-m", "crm_tools.bench_scheduler", "raw-worker"]
    workers = [_spawn(f"raw-celery-{i}", argv, 0, env) for i in range(WORKERS)]
    app = make_celery(SchedulerSettings(redis_url=redis_url, queue_name=RAW_QUEUE))
    try:
        # warm up: every worker consumes before the clock starts
        await asyncio.to_thread(_send_raw, app, WORKERS * CONCURRENCY)

        async def warm() -> bool:
            return int(client.get(RAW_COUNTER) or 0) >= WORKERS * CONCURRENCY

        await _poll(warm, 60, "the raw Celery workers", interval=0.05)
        client.delete(RAW_COUNTER)
        t0 = time.perf_counter()
        await asyncio.to_thread(_send_raw, app, THROUGHPUT_JOBS)

        async def done() -> bool:
            return int(client.get(RAW_COUNTER) or 0) >= THROUGHPUT_JOBS

        await _poll(done, 300, "the raw Celery tasks", interval=0.05)
        return THROUGHPUT_JOBS / (time.perf_counter() - t0)
    finally:
        for w in workers:
            w.stop()
        client.delete(RAW_COUNTER, RAW_QUEUE)
        client.close()
        app.close()


def _send_raw(app: Any, n: int) -> None:
    """Publishes ``n`` no-op tasks, one message each, through kombu's pipelined batch
    publish (as our pump does): the baseline is measured by its workers, not held back
    by a sender publishing one message per round trip."""
    with app.producer_or_acquire() as producer, producer.batch(max_size=1000):
        for i in range(n):
            app.send_task(
                "bench.noop",
                kwargs={"message": {"i": i}},
                queue=RAW_QUEUE,
                producer=producer,
                argsrepr="()",
                kwargsrepr="{}",
            )


def _raw_worker() -> int:
    """A Celery worker with a no-op task (the baseline), configured like ours."""
    import redis
    from crm_scheduler.settings import SchedulerSettings
    from crm_scheduler.worker.celery_app import make_celery, start_worker

    url = os.environ["CRM_BENCH_REDIS_URL"]
    settings = SchedulerSettings(
        redis_url=url,
        queue_name=RAW_QUEUE,
        worker_concurrency=CONCURRENCY,
        log_level="WARNING",
    )
    app = make_celery(settings)
    counter = redis.Redis.from_url(url)

    def noop(message: dict[str, object]) -> None:
        counter.incr(RAW_COUNTER)

    app.task(name="bench.noop", acks_late=True, ignore_result=True)(noop)
    return start_worker(app, settings)


async def _memory(store: Any, workers: list[ServiceProc], recorder: _Recorder) -> dict[str, Any]:
    before = max(_rss_mb(w.popen.pid) for w in workers)
    start = datetime.now(UTC) + timedelta(hours=1)
    etas = [start + timedelta(milliseconds=i * 36) for i in range(PENDING_JOBS)]
    await _insert(store, _specs("bench-pending", f"127.0.0.1:{recorder.port}", RECORD_METHOD, etas))
    await asyncio.sleep(5)  # the pump ticks over them meanwhile
    after = max(_rss_mb(w.popen.pid) for w in workers)
    return {
        "measure": f"worker RSS with {PENDING_JOBS:,} pending future jobs",
        "before_mb": round(before, 1),
        "after_mb": round(after, 1),
        "unit": "MB",
        "value": round(after, 1),
        "target": "flat (+< 10 MB)",
        "ok": after - before < 10,
    }


async def run(seconds: float = 10.0) -> list[dict[str, Any]]:
    """Runs the three measures; returns one dict per result row."""
    from crm_scheduler.store import SchedulerStore, make_engine

    OUT.mkdir(exist_ok=True)
    stack = await asyncio.to_thread(up)
    redis_url = stack.redis_url
    await asyncio.to_thread(drop_database, DB_NAME)
    db_url = await asyncio.to_thread(create_database, DB_NAME)
    migrate_env = {"CRM_SCHEDULER_DATABASE_URL": db_url}
    await asyncio.to_thread(
        run_module, "crm_scheduler", ["migrate"], migrate_env, OUT / "scheduler-migrate.log"
    )
    engine = make_engine(db_url, 4)
    store = SchedulerStore(engine)
    recorder = _Recorder()
    procs: list[ServiceProc] = []
    noop_port = free_port()
    noop = start_service(
        "noop",
        "crm_tools.noop_server",
        noop_port,
        {"CRM_NOOP_PORT": str(noop_port)},
        OUT / "noop.log",
    )
    rows: list[dict[str, Any]] = []
    try:
        workers = [_start("worker", i, db_url, redis_url) for i in range(WORKERS)]
        pump = _start("pump", 0, db_url, redis_url)
        procs = [*workers, pump]
        for p in (noop, *procs):
            await wait_serving(p)
        rows.append(await _lateness(store, recorder, seconds))
        ours = await _throughput(store, noop.target)
        rows.append(await _memory(store, workers, recorder))
        for p in procs:
            p.stop()
        raw = await _raw_celery(redis_url)
        rows.append(
            {
                "measure": "no-op jobs/s vs raw Celery no-op tasks/s",
                "scheduler_per_s": round(ours, 1),
                "raw_celery_per_s": round(raw, 1),
                "unit": "ratio",
                "value": round(ours / raw, 3),
                "target": ">= 0.5",
                "ok": ours / raw >= 0.5,
            }
        )
    finally:
        for p in (*procs, noop):
            with contextlib.suppress(Exception):
                p.stop()
        recorder.stop()
        await asyncio.to_thread(engine.dispose)
        await asyncio.to_thread(drop_database, DB_NAME)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("command", nargs="?", default="bench", choices=["bench", "raw-worker"])
    ap.add_argument("--seconds", type=float, default=10.0, help="spread of the lateness jobs")
    args = ap.parse_args()
    if args.command == "raw-worker":
        return _raw_worker()
    rows = asyncio.run(run(args.seconds))
    print(json.dumps(rows, indent=2))
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
