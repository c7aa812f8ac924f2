"""OpenTelemetry tracing through the interceptors: two real in-process gRPC servers
(GrpcServer on port 0) in a call chain, spans collected by the SDK's own
InMemorySpanExporter. The services are stand-ins: raw-bytes generic handlers."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from crm_common import tracing
from crm_common.errors import InvalidArgument
from crm_common.interceptors import REQUEST_ID_KEY, insecure_channel
from crm_common.logs import JsonFormatter, request_id_var
from crm_common.server import GrpcServer
from crm_common.settings import ServiceSettings
from grpc import aio
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)

FRONT, BACK = "crm.test.v1.Front", "crm.test.v1.Back"
RELAY, WORK, LIST = f"/{FRONT}/Relay", f"/{BACK}/Work", f"/{BACK}/List"


@dataclass
class Chain:
    """Front relays every call to Back; Back records the metadata keys it received."""

    back_saw: list[set[str]] = field(default_factory=list)
    front_port: int | None = None

    @property
    def front_target(self) -> str:
        return f"127.0.0.1:{self.front_port}"


def settings(**overrides: Any) -> ServiceSettings:
    values: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "metrics_port": -1}
    values.update(overrides)
    return ServiceSettings(**values)


def back_registrar(chain: Chain) -> Callable[[aio.Server], None]:
    async def work(request: bytes, context: Any) -> bytes:
        chain.back_saw.append({key for key, _ in context.invocation_metadata()})
        if request == b"invalid":
            raise InvalidArgument.single("payload", "must not be invalid")
        if request == b"boom":
            raise RuntimeError("broken")
        return request.upper()

    async def list_(request: bytes, context: Any) -> AsyncIterator[bytes]:
        for i in range(int(request)):
            yield str(i).encode()

    handler = grpc.method_handlers_generic_handler(
        BACK,
        {
            "Work": grpc.unary_unary_rpc_method_handler(work),
            "List": grpc.unary_stream_rpc_method_handler(list_),
        },
    )
    return lambda server: server.add_generic_rpc_handlers((handler,))


def front_registrar(back_target: Callable[[], str]) -> Callable[[aio.Server], None]:
    async def relay(request: bytes, context: Any) -> bytes:
        async with insecure_channel(back_target()) as channel:
            if request.startswith(b"list:"):
                items = [i async for i in channel.unary_stream(LIST)(request[5:])]
                return b",".join(items)
            try:
                response: bytes = await channel.unary_unary(WORK)(request)
            except aio.AioRpcError as exc:  # the dependency's answer, passed on
                await context.abort(exc.code(), exc.details() or "")
            return response

    handler = grpc.method_handlers_generic_handler(
        FRONT, {"Relay": grpc.unary_unary_rpc_method_handler(relay)}
    )
    return lambda server: server.add_generic_rpc_handlers((handler,))


@pytest.fixture
async def chain() -> AsyncIterator[Chain]:
    chain = Chain()
    back = GrpcServer([BACK], settings(), back_registrar(chain))
    await back.start()
    front = GrpcServer([FRONT], settings(), front_registrar(lambda: f"127.0.0.1:{back.port}"))
    await front.start()
    chain.front_port = front.port
    try:
        yield chain
    finally:
        await front.stop(grace=0)
        await back.stop(grace=0)


async def finished(exporter: InMemorySpanExporter, n: int) -> list[ReadableSpan]:
    """The finished spans once there are ``n`` (client spans end when the status is in)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while len(exporter.get_finished_spans()) < n:
        assert loop.time() < deadline, f"{len(exporter.get_finished_spans())} spans, not {n}"
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # nothing more comes
    got = list(exporter.get_finished_spans())
    assert len(got) == n, [s.name for s in got]
    return got


