"""``python -m crm_ctl serve-config-admin`` as a real process: settings from the
environment, SERVING once etcd answers, author from metadata, graceful stop on SIGTERM;
with etcd down: NOT_SERVING and UNAVAILABLE answers, never INTERNAL.

(Real processes also keep these tests apart from the other modules' event loops: grpc.aio
objects from several loops in one process are not something a server ever meets.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from crm.config.v1 import config_pb2 as pb
from crm.config.v1 import config_pb2_grpc
from crm_devstack.stack import free_port, refusing_port, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc


@contextmanager
def serve(
    etcd: str, prefix: str, log: Path
) -> Iterator[tuple[subprocess.Popen[bytes], grpc.Channel]]:
    """The config-admin server as a process; its stderr (JSON logs) goes to ``log``, a file,
    not a pipe: nobody reads a pipe while it runs, and a full one (64 KiB of etcd
    reconnect warnings) blocked the server's logging and with it every call."""
    port = free_port()
    env = {
        **os.environ,
        "CRM_CONFIG_ADMIN_HOST": "127.0.0.1",
        "CRM_CONFIG_ADMIN_PORT": str(port),
        "CRM_CONFIG_ADMIN_METRICS_PORT": "-1",
        "CRM_CONFIG_ADMIN_ETCD_ENDPOINTS": etcd,
        "CRM_CONFIG_ADMIN_CONFIG_PREFIX": prefix,
        "CRM_CONFIG_ADMIN_READINESS_INTERVAL_S": "0.2",
    }
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "crm_ctl", "serve-config-admin"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield proc, ch
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def health_status(ch: grpc.Channel) -> int | None:
    try:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
    except grpc.RpcError:
        return None
    return int(r.status)


def test_serve_config_admin_process(etcd_endpoint: str, config_prefix: str, tmp_path: Path) -> None:
    log = tmp_path / "config-admin.log"
    with serve(etcd_endpoint, config_prefix, log) as (proc, ch):
        wait_until(
            lambda: health_status(ch) == health_pb2.HealthCheckResponse.SERVING,
            "the config-admin server to be SERVING",
            timeout=30,
        )
        stub = config_pb2_grpc.ConfigAdminServiceStub(ch)
        resp = stub.Set(
            pb.SetRequest(service="recommendation", key="ranking", value_json="{}"),
            metadata=(("x-crm-author", "web:alice"),),
            timeout=10,
        )
        assert resp.version.author == "web:alice"
        listed = stub.List(pb.ListRequest(), timeout=10)
        assert [s.service for s in listed.services] == ["assignment", "recommendation"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        logs = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]
        assert any(rec.get("msg") == "stop signal received" for rec in logs)


def test_etcd_down_is_unavailable_not_internal(config_prefix: str, tmp_path: Path) -> None:
    with (
        refusing_port() as dead,
        serve(f"127.0.0.1:{dead}", config_prefix, tmp_path / "config-admin.log") as (proc, ch),
    ):
        wait_until(
            lambda: health_status(ch) == health_pb2.HealthCheckResponse.NOT_SERVING,
            "the config-admin server to answer NOT_SERVING",
            timeout=30,
        )
        stub = config_pb2_grpc.ConfigAdminServiceStub(ch)
        calls = [
            lambda: stub.Get(pb.GetRequest(service="assignment", key="SALE"), timeout=90),
            lambda: stub.Set(pb.SetRequest(service="assignment", key="SALE", value_json="{}"),
                             timeout=90),
            lambda: stub.List(pb.ListRequest(), timeout=90),
        ]  # fmt: skip

        def code(call: Callable[[], object]) -> grpc.StatusCode:
            with pytest.raises(grpc.RpcError) as info:
                call()
            return info.value.code()  # type: ignore[no-any-return]

        assert [code(c) for c in calls] == [grpc.StatusCode.UNAVAILABLE] * 3
        # Concurrent calls share the server's etcd client while each failure closes it:
        # none may be left unanswered (DEADLINE_EXCEEDED) by a call cut under another.
        with ThreadPoolExecutor(8) as pool:
            codes = Counter(pool.map(lambda i: code(calls[i % 3]), range(48)))
        assert codes == {grpc.StatusCode.UNAVAILABLE: 48}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
