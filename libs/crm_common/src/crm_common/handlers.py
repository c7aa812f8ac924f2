"""gRPC method handlers taken apart: the behaviour a handler runs, and the factory that
makes a handler of the same kind (unary/stream in and out, the same serializers) around
another behaviour. The server interceptor and the tracing wrapper both rebuild handlers."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    _Handler = grpc.RpcMethodHandler[Any, Any]

__all__ = ["handler_parts"]


def handler_parts(handler: _Handler) -> tuple[Any, Callable[..., _Handler]]:
    """``(behaviour, make)``: ``make(new_behaviour, request_deserializer=...,
    response_serializer=...)`` builds a handler of ``handler``'s kind."""
    if handler.request_streaming and handler.response_streaming:
        return handler.stream_stream, grpc.stream_stream_rpc_method_handler
    if handler.request_streaming:
        return handler.stream_unary, grpc.stream_unary_rpc_method_handler
    if handler.response_streaming:
        return handler.unary_stream, grpc.unary_stream_rpc_method_handler
    return handler.unary_unary, grpc.unary_unary_rpc_method_handler
