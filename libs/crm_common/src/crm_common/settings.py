"""Settings every service shares, read from ``CRM_<SVC>_<SETTING>`` environment variables.

A service subclasses :class:`ServiceSettings`, sets its env prefix and default port
and adds its own fields::

    class Settings(ServiceSettings):
        model_config = SettingsConfigDict(env_prefix="CRM_ASSIGNMENT_")
        port: int = Field(default=50061, description="gRPC port; 0 picks a free one.")
        mysql_url: str = Field(description="SQLAlchemy URL of the assignment database.")
"""

from __future__ import annotations

import os
import socket
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["LogLevel", "ServiceSettings", "parse_endpoints"]

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


def _default_instance_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def parse_endpoints(value: str) -> list[tuple[str, int]]:
    """``"a:2379, b:2379"`` -> ``[("a", 2379), ("b", 2379)]``; ``[::1]:2379`` works too."""
    endpoints: list[tuple[str, int]] = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"endpoint {item!r} is not host:port")
        endpoints.append((host.removeprefix("[").removesuffix("]"), int(port)))
    if not endpoints:
        raise ValueError("at least one host:port endpoint is needed")
    return endpoints


class ServiceSettings(BaseSettings):
    """Common settings of a gRPC service (subclasses set ``env_prefix="CRM_<SVC>_"``)."""

    model_config = SettingsConfigDict(env_prefix="CRM_", extra="ignore", validate_default=True)

    host: str = Field(
        default="0.0.0.0",
        description="Address the gRPC server binds (0.0.0.0 in containers, 127.0.0.1 in tests).",
    )
    port: int = Field(default=50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int = Field(
        default=9464,
        ge=-1,
        le=65535,
        description="Prometheus /metrics HTTP port; 0 picks a free one, -1 disables it.",
    )
    log_level: LogLevel = Field(default="INFO", description="Root log level.")
    shutdown_grace_s: float = Field(
        default=10.0,
        ge=0,
        description="On SIGTERM, how long in-flight calls may finish before being cancelled.",
    )
    shutdown_delay_s: float = Field(
        default=0.0,
        ge=0,
        description="On SIGTERM, how long to keep serving after health turned NOT_SERVING, "
        "so load balancers stop routing here before new calls are refused.",
    )
    readiness_interval_s: float = Field(
        default=2.0, gt=0, description="How often the readiness checks run."
    )
    readiness_timeout_s: float = Field(
        default=1.0, gt=0, description="How long one readiness check may take before failing."
    )
    etcd_endpoints: str = Field(
        default="127.0.0.1:2379",
        description="etcd endpoints of the live configuration, comma-separated host:port.",
    )
    config_prefix: str = Field(
        default="/crm/config", description="etcd key prefix the live configuration lives under."
    )
    instance_name: str = Field(
        default_factory=_default_instance_name,
        min_length=1,
        description="Name of this process in logs, leases and metrics (default host-pid).",
    )

    tracing_exporter: Literal["none", "console", "otlp"] = Field(
        default="none",
        description="OpenTelemetry tracing of gRPC calls: none (off, no cost), console "
        "(spans as JSON on stdout) or otlp (OTLP/gRPC to an OpenTelemetry Collector).",
    )
    tracing_otlp_endpoint: str = Field(
        default="",
        description="OTLP/gRPC endpoint of the collector (e.g. http://otel-collector:4317); "
        "empty: the exporter's OTEL_EXPORTER_OTLP_* variables or its default.",
    )
    tracing_sample_ratio: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="Share of new traces sampled; a call continuing a trace follows the "
        "caller's decision.",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("port", "metrics_port")
    @classmethod
    def _check_port(cls, value: int, info: ValidationInfo) -> int:
        # Also guards subclasses that redeclare ``port`` with a bare default.
        lowest = -1 if info.field_name == "metrics_port" else 0
        if not lowest <= value <= 65535:
            raise ValueError(f"must be {lowest}..65535")
        return value

    @field_validator("etcd_endpoints")
    @classmethod
    def _check_endpoints(cls, value: str) -> str:
        parse_endpoints(value)
        return value

    @property
    def etcd_endpoint_list(self) -> list[tuple[str, int]]:
        """``etcd_endpoints`` as ``(host, port)`` pairs."""
        return parse_endpoints(self.etcd_endpoints)

    @property
    def metrics_enabled(self) -> bool:
        """False when ``metrics_port`` is -1."""
        return self.metrics_port >= 0
