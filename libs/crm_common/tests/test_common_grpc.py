"""GrpcServer + interceptors against real in-process grpc.aio servers on port 0.

The service under test is a stand-in: ``crm.test.v1.Echo``, raw-bytes generic handlers
(no proto), whose request bytes choose what the handler does.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from crm_common.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    error_reason,
    field_violations,
)
from crm_common.interceptors import REQUEST_ID_KEY, insecure_channel
from crm_common.logs import configure_logging, method_var, request_id_var
from crm_common.metrics import RpcMetrics
from crm_common.server import LIVENESS_SERVICE, GrpcServer
from crm_common.settings import ServiceSettings
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

SERVICE = "crm.test.v1.Echo"
UNARY = f"/{SERVICE}/Echo"
COUNT = f"/{SERVICE}/Count"  # unary-stream
WAIT = f"/{SERVICE}/Wait"  # unary-stream that never ends by itself
TOTAL = f"/{SERVICE}/Total"  # stream-unary
CHAT = f"/{SERVICE}/Chat"  # stream-stream
PHONE = "+8613800138000"


# -- helpers -------------------------------------------------------------------------------


async def eventually(
    probe: Callable[[], Awaitable[bool]] | Callable[[], bool], timeout: float = 10.0
) -> None:
    """Polls ``probe`` until it is true; fails after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = probe()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)


