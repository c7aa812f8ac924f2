"""OpenTelemetry tracing of gRPC calls: off by default, W3C trace context in metadata.

Off (``CRM_<SVC>_TRACING_EXPORTER=none``, the default) nothing is installed: the
interceptors check :func:`enabled` (one global read) and do nothing else, so tracing
costs nothing on the hot path. On, :func:`configure_tracing` (called by
:class:`~crm_common.server.GrpcServer` at start) installs an SDK ``TracerProvider``
(resource ``service.name=crm-<svc>``, ``service.instance.id``; parent-based ratio
sampling) exporting in batches to:

* ``console``: spans as JSON on stdout (development);
* ``otlp``: OTLP/gRPC to an OpenTelemetry Collector (``tracing_otlp_endpoint``, or the
  exporter's own ``OTEL_EXPORTER_OTLP_*`` environment variables when empty).

Then every server call is a ``SERVER`` span named ``<package.Service>/<Method>``, child
of the caller's span when the call carries a ``traceparent`` (W3C Trace Context, next to
``x-request-id``), with ``rpc.system``/``rpc.service``/``rpc.method``,
``rpc.grpc.status_code`` and ``crm.request_id``; status ERROR for the server-fault codes
(UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS) as the
OpenTelemetry conventions say. Every call made through
:func:`crm_common.interceptors.insecure_channel` is a ``CLIENT`` span, child of the
current span (the server span of the call being handled), that injects ``traceparent``
and ends when the call's status is known (status ERROR for any code but OK).

Work carried over to later (a scheduler job calling back at its due time) keeps the trace
with :func:`carried_traceparent` (what to store with it, taken when it is handed over) and
:func:`start_carried_client_span` / :func:`end_carried_client_span` around the later call,
which any thread can make (the scheduler's worker makes plain sync gRPC calls).

Work written down for a relay to send later (a transactional outbox) records
:func:`request_origin` with it (the request id, and the ``traceparent`` when tracing is
on: off, it only reads the request-id contextvar); the relay sends a batch of such work
inside :func:`linked_span`, a span of its own (the batch is nobody's request) with an
OpenTelemetry Link to each recorded trace context.

Tests (or a process embedding its own SDK setup) call :func:`install` with a provider
of their own (e.g. with the SDK's ``InMemorySpanExporter``) and :func:`uninstall`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import grpc
from grpc import aio
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from crm_common.handlers import handler_parts
from crm_common.logs import request_id_var
from crm_common.metrics import split_method

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from crm_common.settings import ServiceSettings

    _Handler = grpc.RpcMethodHandler[Any, Any]
    _Context = aio.ServicerContext[Any, Any]

__all__ = [
    "REQUEST_ID_ATTRIBUTE",
    "RequestOrigin",
    "carried_traceparent",
    "configure_tracing",
    "enabled",
    "end_carried_client_span",
    "install",
    "linked_span",
    "request_origin",
    "shutdown_tracing",
    "start_carried_client_span",
    "trace_client_call",
    "trace_server_handler",
    "uninstall",
]

REQUEST_ID_ATTRIBUTE = "crm.request_id"
"""Span attribute carrying the call's ``x-request-id``."""

_log = logging.getLogger("crm_common.tracing")
_PROPAGATOR = TraceContextTextMapPropagator()
_SERVER_FAULTS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


class _State:
    tracer: Tracer | None = None
    provider: TracerProvider | None = None
    pending: set[asyncio.Task[None]] = set()  # client spans awaiting a status


_state = _State()


def enabled() -> bool:
    """Whether spans are made (a provider is installed)."""
    return _state.tracer is not None


def install(provider: TracerProvider) -> None:
    """Trace every call from now on with ``provider`` (replaces a previous one)."""
    _state.provider = provider
    _state.tracer = provider.get_tracer("crm_common.rpc")


def uninstall() -> TracerProvider | None:
    """Stop tracing; returns the provider that was installed (not shut down)."""
    provider, _state.provider, _state.tracer = _state.provider, None, None
    return provider