def by(spans: list[ReadableSpan], name: str, kind: SpanKind) -> ReadableSpan:
    [span] = [s for s in spans if s.name == name and s.kind == kind]
    return span


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_one_trace_across_two_services(chain: Chain, spans: InMemorySpanExporter) -> None:
    async with insecure_channel(chain.front_target) as channel:
        call = channel.unary_unary(RELAY)(b"hello", metadata=((REQUEST_ID_KEY, "chain-1"),))
        assert await call == b"HELLO"
    got = await finished(spans, 4)
    outer_client = by(got, f"{FRONT}/Relay", SpanKind.CLIENT)
    front = by(got, f"{FRONT}/Relay", SpanKind.SERVER)
    inner_client = by(got, f"{BACK}/Work", SpanKind.CLIENT)
    back = by(got, f"{BACK}/Work", SpanKind.SERVER)
    assert outer_client.context is not None
    trace_id = outer_client.context.trace_id
    assert {s.context.trace_id for s in got if s.context is not None} == {trace_id}
    assert outer_client.parent is None
    assert parent_of(front) == outer_client.context.span_id
    assert front.context is not None
    assert parent_of(inner_client) == front.context.span_id
    assert inner_client.context is not None
    assert parent_of(back) == inner_client.context.span_id
    for span in got:
        assert span.attributes is not None
        assert span.attributes[tracing.REQUEST_ID_ATTRIBUTE] == "chain-1"
        assert span.attributes["rpc.system"] == "grpc"
        assert span.attributes["rpc.grpc.status_code"] == 0
        assert span.status.status_code is StatusCode.UNSET
    assert back.attributes is not None
    assert (back.attributes["rpc.service"], back.attributes["rpc.method"]) == (BACK, "Work")
    assert "traceparent" in chain.back_saw[-1]


async def test_statuses_follow_the_conventions(chain: Chain, spans: InMemorySpanExporter) -> None:
    async with insecure_channel(chain.front_target) as channel:
        with pytest.raises(aio.AioRpcError) as caught:
            await channel.unary_unary(RELAY)(b"invalid")
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        got = await finished(spans, 4)
        # a client error: ERROR for the callers, not a fault of the servers
        for span in got:
            assert span.attributes is not None
            assert span.attributes["rpc.grpc.status_code"] == 3
            expected = StatusCode.ERROR if span.kind == SpanKind.CLIENT else StatusCode.UNSET
            assert span.status.status_code is expected, span.name
        spans.clear()
        with pytest.raises(aio.AioRpcError) as caught:
            await channel.unary_unary(RELAY)(b"boom")
        assert caught.value.code() is grpc.StatusCode.INTERNAL
        got = await finished(spans, 4)
        back = by(got, f"{BACK}/Work", SpanKind.SERVER)
        assert back.status.status_code is StatusCode.ERROR
        assert back.attributes is not None
        assert back.attributes["rpc.grpc.status_code"] == 13
        front = by(got, f"{FRONT}/Relay", SpanKind.SERVER)
        assert front.status.status_code is StatusCode.ERROR


async def test_a_streaming_call_is_one_span_per_side(
    chain: Chain, spans: InMemorySpanExporter
) -> None:
    async with insecure_channel(chain.front_target) as channel:
        assert await channel.unary_unary(RELAY)(b"list:3") == b"0,1,2"
    got = await finished(spans, 4)
    stream_client = by(got, f"{BACK}/List", SpanKind.CLIENT)
    stream_server = by(got, f"{BACK}/List", SpanKind.SERVER)
    assert stream_client.context is not None
    assert parent_of(stream_server) == stream_client.context.span_id


async def test_tracing_off_makes_no_spans_and_sends_no_context(chain: Chain) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()  # configured but not installed: tracing stays off
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    assert not tracing.enabled()
    async with insecure_channel(chain.front_target) as channel:
        assert await channel.unary_unary(RELAY)(b"quiet") == b"QUIET"
    await asyncio.sleep(0.05)
    assert exporter.get_finished_spans() == ()
    assert "traceparent" not in chain.back_saw[-1]
    assert REQUEST_ID_KEY in chain.back_saw[-1]  # the request id still travels
    provider.shutdown()