@dataclass
class EchoState:
    """What the stand-in handlers share with the test."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    slow_started: asyncio.Event = field(default_factory=asyncio.Event)
    wait_closed: asyncio.Event = field(default_factory=asyncio.Event)
    slow_finished: bool = False
    target: str = ""


def echo_registrar(state: EchoState) -> Callable[[aio.Server], None]:
    async def echo(request: bytes, context: Any) -> bytes:
        command, _, arg = request.partition(b":")
        if command == b"rid":
            return (request_id_var.get() or "").encode()
        if command == b"method":
            return (method_var.get() or "").encode()
        if command == b"invalid":
            raise InvalidArgument(
                [
                    FieldViolation("agent.capacity", "must be 1..50"),
                    FieldViolation("intent_car_ids[3]", "must be > 0"),
                ]
            )
        if command == b"notfound":
            raise NotFound("task 7 not found", reason="TASK_NOT_FOUND")
        if command == b"boom":
            raise RuntimeError("connection to db-secret-host refused")
        if command == b"abort":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "nope")
        if command == b"slow":
            state.slow_started.set()
            await state.release.wait()
            state.slow_finished = True
            return b"done"
        if command == b"stray":  # awaits a task that someone else cancels under it
            inner = asyncio.ensure_future(asyncio.Event().wait())
            asyncio.get_running_loop().call_later(0.05, inner.cancel)
            await inner
        if command == b"hop":  # calls this server again, from inside a call
            async with insecure_channel(state.target) as channel:
                response: bytes = await channel.unary_unary(UNARY)(b"rid")
                return response
        return arg

    async def count(request: bytes, context: Any) -> AsyncIterator[bytes]:
        n, _, then = request.partition(b":")
        for i in range(int(n)):
            yield str(i).encode()
        if then == b"precondition":
            raise FailedPrecondition("task 9 is not offered to agent 3", reason="TASK_NOT_OFFERED")
        if then == b"boom":
            raise RuntimeError("stream broke")

    async def wait(request: bytes, context: Any) -> AsyncIterator[bytes]:
        try:
            yield b"started"
            await asyncio.Event().wait()
        finally:
            state.wait_closed.set()

    async def total(requests: AsyncIterator[bytes], context: Any) -> bytes:
        parts = [part async for part in requests]
        if b"bad" in parts:
            raise InvalidArgument.single(f"parts[{parts.index(b'bad')}]", "must not be bad")
        return b"+".join(parts)

    async def chat(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        index = 0
        async for message in requests:
            if message == b"bad":
                raise InvalidArgument.single(f"messages[{index}]", "must not be bad")
            yield message.upper()
            index += 1

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Count": grpc.unary_stream_rpc_method_handler(count),
            "Wait": grpc.unary_stream_rpc_method_handler(wait),
            "Total": grpc.stream_unary_rpc_method_handler(total),
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
        },
    )

    def register(server: aio.Server) -> None:
        server.add_generic_rpc_handlers((handler,))

    return register


class Dependency:
    """A stand-in dependency whose readiness the test flips."""

    def __init__(self, up: bool) -> None:
        self.up = up

    async def ping(self) -> None:
        if not self.up:
            raise ConnectionError("db down")


def make_settings(**overrides: Any) -> ServiceSettings:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": -1,
        "readiness_interval_s": 0.02,
        "readiness_timeout_s": 0.2,
        "shutdown_grace_s": 10.0,
    }
    values.update(overrides)
    return ServiceSettings(**values)


@dataclass
class Running:
    server: GrpcServer
    state: EchoState
    channel: aio.Channel
    metrics: RpcMetrics
    dependency: Dependency

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def unary(self) -> Any:
        return self.channel.unary_unary(UNARY)

    def metric_line(self, method: str, code: str) -> str:
        return (
            f'crm_grpc_server_handled_total{{grpc_code="{code}",grpc_method="{method}",'
            f'grpc_service="{SERVICE}",service="echo"}}'
        )

    def counted(self, method: str, code: str) -> float:
        prefix = self.metric_line(method, code) + " "
        for line in self.metrics.render().decode().splitlines():
            if line.startswith(prefix):
                return float(line.removeprefix(prefix))
        return 0.0


StartServer = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    """Starts stand-in servers (``dependency_up=``, settings overrides); stops them after."""
    started: list[Running] = []

    async def start(dependency_up: bool = True, **settings: Any) -> Running:
        dependency = Dependency(dependency_up)
        state = EchoState()
        metrics = RpcMetrics("echo")
        server = GrpcServer(
            [SERVICE],
            make_settings(**settings),
            echo_registrar(state),
            readiness_checks={"db": dependency.ping},
            metrics=metrics,
        )
        await server.start()
        state.target = f"127.0.0.1:{server.port}"
        running = Running(server, state, insecure_channel(state.target), metrics, dependency)
        started.append(running)
        return running

    try:
        yield start
    finally:
        for running in started:
            running.state.release.set()
            await running.channel.close(None)
            await running.server.stop(grace=0)


@pytest.fixture
async def running(start_server: StartServer) -> Running:
    return await start_server()


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    configure_logging("echo", "INFO", stream=stream)
    yield stream
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def log_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def collect(call: AsyncIterator[bytes], into: list[bytes]) -> None:
    """Appends a stream's messages to ``into`` until it ends (or fails)."""
    async for message in call:
        into.append(message)


