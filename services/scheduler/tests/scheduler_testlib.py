"""Test helpers: a throwaway redis-server, a recording gRPC target, scheduler processes
(pump, workers) started as in production, the API in-process, polling."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
import redis
from crm.scheduler.v1 import scheduler_pb2 as pb
from crm.scheduler.v1 import scheduler_pb2_grpc
from crm_devstack.apps import AppThread
from crm_devstack.stack import (
    create_database,
    drop_database,
    free_port,
    pid_alive,
    port_open,
    wait_until,
)
from crm_scheduler.app import App, build_app
from crm_scheduler.client import target_call
from crm_scheduler.domain.model import JobSpec, Target, default_idempotency_key
from crm_scheduler.settings import SchedulerSettings
from crm_scheduler.store import SchedulerStore
from crm_scheduler.store.migrate import upgrade
from crm_scheduler.store.schema import JobRow
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import func, select

T = TypeVar("T")

TARGET_SERVICE = "crm.schedtest.v1.Target"
TARGET_METHOD = f"/{TARGET_SERVICE}/Apply"


# --------------------------------------------------------------------------- Redis


class RedisServer:
    """A redis-server of our own (no persistence) on a free port, restartable."""

    def __init__(self, work_dir: Path) -> None:
        self.port = free_port()
        self.dir = work_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.popen: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        log = (self.dir / "redis.log").open("ab")
        self.popen = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        wait_until(lambda: port_open(self.port), f"redis on {self.port}", timeout=10)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def flushall(self) -> None:
        c = self.client()
        try:
            c.flushall()
        finally:
            c.close()

    def stop(self) -> None:
        if self.popen is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)
        self.popen = None
        wait_until(lambda: not port_open(self.port), "redis port closed", timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()


# --------------------------------------------------------------------------- target


@dataclass
class TargetServer:
    """A gRPC target recording its calls, applying each key's effect once.

    ``script[key]``: status code names answered by successive calls (then OK).
    ``hang_first``: keys whose first call hangs until the caller goes away (or 60 s).
    """

    port: int = 0
    calls: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    effects: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    script: dict[str, list[str]] = field(default_factory=dict)
    hang_first: set[str] = field(default_factory=set)
    deadlines: dict[str, float] = field(default_factory=dict)
    requests: dict[str, bytes] = field(default_factory=dict)
    received_at: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, dict[str, str]] = field(default_factory=dict)
    """The last call's metadata (text values) per key."""
    hanging: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: Any = None

    def start(self) -> TargetServer:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
        handler = grpc.method_handlers_generic_handler(
            TARGET_SERVICE,
            {
                "Apply": grpc.unary_unary_rpc_method_handler(
                    self._apply, request_deserializer=None, response_serializer=None
                )
            },
        )
        server.add_generic_rpc_handlers((handler,))
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self.server = server
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(0)

    def _apply(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        call = target_call(context)
        if call is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no x-idempotency-key")
        assert call is not None
        key = call.idempotency_key
        with self.lock:
            first = not self.calls[key]
            self.calls[key].append(call.attempt)
            self.received_at.setdefault(key, time.time())
            self.deadlines[key] = context.time_remaining() or 0.0
            self.requests[key] = request
            self.metadata[key] = {
                k: v for k, v in context.invocation_metadata() if isinstance(v, str)
            }
            planned = self.script.get(key, [])
            code = planned.pop(0) if planned else "OK"
        if first and key in self.hang_first:
            self.hanging.set()
            deadline = time.monotonic() + 60
            while context.is_active() and time.monotonic() < deadline:
                time.sleep(0.02)
            context.abort(grpc.StatusCode.UNAVAILABLE, "hung up")
        if code != "OK":
            context.abort(getattr(grpc.StatusCode, code), f"scripted {code}")
        with self.lock:  # the idempotent handler: apply a key's effect once
            if self.effects.get(key, 0) == 0:
                self.effects[key] += 1
        return b""

    def applied(self) -> int:
        with self.lock:
            return sum(1 for v in self.effects.values() if v)


# --------------------------------------------------------------------------- specs


def spec(
    name: str,
    target: TargetServer | str,
    eta: datetime,
    *,
    key: str = "",
    max_retries: int = 3,
    backoff_ms: tuple[int, int] = (50, 200),
    deadline_ms: int = 5000,
    request: bytes = b"",
) -> JobSpec:
    address = target if isinstance(target, str) else target.address
    return JobSpec(
        name=name,
        target=Target(TARGET_METHOD, address, request),
        eta=eta,
        idempotency_key=key or default_idempotency_key(name, eta),
        max_retries=max_retries,
        backoff_initial_ms=backoff_ms[0],
        backoff_max_ms=backoff_ms[1],
        attempt_deadline_ms=deadline_ms,
        when=f"eta:{eta.isoformat()}",
    )


def now() -> datetime:
    return datetime.now(UTC)


def later(seconds: float) -> datetime:
    return now() + timedelta(seconds=seconds)


def succeeded(store: SchedulerStore, keys: list[str]) -> int:
    """How many of the jobs with these keys are SUCCEEDED."""
    with store.engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count())
                .select_from(JobRow)
                .where(JobRow.state == "SUCCEEDED", JobRow.idempotency_key.in_(keys))
            ).scalar_one()
        )