async def test_console_exporter_from_settings(capfd: pytest.CaptureFixture[str]) -> None:
    chain = Chain()
    server = GrpcServer([BACK], settings(tracing_exporter="console"), back_registrar(chain))
    await server.start()
    try:
        assert tracing.enabled()
        async with insecure_channel(f"127.0.0.1:{server.port}") as channel:
            assert await channel.unary_unary(WORK)(b"x") == b"X"
    finally:
        await server.stop(grace=0)  # flushes the batch processor, turns tracing off
    assert not tracing.enabled()
    out, decoder, exported = capfd.readouterr().out, json.JSONDecoder(), []
    index = out.find("{")
    while index >= 0:  # the console exporter writes indented JSON objects one after another
        span, end = decoder.raw_decode(out, index)
        exported.append(span)
        index = out.find("{", end)
    [work] = [s for s in exported if s["name"] == f"{BACK}/Work" and s["kind"] == "SpanKind.SERVER"]
    assert work["resource"]["attributes"]["service.name"] == f"crm-{BACK}"
    assert work["attributes"]["rpc.grpc.status_code"] == 0


def test_tracing_settings_are_validated() -> None:
    assert settings().tracing_exporter == "none"
    with pytest.raises(ValueError, match="tracing_exporter"):
        settings(tracing_exporter="jaeger")
    with pytest.raises(ValueError, match="tracing_sample_ratio"):
        settings(tracing_sample_ratio=1.5)


def test_otlp_exporter_is_built_from_settings() -> None:
    # No OpenTelemetry Collector runs here: this checks the OTLP path installs (imports,
    # endpoint, resource, sampler), not what a collector would receive.
    assert tracing.configure_tracing(
        "probe",
        settings(
            tracing_exporter="otlp",
            tracing_otlp_endpoint="http://127.0.0.1:4317",
            tracing_sample_ratio=0.0,
            instance_name="probe-1",
        ),
    )
    try:
        assert tracing.enabled()
        provider = tracing._state.provider
        assert provider is not None
        assert provider.resource.attributes["service.name"] == "crm-probe"
        assert provider.resource.attributes["service.instance.id"] == "probe-1"
        # ratio 0: a new trace is not sampled, a sampled caller's is followed
        tracer = provider.get_tracer("probe")
        assert not tracer.start_span("root").get_span_context().trace_flags.sampled
        caller = SpanContext(1, 2, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
        child = tracer.start_span("child", context=set_span_in_context(NonRecordingSpan(caller)))
        assert child.get_span_context().trace_flags.sampled
        # a second configuration does not replace the installed provider
        assert not tracing.configure_tracing("other", settings(tracing_exporter="console"))
    finally:
        tracing.shutdown_tracing()
    assert not tracing.enabled()


async def test_log_lines_carry_the_trace_and_span(
    chain: Chain, spans: InMemorySpanExporter
) -> None:
    # the one JSON line per call (crm_common.rpc) is written inside the call's server span
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter("test"))
    rpc_log = logging.getLogger("crm_common.rpc")
    level = rpc_log.level
    rpc_log.addHandler(handler)
    rpc_log.setLevel(logging.INFO)
    try:
        async with insecure_channel(chain.front_target) as channel:
            assert await channel.unary_unary(RELAY)(b"logged") == b"LOGGED"
        got = await finished(spans, 4)
    finally:
        rpc_log.removeHandler(handler)
        rpc_log.setLevel(level)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    servers = {
        s.name: s.context for s in got if s.kind == SpanKind.SERVER and s.context is not None
    }
    assert len(lines) == 2, lines
    for line in lines:
        name = line["method"].lstrip("/")
        assert line["trace_id"] == format(servers[name].trace_id, "032x")
        assert line["span_id"] == format(servers[name].span_id, "016x")


def test_no_trace_fields_outside_a_span() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "plain", None, None)
    line = json.loads(JsonFormatter("test").format(record))
    assert "trace_id" not in line
    assert "span_id" not in line


# -- carried over to a later call (the scheduler's jobs) ------------------------------------

CARRIED = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_carried_traceparent_with_tracing_off_is_the_callers_checked() -> None:
    assert not tracing.enabled()
    assert tracing.carried_traceparent([("traceparent", CARRIED)]) == CARRIED
    assert tracing.carried_traceparent([("traceparent", CARRIED.encode())]) == CARRIED
    assert tracing.carried_traceparent([("traceparent", "00-bogus")]) is None
    assert tracing.carried_traceparent([("x-request-id", "r")]) is None
    assert tracing.carried_traceparent(None) is None
    assert tracing.start_carried_client_span("/a.B/C", CARRIED, "r") is None


