"""gRPC interceptors: request ids, error mapping, metrics and one log line per call.

Server side, :class:`ServerInterceptor` wraps every async handler (all four
cardinalities):

* the request id comes from the ``x-request-id`` metadata (or a new uuid4 hex); it is
  set in :data:`~crm_common.logs.request_id_var` / ``method_var`` for the handler and
  returned in the trailing metadata (also on errors raised as :class:`CrmError` or
  unexpected exceptions; a handler that calls ``context.abort`` with trailing metadata
  of its own replaces it);
* :class:`CrmError` -> its status code with the rich status (``BadRequest`` etc.);
  any other exception -> logged with its traceback, ``INTERNAL`` with a generic
  message; ``context.abort`` and grpc's own errors pass through untouched;
* the outcome's code is counted in :class:`~crm_common.metrics.RpcMetrics` and logged
  (method, code, duration, peer; never payloads) at INFO, DEBUG for health/reflection.

Response-streaming handlers (async generators or reader/writer coroutines) are run
as reader/writer coroutines that write each item, so a client cancelling mid-write is
seen here and the handler's generator is closed in the same task. Sync (thread-pool)
handlers are passed through unobserved: services use async handlers only.

Client side, :func:`insecure_channel` builds a channel whose calls carry the current
request id, so one id follows a request across services.

With tracing on (:mod:`crm_common.tracing`, off by default) server calls run in a span
continuing the caller's W3C ``traceparent`` and client calls inject theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar, cast

import grpc
from grpc import aio

from crm_common import tracing
from crm_common.channels import DEFAULT_RETRY, RetryPolicy, channel_options
from crm_common.errors import CrmError, to_rpc_status
from crm_common.handlers import handler_parts
from crm_common.logs import method_var, request_id_var
from crm_common.metrics import RpcMetrics

if TYPE_CHECKING:
    # The stubs make these generic; the runtime classes are not subscriptable.
    _ServerInterceptorBase = aio.ServerInterceptor[Any, Any]
    _UnaryUnaryBase = aio.UnaryUnaryClientInterceptor[Any, Any]
    _UnaryStreamBase = aio.UnaryStreamClientInterceptor[Any, Any]
    _StreamUnaryBase = aio.StreamUnaryClientInterceptor[Any, Any]
    _StreamStreamBase = aio.StreamStreamClientInterceptor[Any, Any]
    _Handler = grpc.RpcMethodHandler[Any, Any]
    _Context = aio.ServicerContext[Any, Any]
else:
    _ServerInterceptorBase = aio.ServerInterceptor
    _UnaryUnaryBase = aio.UnaryUnaryClientInterceptor
    _UnaryStreamBase = aio.UnaryStreamClientInterceptor
    _StreamUnaryBase = aio.StreamUnaryClientInterceptor
    _StreamStreamBase = aio.StreamStreamClientInterceptor

__all__ = [
    "REQUEST_ID_KEY",
    "REQUEST_ID_RULE",
    "ServerInterceptor",
    "insecure_channel",
    "is_valid_request_id",
    "new_request_id",
    "request_id_client_interceptors",
]

REQUEST_ID_KEY = "x-request-id"
"""Metadata key carrying the request id, both ways."""

_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_QUIET_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_T = TypeVar("_T")

_log = logging.getLogger("crm_common.rpc")


REQUEST_ID_RULE = "1..128 characters of A-Z a-z 0-9 . _ : -"
"""What a request id is made of (said in errors about one)."""


def is_valid_request_id(text: str) -> bool:
    """Whether ``text`` is a request id this platform accepts (``REQUEST_ID_RULE``)."""
    return _VALID_REQUEST_ID.fullmatch(text) is not None


def new_request_id() -> str:
    """A fresh request id (uuid4 hex)."""
    return uuid.uuid4().hex


def _incoming_request_id(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The caller's id if it looks sane (charset, length), else a new one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY:
            text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
            if _VALID_REQUEST_ID.fullmatch(text):
                return text
            break
    return new_request_id()


def _ensure_request_id_trailer(context: _Context, request_id: str) -> None:
    trailing = tuple(context.trailing_metadata() or ())
    if not any(key == REQUEST_ID_KEY for key, _ in trailing):
        context.set_trailing_metadata((*trailing, (REQUEST_ID_KEY, request_id)))


class ServerInterceptor(_ServerInterceptorBase):
    """The one server interceptor every CRM service installs (see module docstring)."""

    def __init__(self, metrics: RpcMetrics | None = None, logger: logging.Logger | None = None):
        self._metrics = metrics
        self._log = logger or _log
        self._wrapped: dict[str, tuple[_Handler, _Handler]] = {}
        """method -> (its handler, the wrapped one): the wrapping is per method, not per
        call (the request id is read from each call's metadata)."""

    async def intercept_service(  # type: ignore[override]  # returns None for unknown methods
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if tracing.enabled():  # off: this one check is all tracing costs
            metadata = handler_call_details.invocation_metadata
            request_id = _incoming_request_id(metadata)
            wrapped = self._wrap(handler, method, request_id)
            return tracing.trace_server_handler(wrapped, method, request_id, metadata)
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method, None)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: _Handler, method: str, request_id: str | None) -> _Handler:
        """``handler`` observed; ``request_id`` None: taken from each call's metadata."""
        behavior, make = handler_parts(handler)

        def call_id(context: _Context) -> str:
            if request_id is not None:
                return request_id
            return _incoming_request_id(context.invocation_metadata())

        wrapped: Callable[[Any, _Context], Awaitable[Any]]
        if inspect.isasyncgenfunction(behavior) and handler.response_streaming:

            async def wrapped(request: Any, context: _Context) -> None:
                async def run() -> None:
                    async with contextlib.aclosing(behavior(request, context)) as responses:
                        async for response in responses:
                            await context.write(response)

                await self._observe(method, call_id(context), context, run)

        elif inspect.iscoroutinefunction(behavior):

            async def wrapped(request: Any, context: _Context) -> Any:
                return await self._observe(
                    method, call_id(context), context, lambda: behavior(request, context)
                )

        else:
            return handler
        return make(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def _observe(
        self,
        method: str,
        request_id: str,
        context: _Context,
        run: Callable[[], Awaitable[_T]],
    ) -> _T:
        request_id_token = request_id_var.set(request_id)
        method_token = method_var.set(method)
        _ensure_request_id_trailer(context, request_id)
        if self._metrics is not None:
            self._metrics.call_started(method)
        started = time.perf_counter()
        code = grpc.StatusCode.UNKNOWN
        error: str | None = None
        try:
            result = await run()
            _ensure_request_id_trailer(context, request_id)
            code = _code_of(context, grpc.StatusCode.OK)
            return result
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling() or context.done():
                code = _cancelled_code(context)
                raise
            # A CancelledError nobody asked this call for (grpc cancels the handler's task on
            # a client cancel, a deadline or a stop): a task or channel the handler awaited
            # was cancelled under it. Passed on, grpc would send no status at all and the
            # caller would wait out its deadline; it is a transient server-side failure.
            error = "CancelledError"
            self._log.error("%s was interrupted by a stray cancellation", method, exc_info=True)
            code = grpc.StatusCode.UNAVAILABLE
            await context.abort(
                code,
                f"the call was interrupted inside the server; retry (request id {request_id})",
                ((REQUEST_ID_KEY, request_id),),
            )
        except aio.BaseError:
            # context.abort (AbortError) and grpc's own state errors: grpc finishes the call.
            code = _code_of(context, grpc.StatusCode.UNKNOWN)
            raise
        except Exception as exc:
            error = type(exc).__name__
            if context.done():  # the status is already sent (an abort was swallowed)
                code = _code_of(context, grpc.StatusCode.UNKNOWN)
                raise
            failure = self._failure_for(exc, method, request_id)
            code = failure.code
            await context.abort(failure.code, failure.details, failure.trailing_metadata)
        finally:
            elapsed = time.perf_counter() - started
            if self._metrics is not None:
                self._metrics.call_finished(method, code, elapsed)
            self._log_finished(method, code, elapsed, context, error)
            with contextlib.suppress(ValueError):  # finalised in another context
                method_var.reset(method_token)
                request_id_var.reset(request_id_token)

    def _failure_for(self, exc: Exception, method: str, request_id: str) -> _Failure:
        trailer: tuple[str, str | bytes] = (REQUEST_ID_KEY, request_id)
        if isinstance(exc, CrmError):
            status = to_rpc_status(exc)
            return _Failure(status.code, status.details, (*status.trailing_metadata, trailer))
        self._log.error("unhandled %s in %s", type(exc).__name__, method, exc_info=exc)
        details = f"internal error (request id {request_id})"
        return _Failure(grpc.StatusCode.INTERNAL, details, (trailer,))

    def _log_finished(
        self,
        method: str,
        code: grpc.StatusCode,
        elapsed: float,
        context: _Context,
        error: str | None,
    ) -> None:
        level = logging.DEBUG if method.startswith(_QUIET_PREFIXES) else logging.INFO
        if not self._log.isEnabledFor(level):
            return
        fields: dict[str, Any] = {
            "code": code.name,
            "duration_ms": round(elapsed * 1000, 3),
            "peer": _peer(context),
        }
        if error is not None:
            fields["error"] = error
        self._log.log(level, "rpc finished: %s %s", method, code.name, extra=fields)


class _Failure(NamedTuple):
    """What to abort a call with."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def _code_of(context: _Context, default: grpc.StatusCode) -> grpc.StatusCode:
    """The code set by ``set_code``/``abort``; the stubs miss that it is None otherwise."""
    return cast("grpc.StatusCode | None", context.code()) or default


def _cancelled_code(context: _Context) -> grpc.StatusCode:
    remaining: float | None = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


def _peer(context: _Context) -> str:
    try:
        return context.peer()
    except Exception:
        return ""


# -- client side ---------------------------------------------------------------------------


def _with_request_id(details: aio.ClientCallDetails) -> aio.ClientCallDetails:
    request_id = request_id_var.get()
    if request_id is None:
        return details
    metadata = aio.Metadata(*tuple(details.metadata or ()))
    if REQUEST_ID_KEY in metadata:
        return details
    metadata.add(REQUEST_ID_KEY, request_id)
    return aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


async def _proceed(continuation: Any, details: aio.ClientCallDetails, request: Any) -> Any:
    if tracing.enabled():  # off: this one check is all tracing costs
        return await tracing.trace_client_call(continuation, _with_request_id(details), request)
    return await continuation(_with_request_id(details), request)


class _UnaryUnary(_UnaryUnaryBase):
    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: aio.ClientCallDetails, request: Any
    ) -> Any:
        return await _proceed(continuation, client_call_details, request)


class _UnaryStream(_UnaryStreamBase):
    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: aio.ClientCallDetails, request: Any
    ) -> Any:
        return await _proceed(continuation, client_call_details, request)


class _StreamUnary(_StreamUnaryBase):
    async def intercept_stream_unary(
        self, continuation: Any, client_call_details: aio.ClientCallDetails, request_iterator: Any
    ) -> Any:
        return await _proceed(continuation, client_call_details, request_iterator)


class _StreamStream(_StreamStreamBase):
    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: aio.ClientCallDetails, request_iterator: Any
    ) -> Any:
        return await _proceed(continuation, client_call_details, request_iterator)


def request_id_client_interceptors() -> list[Any]:
    """Client interceptors (one per cardinality) sending the current ``request_id_var``
    as ``x-request-id``; calls made outside a request send none (the server makes one)."""
    return [_UnaryUnary(), _UnaryStream(), _StreamUnary(), _StreamStream()]


def insecure_channel(
    target: str,
    *,
    options: Sequence[tuple[str, Any]] | None = None,
    interceptors: Sequence[Any] = (),
    compression: grpc.Compression | None = None,
    retry: RetryPolicy | None = DEFAULT_RETRY,
) -> aio.Channel:
    """A ``grpc.aio`` channel to ``target`` (``host:port``) propagating request ids, with
    gRPC's own retries of UNAVAILABLE (``crm_common.channels``; ``retry=None``: off)."""
    return aio.insecure_channel(
        target,
        options=channel_options(retry, options or ()),
        compression=compression,
        interceptors=[*request_id_client_interceptors(), *interceptors],
    )