def succeeded_named(store: SchedulerStore, name: str) -> int:
    """How many jobs with this name are SUCCEEDED (cheap for big batches)."""
    with store.engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count())
                .select_from(JobRow)
                .where(JobRow.name == name, JobRow.state == "SUCCEEDED")
            ).scalar_one()
        )


# --------------------------------------------------------------------------- processes


@dataclass
class SchedProc:
    """``python -m crm_scheduler <command>`` in a session of its own."""

    command: str
    popen: subprocess.Popen[bytes]
    health_port: int
    metrics_port: int
    log_path: Path

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None and pid_alive(self.popen.pid)

    def kill9(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()

    def serving(self) -> bool:
        if self.popen.poll() is not None:
            raise AssertionError(
                f"{self.command} exited with {self.popen.returncode}; log:\n{self.log_tail()}"
            )
        with grpc.insecure_channel(f"127.0.0.1:{self.health_port}") as ch:
            try:
                resp = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=1
                )
            except grpc.RpcError:
                return False
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            return str(r.read().decode())

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return ""


class Procs:
    """Starts pumps and workers for one test; ``close`` kills what is left."""

    def __init__(self, db_url: str, redis_url: str, log_dir: Path, **env: str) -> None:
        self.db_url = db_url
        self.redis_url = redis_url
        self.log_dir = log_dir
        self.extra_env = env
        self.started: list[SchedProc] = []

    def env(self, **extra: str) -> dict[str, str]:
        base = {
            "CRM_SCHEDULER_DATABASE_URL": self.db_url,
            "CRM_SCHEDULER_REDIS_URL": self.redis_url,
            "CRM_SCHEDULER_HOST": "127.0.0.1",
            "CRM_SCHEDULER_LOG_LEVEL": "INFO",
            "CRM_SCHEDULER_ENQUEUE_LEASE_S": "2",
            "CRM_SCHEDULER_RUN_LEASE_GRACE_S": "1",
            "CRM_SCHEDULER_PUMP_POLL_S": "0.05",
            "CRM_SCHEDULER_WORKER_CONCURRENCY": "4",
            "CRM_SCHEDULER_READINESS_INTERVAL_S": "0.2",
        }
        return {**os.environ, **base, **self.extra_env, **extra}

    def start(self, command: str, wait: bool = True, **extra: str) -> SchedProc:
        """Start ``pump`` or ``worker`` on free health/metrics ports; with ``wait``, until
        SERVING. A free port can be taken by some outgoing connection before the process
        binds it ("Address already in use", seen once in CI): then it starts again on
        other ports (twice at most)."""
        for attempt in range(3):
            proc = self._start(command, wait, **extra)
            if proc.popen.poll() is None:
                return proc
            if attempt < 2 and "Address already in use" in proc.log_tail():
                self.started.remove(proc)
                continue
            break
        if wait:
            proc.serving()  # it exited: fails with its log
        return proc

    def _start(self, command: str, wait: bool, **extra: str) -> SchedProc:
        health, metrics = free_port(), free_port()
        prefix = "CRM_SCHEDULER_PUMP" if command == "pump" else "CRM_SCHEDULER_WORKER"
        env = self.env(
            **{f"{prefix}_HEALTH_PORT": str(health), f"{prefix}_METRICS_PORT": str(metrics)},
            **extra,
        )
        log_path = self.log_dir / f"{command}-{len(self.started)}.log"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                [sys.executable, "-m", "crm_scheduler", command],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        proc = SchedProc(command, popen, health, metrics, log_path)
        self.started.append(proc)
        if wait:
            wait_until(
                lambda: proc.popen.poll() is not None or proc.serving(),
                f"{command} SERVING",
                timeout=30,
                interval=0.1,
            )
        return proc

    def close(self) -> None:
        for proc in self.started:
            proc.stop(timeout=10)


