"""Structured logs: one JSON object per line, with service, method and request id.

``configure_logging`` is called once by a service's ``__main__``; the server
interceptor sets :data:`request_id_var` and :data:`method_var` for each call, so every
line logged while handling it (also from :class:`crm_common.aio.BlockingExecutor`
threads) carries them. With tracing on (:mod:`crm_common.tracing`) a line logged inside
a span also carries ``trace_id`` and ``span_id`` (W3C hex, as the tracing backend shows
them), so a trace leads to its log lines and back; with tracing off there is no span and
no such field.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Any

from opentelemetry import trace

__all__ = ["JsonFormatter", "configure_logging", "method_var", "request_id_var"]

request_id_var: ContextVar[str | None] = ContextVar("crm_request_id", default=None)
"""Request id of the call being handled (``x-request-id``)."""

method_var: ContextVar[str | None] = ContextVar("crm_method", default=None)
"""Full gRPC method of the call being handled (``/pkg.Service/Method``)."""

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRS = frozenset(logging.LogRecord("", logging.INFO, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line: ts, level, logger, msg, service, request_id,
    method, trace_id/span_id (inside a span), the record's ``extra=`` fields, then
    ``exc``/``stack`` text when present."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        payload: dict[str, Any] = {
            "ts": ts.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "service": self.service,
        }
        request_id = request_id_var.get()
        if request_id is not None:
            payload["request_id"] = request_id
        method = method_var.get()
        if method is not None:
            payload["method"] = method
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            payload["trace_id"] = format(span.trace_id, "032x")
            payload["span_id"] = format(span.span_id, "016x")
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                payload.setdefault(key, value)
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            payload["exc"] = record.exc_text
        if record.stack_info:
            payload["stack"] = self.formatStack(record.stack_info)
        return json.dumps(payload, ensure_ascii=False, default=str)


class _CrmHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler ``configure_logging`` installed, so a second call replaces it."""


def configure_logging(service: str, level: str = "INFO", stream: IO[str] | None = None) -> None:
    """Sends the root logger's records to ``stream`` (default stderr) as JSON lines.

    Idempotent: a second call replaces the handler installed by the first one. Handlers
    installed by others (e.g. pytest's capture) are left alone.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _CrmHandler):
            root.removeHandler(handler)
            handler.close()
    handler = _CrmHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter(service))
    root.addHandler(handler)
    root.setLevel(level.upper())