def trailer(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY:
            return str(value)
    return None


async def health_status(channel: aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(response.status)


# -- request ids ---------------------------------------------------------------------------


async def test_given_request_id_reaches_the_handler_and_comes_back(running: Running) -> None:
    call = running.unary()(b"rid", metadata=((REQUEST_ID_KEY, "req-42"),))
    assert await call == b"req-42"
    assert trailer(await call.trailing_metadata()) == "req-42"


async def test_request_id_is_generated_when_missing_or_malformed(running: Running) -> None:
    for metadata in ((), ((REQUEST_ID_KEY, "x" * 200),), ((REQUEST_ID_KEY, "a b"),)):
        call = running.unary()(b"rid", metadata=metadata)
        request_id = (await call).decode()
        assert len(request_id) == 32
        int(request_id, 16)
        assert trailer(await call.trailing_metadata()) == request_id


async def test_handler_sees_its_method(running: Running) -> None:
    assert await running.unary()(b"method") == UNARY.encode()


async def test_request_id_follows_calls_to_other_services(running: Running) -> None:
    # The client interceptor sends the current request id: the outer call's id comes
    # back from the inner call the handler makes.
    call = running.unary()(b"hop", metadata=((REQUEST_ID_KEY, "hop-1"),))
    assert await call == b"hop-1"
    token = request_id_var.set("from-context")
    try:
        assert await running.unary()(b"rid") == b"from-context"
    finally:
        request_id_var.reset(token)


# -- errors --------------------------------------------------------------------------------


async def test_invalid_argument_carries_field_violations(running: Running) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await running.unary()(b"invalid", metadata=((REQUEST_ID_KEY, "rid-inv"),))
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(error) == [
        ("agent.capacity", "must be 1..50"),
        ("intent_car_ids[3]", "must be > 0"),
    ]
    assert trailer(error.trailing_metadata()) == "rid-inv"
    await eventually(lambda: running.counted("Echo", "INVALID_ARGUMENT") == 1)


async def test_crm_error_reason_reaches_the_client(running: Running) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await running.unary()(b"notfound")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "task 7 not found"
    assert error_reason(caught.value) == "TASK_NOT_FOUND"
    assert field_violations(caught.value) == []


async def test_unexpected_exception_is_internal_without_details(
    running: Running, log_stream: io.StringIO
) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await running.unary()(b"boom", metadata=((REQUEST_ID_KEY, "rid-boom"),))
    error = caught.value
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == "internal error (request id rid-boom)"
    assert "secret" not in (error.debug_error_string() or "")
    assert trailer(error.trailing_metadata()) == "rid-boom"
    await eventually(lambda: running.counted("Echo", "INTERNAL") == 1)
    errors = [line for line in log_lines(log_stream) if line["level"] == "ERROR"]
    assert len(errors) == 1
    assert errors[0]["request_id"] == "rid-boom"
    assert "RuntimeError" in errors[0]["exc"]


async def test_stray_cancellation_inside_a_handler_is_unavailable_not_silence(
    running: Running, log_stream: io.StringIO
) -> None:
    """A CancelledError the call was not cancelled for (a channel closed under an awaited
    call, say) must still answer: passed on, grpc sends no status and the caller waits out
    its whole deadline (the config-admin server did that with etcd down)."""
    with pytest.raises(aio.AioRpcError) as caught:
        await running.unary()(b"stray", metadata=((REQUEST_ID_KEY, "rid-stray"),), timeout=60)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "rid-stray" in (caught.value.details() or "")
    assert trailer(caught.value.trailing_metadata()) == "rid-stray"
    await eventually(lambda: running.counted("Echo", "UNAVAILABLE") >= 1)
    errors = [line for line in log_lines(log_stream) if line["level"] == "ERROR"]
    # UNAVAILABLE is retryable: the channel's retry policy may have tried again
    assert len(errors) == running.counted("Echo", "UNAVAILABLE")
    assert {e["request_id"] for e in errors} == {"rid-stray"}


async def test_context_abort_passes_through(running: Running) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await running.unary()(b"abort", metadata=((REQUEST_ID_KEY, "rid-abort"),))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.details() == "nope"
    # abort() without trailing metadata keeps the request id the interceptor set
    assert trailer(caught.value.trailing_metadata()) == "rid-abort"
    await eventually(lambda: running.counted("Echo", "PERMISSION_DENIED") == 1)


async def test_crm_error_in_a_server_stream_after_some_messages(running: Running) -> None:
    call = running.channel.unary_stream(COUNT)(b"2:precondition")
    received: list[bytes] = []
    with pytest.raises(aio.AioRpcError) as caught:
        await collect(call, received)
    assert received == [b"0", b"1"]
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(caught.value) == "TASK_NOT_OFFERED"
    await eventually(lambda: running.counted("Count", "FAILED_PRECONDITION") == 1)


async def test_unexpected_exception_in_a_server_stream(running: Running) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await collect(running.channel.unary_stream(COUNT)(b"1:boom"), [])
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "stream broke" not in (caught.value.details() or "")


async def test_client_and_bidi_streams_map_errors(running: Running) -> None:
    total = running.channel.stream_unary(TOTAL)
    assert await total(iter([b"a", b"b"])) == b"a+b"
    with pytest.raises(aio.AioRpcError) as caught:
        await total(iter([b"a", b"bad"]))
    assert field_violations(caught.value) == [("parts[1]", "must not be bad")]

    chat = running.channel.stream_stream(CHAT)(iter([b"hi", b"bad", b"never"]))
    replies: list[bytes] = []
    with pytest.raises(aio.AioRpcError) as caught:
        await collect(chat, replies)
    assert replies == [b"HI"]
    assert field_violations(caught.value) == [("messages[1]", "must not be bad")]
    await eventually(lambda: running.counted("Total", "OK") == 1)
    await eventually(lambda: running.counted("Chat", "INVALID_ARGUMENT") == 1)


async def test_client_cancel_is_recorded_and_closes_the_stream(running: Running) -> None:
    call = running.channel.unary_stream(WAIT)(b"")
    assert await call.read() == b"started"
    call.cancel()
    await asyncio.wait_for(running.state.wait_closed.wait(), 10)
    await eventually(lambda: running.counted("Wait", "CANCELLED") == 1)


async def test_deadline_is_recorded(running: Running) -> None:
    call = running.channel.unary_stream(WAIT)(b"", timeout=0.5)
    with pytest.raises(aio.AioRpcError) as caught:
        async for _ in call:
            pass
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await eventually(lambda: running.counted("Wait", "DEADLINE_EXCEEDED") == 1)


# -- metrics and logs ----------------------------------------------------------------------


async def test_metrics_count_calls_by_code(running: Running) -> None:
    for _ in range(3):
        await running.unary()(b"echo:x")
    with pytest.raises(aio.AioRpcError):
        await running.unary()(b"notfound")
    await eventually(lambda: running.counted("Echo", "NOT_FOUND") == 1)
    assert running.counted("Echo", "OK") == 3
    text = running.metrics.render().decode()
    assert (
        'crm_grpc_server_handling_seconds_count{grpc_method="Echo",'
        f'grpc_service="{SERVICE}",service="echo"}} 4.0' in text
    )
    assert (
        f'crm_grpc_server_in_flight{{grpc_method="Echo",grpc_service="{SERVICE}",'
        'service="echo"} 0.0' in text
    )


async def test_metrics_are_served_over_http(start_server: StartServer) -> None:
    running = await start_server(metrics_port=0)
    await running.unary()(b"echo:x")
    port = running.server.metrics_port
    assert port

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    await eventually(lambda: running.counted("Echo", "OK") == 1)
    assert running.metric_line("Echo", "OK") in await asyncio.to_thread(scrape)


async def test_one_json_line_per_call_without_payload(
    running: Running, log_stream: io.StringIO
) -> None:
    call = running.unary()(f"echo:{PHONE}".encode(), metadata=((REQUEST_ID_KEY, "rid-log"),))
    assert await call == PHONE.encode()
    await health_status(running.channel)  # logged at DEBUG: not in an INFO log

    def finished() -> list[dict[str, Any]]:
        return [line for line in log_lines(log_stream) if line["msg"].startswith("rpc finished")]

    await eventually(lambda: len(finished()) >= 1)
    (line,) = finished()
    assert line["request_id"] == "rid-log"
    assert line["method"] == UNARY
    assert line["code"] == "OK"
    assert line["service"] == "echo"
    assert line["duration_ms"] >= 0
    assert line["peer"].startswith("ipv4:127.0.0.1:")
    assert PHONE not in log_stream.getvalue()


# -- health and reflection -----------------------------------------------------------------


async def test_health_follows_the_readiness_checks(start_server: StartServer) -> None:
    running = await start_server(dependency_up=False)
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    assert await health_status(running.channel) == not_serving
    assert await health_status(running.channel, SERVICE) == not_serving
    assert not running.server.ready
    # liveness is independent of dependencies: a dependency outage must not restart pods
    assert await health_status(running.channel, LIVENESS_SERVICE) == serving

    running.dependency.up = True

    async def status_is(expected: int) -> bool:
        overall = await health_status(running.channel)
        return overall == expected and await health_status(running.channel, SERVICE) == expected

    await eventually(lambda: status_is(serving))
    assert running.server.ready
    running.dependency.up = False
    await eventually(lambda: status_is(not_serving))
    assert await running.server.check_readiness() == {"db": "ConnectionError: db down"}
    assert await health_status(running.channel, LIVENESS_SERVICE) == serving


async def test_hanging_readiness_check_times_out() -> None:
    async def hang() -> None:
        await asyncio.Event().wait()

    server = GrpcServer(
        [SERVICE], make_settings(readiness_timeout_s=0.05), readiness_checks={"etcd": hang}
    )
    await server.start()
    try:
        assert await server.check_readiness() == {"etcd": "timed out after 0.05 s"}
    finally:
        await server.stop(grace=0)


async def test_reflection_lists_the_services(running: Running) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(running.channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.health.v1.Health"),
    ]
    responses = [response async for response in stub.ServerReflectionInfo(iter(requests))]
    names = {service.name for service in responses[0].list_services_response.service}
    assert names == {
        SERVICE,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    assert responses[1].file_descriptor_response.file_descriptor_proto


# -- graceful stop -------------------------------------------------------------------------


async def test_graceful_stop_drains_in_flight_calls_and_refuses_new_ones(running: Running) -> None:
    hook_saw: list[bool] = []
    slow = asyncio.ensure_future(running.unary()(b"slow"))

    async def hook() -> None:  # runs after the drain
        hook_saw.append(running.state.slow_finished)

    running.server.on_stop.append(hook)
    await asyncio.wait_for(running.state.slow_started.wait(), 10)
    stopping = asyncio.create_task(running.server.stop(grace=30))

    async def refused() -> bool:
        # Until the client sees the GOAWAY, a call may still be answered or, if it lands
        # in the instant the server stops taking calls, be CANCELLED by grpc core, or be
        # left unanswered until its deadline (seen once in CI: the stream was opened on
        # the old connection as the server stopped taking calls). None of these is served
        # by the stopping server; the next call on a fresh stream must be UNAVAILABLE.
        try:
            await running.unary()(b"echo:late", timeout=1)
        except aio.AioRpcError as error:
            code = error.code()
        else:
            return False
        assert code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.CANCELLED,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )
        return code == grpc.StatusCode.UNAVAILABLE

    await eventually(refused, timeout=20)
    assert not slow.done()
    assert not stopping.done()
    running.state.release.set()
    assert await slow == b"done"
    await asyncio.wait_for(stopping, 10)
    assert hook_saw == [True]
    await running.server.stop()  # idempotent


async def test_run_until_signal_stops_gracefully_on_sigterm() -> None:
    closed = asyncio.Event()
    server = GrpcServer([SERVICE], make_settings(), echo_registrar(EchoState()))

    async def close() -> None:
        closed.set()

    server.on_stop.append(close)
    serving = asyncio.create_task(server.run_until_signal())
    await eventually(lambda: server.ready)
    async with insecure_channel(f"127.0.0.1:{server.port}") as channel:
        assert await channel.unary_unary(UNARY)(b"echo:up") == b"up"
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(serving, 10)
    assert closed.is_set()
    async with insecure_channel(f"127.0.0.1:{server.port}") as channel:
        with pytest.raises(aio.AioRpcError) as caught:
            await channel.unary_unary(UNARY)(b"echo:late", timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