def test_carried_traceparent_inside_a_span_is_that_span(spans: InMemorySpanExporter) -> None:
    tracer = TracerProvider().get_tracer("t")
    with tracer.start_as_current_span("handling") as span:
        ctx = span.get_span_context()
        expected = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
        assert tracing.carried_traceparent([("traceparent", CARRIED)]) == expected


def test_carried_client_span_continues_the_stored_trace(spans: InMemorySpanExporter) -> None:
    made = tracing.start_carried_client_span("/a.B/C", CARRIED, "req-1", {"k": 1})
    assert made is not None
    span, sent = made
    tracing.end_carried_client_span(span, "UNAVAILABLE")
    fresh = tracing.start_carried_client_span("/a.B/C", "", None)
    assert fresh is not None
    tracing.end_carried_client_span(fresh[0], "OK")
    first, second = spans.get_finished_spans()
    assert first.kind is SpanKind.CLIENT
    assert first.name == "a.B/C"
    assert f"{first.context.trace_id:032x}" == CARRIED.split("-")[1]
    assert first.parent is not None
    assert f"{first.parent.span_id:016x}" == CARRIED.split("-")[2]
    assert sent == f"00-{first.context.trace_id:032x}-{first.context.span_id:016x}-01"
    attributes = first.attributes or {}
    assert (attributes["crm.request_id"], attributes["k"]) == ("req-1", 1)
    assert attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert first.status.status_code is StatusCode.ERROR
    assert second.parent is None  # nothing carried: a new trace
    assert "crm.request_id" not in (second.attributes or {})
    assert second.status.status_code is not StatusCode.ERROR


def test_request_origin_with_tracing_off_is_the_request_id_only() -> None:
    assert not tracing.enabled()
    assert tracing.request_origin() == tracing.RequestOrigin(None, None)
    token = request_id_var.set("req-7")
    try:
        assert tracing.request_origin() == tracing.RequestOrigin("req-7", None)
    finally:
        request_id_var.reset(token)
    with tracing.linked_span("outbox publish t", [CARRIED]) as span:
        assert span is None


def test_request_origin_inside_a_span_has_its_traceparent(spans: InMemorySpanExporter) -> None:
    tracer = TracerProvider().get_tracer("t")
    token = request_id_var.set("req-8")
    try:
        with tracer.start_as_current_span("handling") as span:
            origin = tracing.request_origin()
            assert origin == ("req-8", tracing.carried_traceparent(None))
            assert origin.traceparent is not None
            assert f"{span.get_span_context().span_id:016x}" in origin.traceparent
    finally:
        request_id_var.reset(token)
    assert tracing.request_origin() == (None, None)  # no span, no request


def test_linked_span_links_each_distinct_carried_context(spans: InMemorySpanExporter) -> None:
    other = "00-11111111111111111111111111111111-2222222222222222-01"
    carried = [CARRIED, None, "", "00-bogus", other, CARRIED]
    seen: list[str | None] = []

    def publish() -> None:
        with tracing.linked_span("outbox publish t", carried, attributes={"n": 6}) as span:
            assert span is not None
            ctx = span.get_span_context()
            seen.append(f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-")
            seen.append(tracing.carried_traceparent(None))  # a call made inside: its child
            raise RuntimeError("bilog down")

    with pytest.raises(RuntimeError):
        publish()
    assert seen[0] is not None
    assert (seen[1] or "").startswith(seen[0])
    (made,) = spans.get_finished_spans()
    assert made.kind is SpanKind.PRODUCER
    assert made.parent is None  # a trace of its own
    linked = [f"00-{ln.context.trace_id:032x}-{ln.context.span_id:016x}-01" for ln in made.links]
    assert linked == [CARRIED, other]
    assert (made.attributes or {})["n"] == 6
    assert made.status.status_code is StatusCode.ERROR
