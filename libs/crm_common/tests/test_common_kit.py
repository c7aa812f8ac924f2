"""JSON logs, metrics, settings and the blocking executor (no gRPC server)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import urllib.request
from collections.abc import Iterator
from datetime import datetime

import grpc
import pytest
from crm_common.aio import BlockingExecutor
from crm_common.logs import configure_logging, method_var, request_id_var
from crm_common.metrics import RpcMetrics, split_method
from crm_common.settings import ServiceSettings, parse_endpoints
from pydantic import ValidationError
from pydantic_settings import SettingsConfigDict

# -- logs ----------------------------------------------------------------------------------


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """Root logging sent as JSON into a buffer; the previous setup restored afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    configure_logging("kit-test", "DEBUG", stream=stream)
    yield stream
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_log_line_is_one_json_object_with_context(log_stream: io.StringIO) -> None:
    log = logging.getLogger("crm.test")
    log.info("outside a call")
    rid_token, method_token = request_id_var.set("rid-1"), method_var.set("/a.B/C")
    try:
        log.warning("inside %s", "a call", extra={"task_id": 42})
    finally:
        request_id_var.reset(rid_token)
        method_var.reset(method_token)
    outside, inside = lines(log_stream)
    assert outside["msg"] == "outside a call"
    assert "request_id" not in outside
    assert "method" not in outside
    assert inside["msg"] == "inside a call"
    assert inside["level"] == "WARNING"
    assert inside["logger"] == "crm.test"
    assert inside["service"] == "kit-test"
    assert inside["request_id"] == "rid-1"
    assert inside["method"] == "/a.B/C"
    assert inside["task_id"] == 42
    ts = str(inside["ts"])
    assert ts.endswith("Z")
    assert len(ts.split(".")[1]) == 4  # milliseconds + "Z"
    assert datetime.fromisoformat(ts.replace("Z", "+00:00")).utcoffset() is not None


def test_log_line_carries_the_exception(log_stream: io.StringIO) -> None:
    try:
        raise KeyError("nope")
    except KeyError:
        logging.getLogger("crm.test").exception("failed")
    (line,) = lines(log_stream)
    assert "Traceback" in str(line["exc"])
    assert "KeyError" in str(line["exc"])


def test_configure_logging_is_idempotent(log_stream: io.StringIO) -> None:
    root = logging.getLogger()
    before = len(root.handlers)
    second = io.StringIO()
    configure_logging("kit-test", "INFO", stream=second)
    assert len(root.handlers) == before
    logging.getLogger("crm.test").info("once")
    assert log_stream.getvalue() == ""
    assert len(second.getvalue().splitlines()) == 1


# -- metrics -------------------------------------------------------------------------------


def test_split_method() -> None:
    assert split_method("/crm.assignment.v1.AssignmentService/GetTask") == (
        "crm.assignment.v1.AssignmentService",
        "GetTask",
    )


def test_metrics_of_two_servers_do_not_clash() -> None:
    one, two = RpcMetrics("one"), RpcMetrics("two")
    one.call_started("/p.S/M")
    one.call_finished("/p.S/M", grpc.StatusCode.NOT_FOUND, 0.002)
    text = one.render().decode()
    assert (
        'crm_grpc_server_handled_total{grpc_code="NOT_FOUND",grpc_method="M",'
        'grpc_service="p.S",service="one"} 1.0' in text
    )
    assert 'crm_grpc_server_in_flight{grpc_method="M",grpc_service="p.S",service="one"} 0.0' in text
    assert 'service="one"' not in two.render().decode()


def test_metrics_http_server_on_a_free_port() -> None:
    metrics = RpcMetrics("http")
    metrics.call_started("/p.S/M")
    port = metrics.start_http_server(0, "127.0.0.1")
    try:
        assert port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            body = response.read().decode()
        assert "crm_grpc_server_in_flight" in body
    finally:
        metrics.stop_http_server()
    metrics.stop_http_server()  # idempotent


# -- settings ------------------------------------------------------------------------------


class EchoSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CRM_ECHO_")
    port: int = 50099


def test_settings_read_the_service_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRM_ECHO_PORT", "0")
    monkeypatch.setenv("CRM_ECHO_METRICS_PORT", "-1")
    monkeypatch.setenv("CRM_ECHO_LOG_LEVEL", "debug")
    monkeypatch.setenv("CRM_ECHO_ETCD_ENDPOINTS", "etcd-0:2379, [::1]:2380")
    monkeypatch.setenv("CRM_PORT", "1")  # another prefix: ignored
    settings = EchoSettings()
    assert settings.port == 0
    assert not settings.metrics_enabled
    assert settings.log_level == "DEBUG"
    assert settings.etcd_endpoint_list == [("etcd-0", 2379), ("::1", 2380)]
    assert settings.shutdown_grace_s == 10.0
    assert settings.instance_name


def test_settings_defaults() -> None:
    settings = EchoSettings()
    assert (settings.port, settings.config_prefix) == (50099, "/crm/config")
    assert settings.etcd_endpoint_list == [("127.0.0.1", 2379)]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CRM_ECHO_ETCD_ENDPOINTS", "etcd-0"),
        ("CRM_ECHO_ETCD_ENDPOINTS", ""),
        ("CRM_ECHO_PORT", "70000"),
        ("CRM_ECHO_METRICS_PORT", "-2"),
        ("CRM_ECHO_LOG_LEVEL", "chatty"),
    ],
)
def test_settings_reject_bad_values(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        EchoSettings()


def test_parse_endpoints_rejects_a_bad_port() -> None:
    with pytest.raises(ValueError, match="host:port"):
        parse_endpoints("a:2379,b:x")


# -- blocking executor ---------------------------------------------------------------------


async def test_blocking_executor_runs_in_a_thread_with_the_callers_context() -> None:
    executor = BlockingExecutor(max_workers=2)
    token = request_id_var.set("rid-thread")
    try:

        def work(x: int, *, y: int) -> tuple[str | None, str, int]:
            return request_id_var.get(), threading.current_thread().name, x + y

        rid, thread_name, total = await executor.run(work, 1, y=2)
    finally:
        request_id_var.reset(token)
    assert (rid, total) == ("rid-thread", 3)
    assert thread_name != threading.current_thread().name
    await executor.aclose()
    with pytest.raises(RuntimeError):
        await executor.run(work, 1, y=2)


async def test_blocking_executor_is_bounded() -> None:
    executor = BlockingExecutor(max_workers=2)
    release = threading.Event()
    lock = threading.Lock()
    running = 0
    peak = 0

    def work() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        release.wait(timeout=10)
        with lock:
            running -= 1

    calls = [asyncio.create_task(executor.run(work)) for _ in range(5)]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    for _ in range(10_000):  # poll until both workers are busy
        if running >= 2 or loop.time() > deadline:
            break
        await asyncio.sleep(0.005)
    assert running == 2
    release.set()
    await asyncio.gather(*calls)
    assert peak == 2
    executor.shutdown()


def test_blocking_executor_needs_a_worker() -> None:
    with pytest.raises(ValueError, match="max_workers"):
        BlockingExecutor(0)
