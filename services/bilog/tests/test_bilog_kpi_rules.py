"""charts/crm/files/prometheus-rules.yaml: valid rule groups, valid PromQL, and every
metric (and label matcher) an expr uses is one the code exports or a rule records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import promql_parser
import pytest
import yaml
from crm_bilog.kpi.domain import (
    AgentPresence,
    CallRecord,
    FailedEventRecord,
    PartitionKpis,
    TaskTransition,
)
from crm_bilog.kpi.metrics import KpiMetrics
from crm_common.metrics import RpcMetrics
from prometheus_client import CollectorRegistry

RULES = Path(__file__).resolve().parents[3] / "charts" / "crm" / "files" / "prometheus-rules.yaml"
T0 = 1_763_800_000_000


def exported_series() -> dict[str, set[str]]:
    """Sample name -> label names, from the real exporter fed with a real KPI state."""
    kpis = PartitionKpis()
    events: list[Any] = [
        TaskTransition(1, 1, "NEW_CLUE", None, "UNASSIGNED", None, "created", T0),
        TaskTransition(1, 1, "NEW_CLUE", "UNASSIGNED", "ASSIGNED", 7, "offered", T0 + 10),
        TaskTransition(1, 1, "NEW_CLUE", "ASSIGNED", "RECYCLED", 7, "timed_out", T0 + 20),
        TaskTransition(2, 1, "NEW_CLUE", None, "UNASSIGNED", None, "created", T0),
        TaskTransition(2, 1, "NEW_CLUE", "UNASSIGNED", "ASSIGNED", 8, "offered", T0 + 5),
        TaskTransition(2, 1, "NEW_CLUE", "ASSIGNED", "IN_PROGRESS", 8, "accepted", T0 + 6),
        TaskTransition(2, 1, "NEW_CLUE", "IN_PROGRESS", "COMPLETED", 8, "completed", T0 + 9),
        AgentPresence(7, 1, None, "IDLE", T0),
        CallRecord(1, "b", "CALLOUT", "reached", "ZT", "r", T0),
        FailedEventRecord("f", "crm.bi.TaskTransition", 0, T0),
    ]
    registry = CollectorRegistry()
    metrics = KpiMetrics(registry, lambda: [("bi.task_transition", kpis.gauges())])
    for ev in events:
        metrics.observe(kpis.apply(ev))
    metrics.count_event("bi.task_transition", "applied")
    rpc = RpcMetrics("bilog-kpi", registry=registry)
    rpc.call_finished("/pkg.S/M", grpc.StatusCode.OK, 0.01)
    series: dict[str, set[str]] = {}
    for family in registry.collect():
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def load_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    assert set(doc) == {"groups"}
    groups = doc["groups"]
    assert isinstance(groups, list)
    assert groups
    names = [g["name"] for g in groups]
    assert len(names) == len(set(names)), "group names must be unique"
    rules = []
    for group in groups:
        assert set(group) <= {"name", "interval", "rules", "limit"}
        assert group["rules"]
        rules.extend(group["rules"])
    return rules


def selectors(expr: str) -> list[tuple[str | None, list[str]]]:
    """(metric name, label names matched) of every vector selector in ``expr``."""
    found: list[tuple[str | None, list[str]]] = []

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            found.append((node.name, [m.name for m in node.matchers.matchers]))
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def unknown(expr: str, series: dict[str, set[str]], recorded: set[str]) -> list[str]:
    """What in ``expr`` names a metric or label nobody exports."""
    problems = []
    for name, labels in selectors(expr):
        if name is None:
            problems.append("selector without a metric name")
        elif name in recorded:
            continue
        elif name not in series:
            problems.append(f"metric {name}")
        else:
            problems += [f"label {name}{{{lb}}}" for lb in labels if lb not in series[name]]
    return problems


def test_every_rule_is_well_formed_promql() -> None:
    for rule in load_rules():
        assert ("record" in rule) != ("alert" in rule), rule
        assert isinstance(rule["expr"], str)
        promql_parser.parse(rule["expr"])  # raises on a syntax error
        if "alert" in rule:
            assert rule["labels"]["severity"] in {"info", "warning", "critical"}
            assert rule["annotations"]["summary"]
            assert rule["annotations"]["description"]
            if "for" in rule:
                promql_parser.parse_duration(rule["for"])
        else:
            assert set(rule) <= {"record", "expr", "labels"}
            assert ":" in rule["record"], "recording rules are named level:metric:operations"


def test_every_metric_in_the_rules_is_exported() -> None:
    series = exported_series()
    rules = load_rules()
    recorded = {r["record"] for r in rules if "record" in r}
    problems = {r.get("alert") or r["record"]: unknown(r["expr"], series, recorded) for r in rules}
    assert {k: v for k, v in problems.items() if v} == {}
    used = {name for r in rules for name, _ in selectors(r["expr"])}
    assert used - recorded, "the rules must read exported metrics"
    # the four alerts are there
    alerts = {r["alert"] for r in rules if "alert" in r}
    assert {
        "CrmTaskWaitP90High",
        "CrmRecycleRateSpike",
        "CrmNoIdleAgentWhileTasksWait",
        "CrmBiFailedEvents",
    } <= alerts


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("rate(crm_kpi_tasks_handeld_total[5m]) > 0", "metric crm_kpi_tasks_handeld_total"),
        ('crm_kpi_tasks_waiting{line="SALE"} > 0', "label crm_kpi_tasks_waiting{line}"),
        ('{__name__="crm_kpi_agents"}', "selector without a metric name"),
    ],
)
def test_the_check_catches_unknown_names(expr: str, problem: str) -> None:
    assert unknown(expr, exported_series(), set()) == [problem]