# --------------------------------------------------------------------------- API


class ApiService(AppThread[App]):
    """The API app served from a background thread with its own event loop, so tests
    use plain (blocking) gRPC stubs."""

    def __init__(self, settings: SchedulerSettings) -> None:
        super().__init__(lambda: build_app(settings), stop_grace=1)
        self.stub = scheduler_pb2_grpc.SchedulerServiceStub(self.channel)

    def schedule(self, **kw: Any) -> pb.ScheduleResponse:
        return self.stub.Schedule(pb.ScheduleRequest(**kw), timeout=10)


def api_settings(db_url: str, **kw: Any) -> SchedulerSettings:
    return SchedulerSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        database_url=db_url,
        db_pool_size=8,
        readiness_interval_s=0.2,
        allowed_target_services="crm.",
        **kw,
    )


# --------------------------------------------------------------------------- the whole scheduler


@dataclass
class RealScheduler:
    """The scheduler as other services' tests meet it: API in-process, one pump and one
    worker as processes, its own database and redis-server (see :func:`real_scheduler`)."""

    api: ApiService
    procs: Procs
    worker: SchedProc

    @property
    def target(self) -> str:
        """Where to send Schedule calls."""
        return self.api.app.target

    def job(self, key: str) -> pb.Job | None:
        try:
            return self.api.stub.Get(pb.GetRequest(idempotency_key=key), timeout=5).job
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    def succeeded(self, key: str) -> pb.Job | None:
        job = self.job(key)
        return job if job is not None and job.state == pb.JOB_STATE_SUCCEEDED else None


@contextlib.contextmanager
def real_scheduler(tmp_dir: Path, **worker_env: str) -> Iterator[RealScheduler]:
    """A whole scheduler for a test module (a scratch MariaDB database and redis-server
    under ``tmp_dir``; ``worker_env`` goes to the worker process only), torn down after."""
    name = f"crm_t_{uuid.uuid4().hex[:12]}"
    url = create_database(name)
    redis_server = RedisServer(tmp_dir / "redis")
    api: ApiService | None = None
    procs = Procs(url, redis_server.url, tmp_dir / "logs")
    try:
        upgrade(url)
        api = ApiService(api_settings(url))
        procs.start("pump", wait=False)
        worker = procs.start("worker", wait=False, **worker_env)
        for proc in procs.started:
            wait_until(proc.serving, f"{proc.command} SERVING", timeout=30, interval=0.1)
        yield RealScheduler(api, procs, worker)
    finally:
        procs.close()
        if api is not None:
            api.close()
        redis_server.stop()
        drop_database(name)
