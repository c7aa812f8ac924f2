"""Prometheus metrics of a gRPC server, on a registry of its own.

No module-level metrics: each :class:`RpcMetrics` owns a ``CollectorRegistry``, so
several servers in one process (tests) do not clash. Services add their own metrics
to ``metrics.registry``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

__all__ = ["DEFAULT_BUCKETS", "RpcMetrics", "split_method"]

DEFAULT_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Handling-time buckets in seconds: 0.5 ms .. 10 s."""


def split_method(full_method: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` -> ``("pkg.Service", "Method")``."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


@dataclass(slots=True)
class _MethodChildren:
    """The labelled children of one method's metrics."""

    in_flight: Gauge
    handling_seconds: Histogram
    handled: dict[grpc.StatusCode, Counter] = field(default_factory=dict)


class RpcMetrics:
    """Per-call counter, latency histogram and in-flight gauge, labelled by ``service``
    (the CRM service, e.g. ``assignment``), ``grpc_service`` and ``grpc_method``."""

    def __init__(
        self,
        service: str,
        registry: CollectorRegistry | None = None,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        self.service = service
        self.registry = CollectorRegistry() if registry is None else registry
        labels = ["service", "grpc_service", "grpc_method"]
        self.handled = Counter(
            "crm_grpc_server_handled_total",
            "RPCs completed on the server, by status code.",
            [*labels, "grpc_code"],
            registry=self.registry,
        )
        self.handling_seconds = Histogram(
            "crm_grpc_server_handling_seconds",
            "Time from the handler's start to its end.",
            labels,
            buckets=buckets,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "crm_grpc_server_in_flight",
            "RPCs being handled now.",
            labels,
            registry=self.registry,
        )
        self._http: tuple[WSGIServer, threading.Thread] | None = None
        self._by_method: dict[str, _MethodChildren] = {}

    def call_started(self, full_method: str) -> None:
        """Counts a call as in flight."""
        self._children(full_method).in_flight.inc()

    def call_finished(self, full_method: str, code: grpc.StatusCode, seconds: float) -> None:
        """Records a finished call (ends its in-flight count)."""
        children = self._children(full_method)
        children.in_flight.dec()
        handled = children.handled.get(code)
        if handled is None:
            handled = children.handled[code] = self.handled.labels(
                self.service, *split_method(full_method), code.name
            )
        handled.inc()
        children.handling_seconds.observe(seconds)

    def _children(self, full_method: str) -> _MethodChildren:
        """The labelled metrics of one method, looked up once (``labels()`` validates,
        locks and builds its key on every call: a cost on every RPC)."""
        children = self._by_method.get(full_method)
        if children is None:
            labels = (self.service, *split_method(full_method))
            children = _MethodChildren(
                in_flight=self.in_flight.labels(*labels),
                handling_seconds=self.handling_seconds.labels(*labels),
            )
            self._by_method[full_method] = children
        return children

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)

    def start_http_server(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serves ``/metrics`` from a daemon thread; ``port`` 0 picks a free one.

        Returns the bound port.
        """
        if self._http is not None:
            raise RuntimeError("metrics HTTP server already started")
        server, thread = start_http_server(port, addr=addr, registry=self.registry)
        self._http = (server, thread)
        return int(server.server_port)

    def stop_http_server(self) -> None:
        """Stops the HTTP server (blocks up to ~0.5 s); no-op when not started."""
        if self._http is None:
            return
        server, thread = self._http
        self._http = None
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