def configure_tracing(service: str, settings: ServiceSettings) -> bool:
    """Installs the provider ``settings`` ask for (see module doc); False (and nothing
    done) when ``tracing_exporter`` is ``none`` or a provider is installed already."""
    if settings.tracing_exporter == "none" or enabled():
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    exporter: SpanExporter
    if settings.tracing_exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        endpoint = settings.tracing_otlp_endpoint or None
        exporter = OTLPSpanExporter(endpoint=endpoint)
    else:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        exporter = ConsoleSpanExporter(service_name=f"crm-{service}", out=sys.stdout)
    provider = TracerProvider(
        resource=Resource.create(
            {"service.name": f"crm-{service}", "service.instance.id": settings.instance_name}
        ),
        sampler=ParentBased(TraceIdRatioBased(settings.tracing_sample_ratio)),
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    install(provider)
    _log.info(
        "tracing on",
        extra={
            "exporter": settings.tracing_exporter,
            "sample_ratio": settings.tracing_sample_ratio,
        },
    )
    return True


def shutdown_tracing() -> None:
    """Flushes and shuts the installed provider down, then stops tracing."""
    provider = uninstall()
    if provider is not None:
        provider.shutdown()


# -- server side ----------------------------------------------------------------------------


def _parent(metadata: Iterable[tuple[str, Any]] | None) -> Context:
    carrier = {
        k: v.decode("ascii", "replace") if isinstance(v, bytes) else str(v)
        for k, v in metadata or ()
        if k in ("traceparent", "tracestate")
    }
    return _PROPAGATOR.extract(carrier)


def _code(context: _Context) -> grpc.StatusCode | None:
    """The code set by ``set_code``/``abort`` (the stubs miss that it is None otherwise)."""
    return cast("grpc.StatusCode | None", context.code())


def _rpc_attributes(method: str) -> dict[str, str]:
    service, name = split_method(method)
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def trace_server_handler(
    handler: _Handler,
    method: str,
    request_id: str,
    metadata: Iterable[tuple[str, Any]] | None,
) -> _Handler:
    """``handler`` with its (async) behaviour run inside a SERVER span (see module doc);
    unchanged when tracing is off or the behaviour is not a coroutine function (sync
    handlers, which the services do not use)."""
    tracer = _state.tracer
    if tracer is None:
        return handler
    behavior, make = handler_parts(handler)
    if not inspect.iscoroutinefunction(behavior):
        return handler
    parent = _parent(metadata)
    attributes: dict[str, str | int] = {
        **_rpc_attributes(method),
        REQUEST_ID_ATTRIBUTE: request_id,
    }

    async def traced(request: Any, context: _Context) -> Any:
        with tracer.start_as_current_span(
            method.lstrip("/"),
            context=parent,
            kind=SpanKind.SERVER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            code = grpc.StatusCode.UNKNOWN
            try:
                result = await behavior(request, context)
                code = _code(context) or grpc.StatusCode.OK
                return result
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except BaseException:
                code = _code(context) or grpc.StatusCode.UNKNOWN
                raise
            finally:
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                if code in _SERVER_FAULTS:
                    span.set_status(Status(StatusCode.ERROR, code.name))

    return make(
        traced,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


# -- client side ----------------------------------------------------------------------------


async def trace_client_call(
    continuation: Callable[[aio.ClientCallDetails, Any], Awaitable[Any]],
    details: aio.ClientCallDetails,
    request: Any,
) -> Any:
    """Runs a client call inside a CLIENT span that injects ``traceparent`` into its
    metadata; the span ends when the call's status is known. Plain ``continuation``
    when tracing is off."""
    tracer = _state.tracer
    if tracer is None:
        return await continuation(details, request)
    raw: Any = details.method  # bytes at run time, whatever the stubs say
    method = raw.decode() if isinstance(raw, bytes) else str(raw)
    metadata = aio.Metadata(*tuple(details.metadata or ()))
    attributes: dict[str, str] = _rpc_attributes(method)
    request_id = metadata.get("x-request-id")
    if request_id is not None:
        attributes[REQUEST_ID_ATTRIBUTE] = str(request_id)
    span = tracer.start_span(method.lstrip("/"), kind=SpanKind.CLIENT, attributes=attributes)
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    for key, value in carrier.items():
        metadata[key] = value
    traced_details = aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )
    try:
        call = await continuation(traced_details, request)
    except BaseException as exc:
        span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        span.end()
        raise
    task = asyncio.get_running_loop().create_task(_end_client_span(span, call))
    _state.pending.add(task)
    task.add_done_callback(_state.pending.discard)
    return call


async def _end_client_span(span: trace.Span, call: Any) -> None:
    try:
        code: grpc.StatusCode = await call.code()
    except asyncio.CancelledError:
        code = grpc.StatusCode.CANCELLED
    except Exception:
        code = grpc.StatusCode.UNKNOWN
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()


# -- carried over to a later call -----------------------------------------------------------


def carried_traceparent(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The W3C ``traceparent`` a later call continuing the call being handled should carry
    (to store with a job, say): the current span's when tracing is on (the SERVER span of
    the call), else the caller's ``traceparent`` from ``metadata`` (checked and
    normalised by the W3C propagator; so a trace goes on through a process that does not
    trace itself), else None (no trace)."""
    current = trace.get_current_span().get_span_context()
    carrier: dict[str, str] = {}
    if current.is_valid:
        _PROPAGATOR.inject(carrier)
    else:
        _PROPAGATOR.inject(carrier, context=_parent(metadata))
    return carrier.get("traceparent")


def start_carried_client_span(
    method: str,
    traceparent: str | None,
    request_id: str | None,
    attributes: dict[str, str | int] | None = None,
) -> tuple[trace.Span, str] | None:
    """A CLIENT span for a call to ``method`` made on behalf of earlier work whose
    carried ``traceparent`` (None or empty: a new trace) is its parent, and the
    ``traceparent`` to send on the call (the span's own); None when tracing is off.
    Not made current: end it with :func:`end_carried_client_span` from any thread."""
    tracer = _state.tracer
    if tracer is None:
        return None
    parent = _PROPAGATOR.extract({"traceparent": traceparent}) if traceparent else Context()
    span_attributes: dict[str, str | int] = {**_rpc_attributes(method), **(attributes or {})}
    if request_id:
        span_attributes[REQUEST_ID_ATTRIBUTE] = request_id
    span = tracer.start_span(
        method.lstrip("/"), context=parent, kind=SpanKind.CLIENT, attributes=span_attributes
    )
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return span, carrier.get("traceparent", "")


def end_carried_client_span(span: trace.Span, code: str) -> None:
    """Ends a span of :func:`start_carried_client_span` with the call's status code name
    (``OK``, ``UNAVAILABLE``, ...): status ERROR for any code but OK."""
    status = grpc.StatusCode.__members__.get(code, grpc.StatusCode.UNKNOWN)
    span.set_attribute("rpc.grpc.status_code", status.value[0])
    if status is not grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, code))
    span.end()


# -- recorded for a relay (outbox) ----------------------------------------------------------


class RequestOrigin(NamedTuple):
    """The call some work is done for, as recorded with it for later: its ``x-request-id``
    and the W3C ``traceparent`` of its span (None: no request id / not traced)."""

    request_id: str | None = None
    traceparent: str | None = None


_NO_ORIGIN = RequestOrigin()


def request_origin() -> RequestOrigin:
    """The current call's :class:`RequestOrigin`: its request id (``request_id_var``) and,
    when tracing is on, the current span's ``traceparent`` (:func:`carried_traceparent`).
    Tracing off, it only reads the request-id contextvar (the outbox writes are hot
    paths)."""
    request_id = request_id_var.get()
    if _state.tracer is None:
        return _NO_ORIGIN if request_id is None else RequestOrigin(request_id)
    return RequestOrigin(request_id, carried_traceparent(None))


def _links(traceparents: Iterable[str | None]) -> list[Link]:
    seen: set[tuple[int, int]] = set()
    links: list[Link] = []
    for traceparent in traceparents:
        if not traceparent:
            continue
        ctx = trace.get_current_span(_PROPAGATOR.extract({"traceparent": traceparent}))
        linked = ctx.get_span_context()
        key = (linked.trace_id, linked.span_id)
        if linked.is_valid and key not in seen:
            seen.add(key)
            links.append(Link(linked))
    return links


@contextlib.contextmanager
def linked_span(
    name: str,
    traceparents: Iterable[str | None],
    *,
    kind: SpanKind = SpanKind.PRODUCER,
    attributes: dict[str, str | int] | None = None,
) -> Iterator[trace.Span | None]:
    """A span (a new trace: work relayed for many requests is none of them) with a Link to
    each distinct valid ``traceparent`` (None, empty and malformed ones are skipped),
    current while the block runs, so the calls made in it are its children; status ERROR
    when the block raises. Yields None and does nothing when tracing is off. (The SDK
    keeps at most ``OTEL_SPAN_LINK_COUNT_LIMIT`` links, 128 by default.)"""
    tracer = _state.tracer
    if tracer is None:
        yield None
        return
    with tracer.start_as_current_span(
        name,
        context=Context(),
        kind=kind,
        attributes=attributes,
        links=_links(traceparents),
    ) as span:
        yield span
