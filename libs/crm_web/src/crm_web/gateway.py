"""The dev grpc-web gateway: sonora's ASGI grpc-web server, forwarding the console's calls
(an allow-list, ``POLICIES``) to the real gRPC endpoint of the service they belong to.

A browser cannot speak gRPC (HTTP/2 trailers), so the console speaks grpc-web; this
gateway turns each grpc-web request into a plain gRPC call on a ``grpc.aio`` channel to
the service and the answer back. Messages are forwarded as bytes (never decoded): the
gateway only has to know which service lives where (``routes``), each method's shape
(unary or server streaming), which it reads from the descriptors generated from
``proto/`` (``crm_proto``), and which methods browsers may call (a new console RPC must
be added to its service's policy).

Which calls cross it (``POLICIES``): the assignment service trusts a call without an
``authorization`` header as a service-to-service call, so the gateway must never forward
such a call from a browser. Only the agent-facing RPCs the console uses are forwarded
(``AGENT_RPCS``: everything else, CreateClue, UpsertAgent, CancelTask, ..., answers
PERMISSION_DENIED at the gateway), and each of them needs ``authorization`` (a SignIn
token; UNAUTHENTICATED without it), SignIn excepted. The service then scopes every call to
the token's agent. ConfigAdmin's review RPCs are forwarded as they are: config review must
sit behind an authenticating proxy, which names the author of a change in a trusted header
(``author_header``, ``--author-header``); the browser's own ``x-crm-author`` is then
dropped. A service routed without a policy (``--route``) is forwarded whole: a development
aid, never for a service that trusts header-less calls.

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
from typing import Any, NoReturn, cast
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

ASSIGNMENT = "crm.assignment.v1.AssignmentService"
CONFIG_ADMIN = "crm.config.v1.ConfigAdminService"
RECOMMENDATION = "crm.recommendation.v1.RecommendationService"
AUTHOR_HEADER = "x-crm-author"


@dataclass(frozen=True)
class Policy:
    """Which methods of a service the gateway forwards, and which of those it forwards
    without an ``authorization`` header."""

    methods: frozenset[str]
    anonymous: frozenset[str]
    why: str  # said in the PERMISSION_DENIED of a method not forwarded


AGENT_RPCS = frozenset(
    {
        "SignIn",
        "GetAgent",
        "SetPresence",
        "StreamOffers",
        "AcceptTask",
        "RejectTask",
        "ListTasks",
        "GetTask",
        "RecordCall",
        "CompleteTask",
        "FailTask",
    }
)
"""The assignment RPCs the agent console calls (web/src/console.ts, main.ts); the service
scopes each of them to the agent of the call's token."""

CONFIG_REVIEW_RPCS = frozenset({"List", "Get", "History", "Rollout", "Set", "Rollback"})

POLICIES: dict[str, Policy] = {
    ASSIGNMENT: Policy(
        methods=AGENT_RPCS,
        anonymous=frozenset({"SignIn"}),
        why="only the agent console's RPCs are served to browsers",
    ),
    CONFIG_ADMIN: Policy(
        methods=CONFIG_REVIEW_RPCS,
        anonymous=CONFIG_REVIEW_RPCS,  # behind the authenticating proxy (author_header)
        why="only config review's RPCs are served to browsers",
    ),
    RECOMMENDATION: Policy(  # it checks no caller; the console reads GetTask's cars
        methods=frozenset(),
        anonymous=frozenset(),
        why="the console gets recommendations through GetTask",
    ),
}


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


def forwarded_metadata(
    metadata: Iterable[tuple[str, str | bytes]], author_header: str | None = None
) -> list[tuple[str, str]]:
    """The request headers the service gets: only the allow-listed ones. With
    ``author_header`` (set by the authenticating proxy in front of the gateway), the
    author of a config change is that header's value and the browser's ``x-crm-author``
    is dropped."""
    trusted = author_header.lower() if author_header else None
    out: list[tuple[str, str]] = []
    for key, value in metadata:
        k = key.lower()
        if not isinstance(value, str):
            continue
        if trusted is not None:
            if k == AUTHOR_HEADER:
                continue
            if k == trusted:
                out.append((AUTHOR_HEADER, value))
                continue
        if k in FORWARDED_HEADERS:
            out.append((k, value))
    return out


