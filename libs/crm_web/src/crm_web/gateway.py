"""The dev grpc-web gateway: sonora's ASGI grpc-web server, forwarding every call to the
real gRPC endpoint of the service it belongs to.

A browser cannot speak gRPC (HTTP/2 trailers), so the console speaks grpc-web; this
gateway turns each grpc-web request into a plain gRPC call on a ``grpc.aio`` channel to
the service and the answer back. Messages are forwarded as bytes (never decoded), so the
gateway needs no change when a service grows an RPC: it only has to know which service
lives where (``routes``) and each method's shape (unary or server streaming), which it
reads from the descriptors generated from ``proto/`` (``crm_proto``).

What crosses the gateway besides the message: the deadline (``grpc-timeout``), the
caller's ``authorization``, ``x-request-id``, ``x-crm-author`` (ConfigAdmin's author of
a change) and trace headers (``traceparent``, ``tracestate``); back: the status, its
message and the trailing metadata (including ``grpc-status-details-bin``, so the console
can show which field of a config was refused, and ``x-request-id``). Nothing else
(cookies, user agent, ...) is passed on.

sonora 0.2.3 is used for the grpc-web protocol (routing, framing, base64 text mode, the
request side); its response side is replaced here (``ForwardingGrpcWeb``) because it
(a) sends a streaming response's headers only with its first message, so the console
could not tell an open offer stream from a hanging one, (b) noticed a closed browser tab
only when the next message was due, leaving the upstream stream open until then,
(c) dropped trailing metadata on errors (the rich error details), (d) packed bytes
trailers of unary calls with their ``b'...'`` repr and (e) answered with the
request's ``Accept`` as content type. Production uses Envoy's
``grpc_web`` filter in front of the services instead (see the README).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import pkgutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import quote

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import ServiceDescriptor
from sonora import protocol
from sonora.asgi import grpcASGI

log = logging.getLogger("crm.web.gateway")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

FORWARDED_HEADERS = frozenset(
    {"authorization", "x-request-id", "traceparent", "tracestate", "x-crm-author"}
)
"""Request headers passed on to the service as gRPC metadata (all others are dropped).
``x-crm-author`` names who changes a config in ConfigAdmin's history: in development it
is what the console user typed; in production the sign-on proxy in front of Envoy must
set it (and drop the browser's)."""

STATUS_BY_CODE = {code.value[0]: code for code in grpc.StatusCode}


def load_descriptors() -> None:
    """Import every generated ``crm.*_pb2`` module so the default pool knows every service."""
    import crm

    for mod in pkgutil.walk_packages(crm.__path__, "crm."):
        if mod.name.endswith("_pb2"):
            importlib.import_module(mod.name)


def find_service(name: str) -> ServiceDescriptor:
    """The descriptor of a fully qualified service (KeyError when ``proto/`` has none)."""
    load_descriptors()
    return descriptor_pool.Default().FindServiceByName(name)


def forwarded_metadata(metadata: Iterable[tuple[str, str | bytes]]) -> list[tuple[str, str]]:
    """The request headers the service gets: only the allow-listed ones."""
    out: list[tuple[str, str]] = []
    for key, value in metadata:
        k = key.lower()
        if k in FORWARDED_HEADERS and isinstance(value, str):
            out.append((k, value))
    return out


def _trailer_pairs(metadata: Any) -> list[tuple[str, str]]:
    """gRPC metadata -> header pairs (``-bin`` values base64, as grpc-web wants)."""
    if not metadata:
        return []
    return [(k.lower(), v) for k, v in protocol.encode_headers(list(metadata))]


@dataclass
class Route:
    """One service forwarded to one gRPC target."""

    service: str
    target: str
    channel: grpc.aio.Channel
    streaming: dict[str, bool]  # method name -> server streaming


class Forwarder(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """Method handlers that pass each call's bytes on to the owning service's channel."""

    def __init__(self, routes: Mapping[str, str]) -> None:
        self.open_streams = 0  # upstream server streams in flight (offer streams)
        self.routes: dict[str, Route] = {}
        for service, target in routes.items():
            desc = find_service(service)
            for m in desc.methods:
                if m.client_streaming:
                    raise ValueError(f"{service}.{m.name}: client streaming has no grpc-web form")
            self.routes[service] = Route(
                service=service,
                target=target,
                channel=grpc.aio.insecure_channel(target),
                streaming={m.name: m.server_streaming for m in desc.methods},
            )

    async def close(self) -> None:
        for route in self.routes.values():
            await route.channel.close(None)

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:  # type: ignore[type-arg]
        path = handler_call_details.method  # "/pkg.Service/Method"
        service, _, method = path.lstrip("/").partition("/")
        route = self.routes.get(service)
        if route is None or method not in route.streaming:
            return None
        if route.streaming[method]:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(route, path), _identity, _identity
            )
        return grpc.unary_unary_rpc_method_handler(self._unary(route, path), _identity, _identity)

    @staticmethod
    def _unary(route: Route, path: str) -> Callable[[bytes, Any], Awaitable[bytes]]:
        call_rpc = route.channel.unary_unary(path, None, None)

        async def handle(request: bytes, context: Any) -> bytes:
            call = call_rpc(
                request,
                metadata=forwarded_metadata(context.invocation_metadata()),
                timeout=context.time_remaining(),
            )
            try:
                response = cast(bytes, await call)
            except grpc.aio.AioRpcError as exc:
                _fail(context, exc)
            context.set_trailing_metadata(list(await call.trailing_metadata() or ()))
            return response

        return handle

    def _stream(self, route: Route, path: str) -> Callable[[bytes, Any], AsyncIterator[bytes]]:
        call_rpc = route.channel.unary_stream(path, None, None)

        async def handle(request: bytes, context: Any) -> AsyncIterator[bytes]:
            call = call_rpc(
                request,
                metadata=forwarded_metadata(context.invocation_metadata()),
                timeout=context.time_remaining(),
            )
            self.open_streams += 1
            try:
                async for message in call:
                    yield cast(bytes, message)
                context.set_trailing_metadata(list(await call.trailing_metadata() or ()))
            except grpc.aio.AioRpcError as exc:
                _fail(context, exc)
            finally:
                call.cancel()  # the browser went away: end the upstream stream too
                self.open_streams -= 1

        return handle


def _identity(data: bytes) -> bytes:
    return data


def _fail(context: Any, exc: grpc.aio.AioRpcError) -> Any:
    """Copy the service's error into the grpc-web context and end the handler."""
    context.set_code(exc.code())
    context.set_details(exc.details() or "")
    context.set_trailing_metadata(list(exc.trailing_metadata() or ()))
    raise grpc.RpcError(exc.code().name)


class ForwardingGrpcWeb(grpcASGI):  # type: ignore[misc]
    """sonora's grpc-web ASGI app with the response side done over (see the module doc)."""

    def _create_context(self, scope: Scope) -> Any:
        context = super()._create_context(scope)
        # sonora answers with the request's Accept as content type ("*/*" from fetch);
        # a grpc-web client wants the grpc-web type it sent.
        sent = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
        kind = b"application/grpc-web-text" if b"-text" in sent else b"application/grpc-web+proto"
        context._response_headers[0] = (b"content-type", kind)
        return context

    def _trailers(self, context: Any) -> list[tuple[str, str]]:
        pairs = [("grpc-status", str(context.code.value[0]))]
        if context.details:
            pairs.append(("grpc-message", quote(str(context.details), safe="")))
        pairs += _trailer_pairs(context._trailing_metadata)
        return pairs

    def _headers(self, context: Any) -> list[tuple[bytes, bytes]]:
        headers = list(context._response_headers)
        if context._initial_metadata:
            headers.extend(context._initial_metadata)
        return cast(list[tuple[bytes, bytes]], headers)

    async def _do_grpc_error(self, send: Send, context: Any) -> None:
        # "Trailers-only": the status and the trailing metadata as headers.
        headers = self._headers(context)
        headers += [(k.encode(), v.encode()) for k, v in self._trailers(context)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _do_unary_response(
        self,
        rpc_method: Any,
        receive: Receive,
        send: Send,
        wrap_message: Callable[[bool, bool, bytes], bytes],
        context: Any,
        coroutine: Awaitable[bytes] | None,
    ) -> None:
        message = await coroutine if coroutine is not None else None
        body = b""
        if message is not None:
            body += wrap_message(False, False, rpc_method.response_serializer(message))
        body += wrap_message(True, False, protocol.pack_trailers(self._trailers(context)))
        headers = [*self._headers(context), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _do_streaming_response(
        self,
        rpc_method: Any,
        receive: Receive,
        send: Send,
        wrap_message: Callable[[bool, bool, bytes], bytes],
        context: Any,
        coroutine: AsyncIterator[bytes] | None,
    ) -> None:
        # Headers at once: the browser sees the stream open before the first message.
        await send(
            {"type": "http.response.start", "status": 200, "headers": self._headers(context)}
        )
        if coroutine is not None:
            pump = asyncio.create_task(self._pump(rpc_method, send, wrap_message, coroutine))
            gone = asyncio.create_task(_wait_disconnect(receive))
            done, _ = await asyncio.wait({pump, gone}, return_when=asyncio.FIRST_COMPLETED)
            if pump not in done:  # the browser went away: stop the upstream call
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.RpcError):
                    await pump
                return
            gone.cancel()
            with contextlib.suppress(grpc.RpcError):
                pump.result()  # the error is in the context; it goes into the trailers
        trailer = wrap_message(True, False, protocol.pack_trailers(self._trailers(context)))
        await send({"type": "http.response.body", "body": trailer, "more_body": False})

    @staticmethod
    async def _pump(
        rpc_method: Any,
        send: Send,
        wrap_message: Callable[[bool, bool, bytes], bytes],
        messages: AsyncIterator[bytes],
    ) -> None:
        try:
            async for message in messages:
                body = wrap_message(False, False, rpc_method.response_serializer(message))
                await send({"type": "http.response.body", "body": body, "more_body": True})
        finally:
            aclose = getattr(messages, "aclose", None)
            if aclose is not None:
                await aclose()


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        event = await receive()
        if event["type"] == "http.disconnect":
            return


def grpc_web_app(
    routes: Mapping[str, str], fallback: ASGIApp | None
) -> tuple[ForwardingGrpcWeb, Forwarder]:
    """The ASGI app: grpc-web calls of the routed services forwarded, anything else to
    ``fallback`` (the static files). CORS is off: the console is served from the same
    origin."""
    forwarder = Forwarder(routes)
    app = ForwardingGrpcWeb(fallback, enable_cors=False)
    app.add_generic_rpc_handlers([forwarder])
    return app, forwarder


def describe(routes: Mapping[str, str]) -> Sequence[str]:
    return [f"{svc} -> {target}" for svc, target in sorted(routes.items())]
