"""The demo report's checks fail loudly: the KPI cross-checks never skip when the KPI
consumer runs (an unreachable or empty /metrics is a FAIL), and the KPI figures are read
from a real Prometheus exposition of the KPI consumer's metrics."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import ThreadingHTTPServer

import pytest
from crm_bilog.kpi.domain import Count, WaitSample
from crm_bilog.kpi.metrics import KpiMetrics
from crm_devstack import free_port
from crm_tools.day import SALE, DayLog
from crm_tools.day_report import (
    KPI_CHECKS,
    DayFacts,
    TaskFacts,
    _checks,
    wait_kpis,
)
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import MetricsHandler

KPI_NAMES = [name for name, _, _ in KPI_CHECKS]


def _facts(kpi_url: str) -> DayFacts:
    task = TaskFacts(
        id=1, line="SALE", category="NEW_CLUE", status="COMPLETED", recycles=1, wait_s=1.0,
        transitions=[], calls=1, offers=2, accepts=1, timeouts=1,
    )  # fmt: skip
    facts = DayFacts(tasks=[task], kpi_url=kpi_url)
    facts.jobs = Counter({("assignment.expire-offer", "SUCCEEDED"): 2})
    facts.bi_unique = {"FactCallRecord": {("b", "t", 1)}}
    return facts


def _log() -> DayLog:
    log = DayLog(drained=True, ring_outs=1)
    log.completed[SALE] += 1
    log.calls[SALE] += 1
    return log


def _run_checks(facts: DayFacts) -> dict[str, tuple[bool, str]]:
    _checks(facts, _log(), Counter())
    return {c.name: (c.ok, c.detail) for c in facts.checks}


@pytest.fixture
def metrics() -> Iterator[tuple[KpiMetrics, str]]:
    registry = CollectorRegistry()
    kpi = KpiMetrics(registry, lambda: [])
    server = ThreadingHTTPServer(("127.0.0.1", 0), MetricsHandler.factory(registry))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield kpi, f"http://127.0.0.1:{server.server_address[1]}/metrics"
    finally:
        server.shutdown()
        server.server_close()


def test_unreachable_kpis_fail_every_kpi_check() -> None:
    facts = _facts(f"http://127.0.0.1:{free_port()}/metrics")
    facts.kpis, facts.kpi_error = asyncio.run(wait_kpis(facts.kpi_url, facts, deadline=1.5))
    assert facts.kpis == {}
    assert "failed" in facts.kpi_error
    checks = _run_checks(facts)
    for name in KPI_NAMES:
        ok, detail = checks[name]
        assert not ok, name
        assert "failed" in detail
    assert not facts.ok


def test_kpis_without_the_consumer_are_not_checked() -> None:
    checks = _run_checks(_facts(""))
    assert not set(KPI_NAMES) & set(checks)
    ok, detail = checks[
        "one expire-offer job per offer; every offer accepted or timed out and recycled"
    ]
    assert ok, detail


def test_kpis_scraped_from_the_consumers_metrics(metrics: tuple[KpiMetrics, str]) -> None:
    kpi, url = metrics
    facts = _facts(url)
    kpi.observe(
        [
            Count("handled", ("SALE", "NEW_CLUE")),
            Count("recycled", ("SALE", "TIMED_OUT")),
            Count("calls", ("SALE", "CALLOUT", "CONNECTED")),
            WaitSample("SALE", "NEW_CLUE", 3.0),
        ]
    )  # one wait sample short: the histogram check fails, the others pass
    facts.kpis, facts.kpi_error = asyncio.run(wait_kpis(url, facts, deadline=1.5))
    assert facts.kpi_error == ""
    checks = _run_checks(facts)
    ok, detail = checks["realtime KPI wait-time histogram has one sample per offer"]
    assert not ok
    assert "crm_kpi_task_wait_seconds SALE: KPI 1, expected 2" in detail
    for name in KPI_NAMES:
        if "histogram" not in name:
            assert checks[name][0], (name, checks[name])
    kpi.observe([WaitSample("SALE", "NEW_CLUE", 5.0)])
    facts = _facts(url)
    facts.kpis, facts.kpi_error = asyncio.run(wait_kpis(url, facts, deadline=5))
    checks = _run_checks(facts)
    assert all(checks[name][0] for name in KPI_NAMES), checks