def _header(context: Any, name: str) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key.lower() == name and isinstance(value, str) and value.strip():
            return value
    return None


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
    policy: Policy | None  # None: every method forwarded (``--route`` without a policy)


class Forwarder(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """Method handlers that pass each call's bytes on to the owning service's channel,
    for the methods its policy forwards (see the module doc)."""

    def __init__(self, routes: Mapping[str, str], author_header: str | None = None) -> None:
        self.open_streams = 0  # upstream server streams in flight (offer streams)
        self.author_header = author_header.lower() if author_header else None
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
                policy=POLICIES.get(service),
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
        policy = route.policy
        if policy is not None and method not in policy.methods:
            refused = f"{service}/{method} is not served by the web gateway: {policy.why}"
            if route.streaming[method]:
                return grpc.unary_stream_rpc_method_handler(
                    _refuse_stream(refused), _identity, _identity
                )
            return grpc.unary_unary_rpc_method_handler(_refuse(refused), _identity, _identity)
        if route.streaming[method]:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(route, path), _identity, _identity
            )
        return grpc.unary_unary_rpc_method_handler(self._unary(route, path), _identity, _identity)

    def _admit(self, route: Route, path: str, context: Any) -> list[tuple[str, str]]:
        """The metadata to forward, or the call refused (UNAUTHENTICATED) when its policy
        wants an ``authorization`` header (or the proxy's author header) it lacks."""
        method = path.rpartition("/")[2]
        policy = route.policy
        anonymous = policy is None or method in policy.anonymous
        if not anonymous and _header(context, "authorization") is None:
            _abort(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                f"{method} needs 'authorization: Bearer <token>' (sign in first)",
            )
        trusted = self.author_header
        if route.service == CONFIG_ADMIN and trusted and _header(context, trusted) is None:
            _abort(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                f"no {trusted} header: config review must come through the authenticating proxy",
            )
        return forwarded_metadata(context.invocation_metadata(), self.author_header)

    def _unary(self, route: Route, path: str) -> Callable[[bytes, Any], Awaitable[bytes]]:
        call_rpc = route.channel.unary_unary(path, None, None)

        async def handle(request: bytes, context: Any) -> bytes:
            metadata = self._admit(route, path, context)
            call = call_rpc(request, metadata=metadata, timeout=context.time_remaining())
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
            metadata = self._admit(route, path, context)
            call = call_rpc(request, metadata=metadata, timeout=context.time_remaining())
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


def _abort(context: Any, code: grpc.StatusCode, details: str) -> NoReturn:
    """End the handler with ``code`` (the gateway's own refusal, nothing forwarded)."""
    context.set_code(code)
    context.set_details(details)
    raise grpc.RpcError(code.name)


def _refuse(details: str) -> Callable[[bytes, Any], Awaitable[bytes]]:
    async def handle(request: bytes, context: Any) -> bytes:
        _abort(context, grpc.StatusCode.PERMISSION_DENIED, details)

    return handle


def _refuse_stream(details: str) -> Callable[[bytes, Any], AsyncIterator[bytes]]:
    async def handle(request: bytes, context: Any) -> AsyncIterator[bytes]:
        for _ in ():  # an async generator that yields nothing: refused before any message
            yield b""
        _abort(context, grpc.StatusCode.PERMISSION_DENIED, details)

    return handle


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
    routes: Mapping[str, str], fallback: ASGIApp | None, author_header: str | None = None
) -> tuple[ForwardingGrpcWeb, Forwarder]:
    """The ASGI app: grpc-web calls of the routed services forwarded (as their policy
    allows), anything else to ``fallback`` (the static files). CORS is off: the console is
    served from the same origin. ``author_header``: see :func:`forwarded_metadata`."""
    forwarder = Forwarder(routes, author_header)
    app = ForwardingGrpcWeb(fallback, enable_cors=False)
    app.add_generic_rpc_handlers([forwarder])
    return app, forwarder


def describe(routes: Mapping[str, str]) -> Sequence[str]:
    out = []
    for svc, target in sorted(routes.items()):
        policy = POLICIES.get(svc)
        only = ", ".join(sorted(policy.methods)) if policy else "EVERY method (no policy)"
        out.append(f"{svc} -> {target} ({only})")
    return out
