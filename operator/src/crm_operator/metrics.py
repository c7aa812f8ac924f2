"""Prometheus metrics of the operator, on a registry of its own (no module-level metrics)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

__all__ = ["OperatorMetrics"]


@dataclass
class OperatorMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.reconciles = Counter(
            "crm_operator_reconciles", "Reconciles by kind and result.", ["kind", "result"],
            registry=r,
        )  # fmt: skip
        self.etcd_writes = Counter(
            "crm_operator_etcd_writes", "CRMConfig writes to etcd.", registry=r
        )
        self.drift_repairs = Counter(
            "crm_operator_drift_repairs", "etcd keys put back after a manual change.", registry=r
        )
        self.rollbacks = Counter("crm_operator_rollbacks", "CRMConfig rollbacks.", registry=r)
        self.task_restarts = Counter(
            "crm_operator_connect_task_restarts", "Failed Kafka Connect tasks restarted.",
            registry=r,
        )  # fmt: skip
        self.connect_errors = Counter(
            "crm_operator_connect_errors", "Failed Kafka Connect REST calls.", ["reason"],
            registry=r,
        )  # fmt: skip
        self.configs = Gauge("crm_operator_crmconfigs", "CRMConfigs handled.", registry=r)
        self._server: tuple[WSGIServer, threading.Thread] | None = None

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve /metrics on ``port`` (0: a free one); returns the port."""
        server, thread = start_http_server(port, addr=addr, registry=self.registry)
        self._server = (server, thread)
        return int(server.server_port)

    def close(self) -> None:
        if self._server is not None:
            server, thread = self._server
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            self._server = None
