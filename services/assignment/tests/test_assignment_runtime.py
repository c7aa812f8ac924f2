"""``python -m crm_assignment migrate`` and ``serve`` as real processes: health, SIGTERM."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from typing import Any

import grpc
from crm.assignment.v1 import assignment_pb2 as pb
from crm.assignment.v1 import assignment_pb2_grpc
from crm_devstack import wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import create_engine, inspect


def _env(database_url: str, etcd: str, prefix: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "CRM_ASSIGNMENT_DATABASE_URL": database_url,
            "CRM_ASSIGNMENT_ETCD_ENDPOINTS": etcd,
            "CRM_ASSIGNMENT_CONFIG_PREFIX": prefix,
            "CRM_ASSIGNMENT_HOST": "127.0.0.1",
            "CRM_ASSIGNMENT_PORT": "0",
            "CRM_ASSIGNMENT_METRICS_PORT": "0",
            "CRM_ASSIGNMENT_READINESS_INTERVAL_S": "0.2",
            "CRM_ASSIGNMENT_SHUTDOWN_GRACE_S": "3",
            "CRM_ASSIGNMENT_LOG_LEVEL": "INFO",
        }
    )
    return env


def test_migrate_then_serve_then_sigterm(
    mysql_database: str, etcd_endpoint: str, config_prefix: str
) -> None:
    env = _env(mysql_database, etcd_endpoint, config_prefix)
    done = subprocess.run(
        [sys.executable, "-m", "crm_assignment", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    engine = create_engine(mysql_database)
    try:
        assert {"customer", "clue", "task", "task_event", "agent"} <= set(
            inspect(engine).get_table_names()
        )
    finally:
        engine.dispose()

    proc = subprocess.Popen(
        [sys.executable, "-m", "crm_assignment", "serve"],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue[dict[str, Any]] = queue.Queue()
    seen: list[dict[str, Any]] = []

    def read() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            try:
                lines.put(json.loads(raw))
            except ValueError:
                lines.put({"msg": raw, "level": "RAW"})

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def next_line(timeout: float = 20) -> dict[str, Any]:
        line = lines.get(timeout=timeout)
        seen.append(line)
        return line

    try:
        port = None
        while port is None:
            line = next_line()
            port = line.get("port")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def serving() -> bool:
                request = health_pb2.HealthCheckRequest(
                    service="crm.assignment.v1.AssignmentService"
                )
                status = health.Check(request, timeout=2).status
                return status == health_pb2.HealthCheckResponse.SERVING

            wait_until(serving, "health SERVING", timeout=30)
            stub = assignment_pb2_grpc.AssignmentServiceStub(channel)
            r = stub.CreateClue(
                pb.CreateClueRequest(
                    idempotency_key="rt-1",
                    phone="13700001111",
                    business_line=1,
                    source="app",
                    city="beijing",
                )
            )
            assert r.task.id > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    while not lines.empty():
        seen.append(lines.get())
    messages = [line.get("msg", "") for line in seen]
    assert any("development defaults" in m for m in messages)
    assert any(m == "stopped" for m in messages)
    assert all(line.get("service") == "assignment" for line in seen if line.get("level") != "RAW")
    assert "13700001111" not in json.dumps(seen)
