"""Root conftest: shared fixtures over the real local stack (see crm_devstack), and
tracing into memory for the tests that follow spans."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from crm_common import tracing
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

pytest_plugins = ["crm_devstack.pytest_plugin"]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on in this process for one test (every in-process service), its spans kept
    in memory by the OpenTelemetry SDK's exporter."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        yield exporter
    finally:
        tracing.uninstall()
        provider.shutdown()
