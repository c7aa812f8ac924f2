"""The KPIs as Prometheus metrics (every name the alert rules may use is defined here).

Counters and the wait-time histogram count *live* events only (see :mod:`crm_bilog.kpi`
for why); gauges are read at scrape time from the partitions' states, summed over the
partitions this process owns (sum them over replicas in PromQL). Label ``business_line``
is the line's name (``SALE``, ``AFTER_SALE``, ``FINANCE``, ``LINE_<n>``).
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from crm_bilog.kpi.domain import Count, Gauges, Observation, WaitSample

__all__ = ["CATEGORIES", "PRESENCES", "WAIT_BUCKETS", "KpiMetrics"]

WAIT_BUCKETS: tuple[float, ...] = (
    1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 86400,
)  # fmt: skip
"""Wait-time buckets in seconds: 1 s .. 1 day."""
CATEGORIES = ("NEW_CLUE", "REVISIT", "FAILED_ORDER")
PRESENCES = ("OFFLINE", "IDLE", "BUSY", "BREAK")

GaugeSource = Callable[[], Sequence[tuple[str, Gauges]]]
"""``[(topic, gauges of one partition)]`` of the partitions owned now."""


class KpiMetrics:
    """Registers the KPI metrics on ``registry``; ``observe()`` exports live
    observations, ``count_event()`` the consumer's own accounting."""

    def __init__(self, registry: CollectorRegistry, gauges: GaugeSource) -> None:
        self.registry = registry
        self.transitions = Counter(
            "crm_kpi_task_transitions_total",
            "Distinct task transitions (replays deduped), by business line and new status.",
            ["business_line", "to_status"],
            registry=registry,
        )
        self.handled = Counter(
            "crm_kpi_tasks_handled_total",
            "Tasks completed, by business line and category.",
            ["business_line", "category"],
            registry=registry,
        )
        self.recycled = Counter(
            "crm_kpi_tasks_recycled_total",
            "Tasks recycled (offer rejected or timed out), by business line and reason.",
            ["business_line", "reason"],
            registry=registry,
        )
        self.calls = Counter(
            "crm_kpi_calls_total",
            "Call records, by business line, call type and call tag (outcome).",
            ["business_line", "call_type", "call_tag"],
            registry=registry,
        )
        self.failed_events = Counter(
            "crm_kpi_failed_events_total",
            "Bad rows (events bilog rejected) on the failed-events topic, by schema.",
            ["schema"],
            registry=registry,
        )
        self.wait = Histogram(
            "crm_kpi_task_wait_seconds",
            "Event time from a task entering a queue (created or recycled) to its offer.",
            ["business_line", "category"],
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.events = Counter(
            "crm_kpi_events_total",
            "Records consumed (history replay included), by topic and outcome "
            "(applied, duplicate, late, unreadable, unknown_schema).",
            ["topic", "outcome"],
            registry=registry,
        )
        registry.register(_GaugeCollector(gauges))

    def observe(self, observations: Iterable[Observation]) -> None:
        for obs in observations:
            if isinstance(obs, WaitSample):
                self.wait.labels(obs.line, obs.category).observe(obs.seconds)
            else:
                self._count(obs)

    def _count(self, obs: Count) -> None:
        if obs.name == "transitions":
            self.transitions.labels(*obs.labels).inc()
        elif obs.name == "handled":
            self.handled.labels(*obs.labels).inc()
        elif obs.name == "recycled":
            self.recycled.labels(*obs.labels).inc()
        elif obs.name == "calls":
            self.calls.labels(*obs.labels).inc()
        else:
            self.failed_events.labels(*obs.labels).inc()

    def count_event(self, topic: str, outcome: str, n: int = 1) -> None:
        self.events.labels(topic, outcome).inc(n)


class _GaugeCollector(Collector):
    """Gauges computed from the partitions' states at scrape time."""

    def __init__(self, source: GaugeSource) -> None:
        self._source = source

    def describe(self) -> Iterable[Metric]:
        return list(self._families())  # names for the registry's duplicate check

    def collect(self) -> Iterable[Metric]:
        return list(self._families(self._source()))

    def _families(self, parts: Sequence[tuple[str, Gauges]] = ()) -> Iterator[Metric]:
        waiting: Tally[tuple[str, str]] = Tally()
        open_tasks: Tally[tuple[str, str, str]] = Tally()
        agents: Tally[tuple[str, str]] = Tally()
        offers: Tally[str] = Tally()
        recycles: Tally[str] = Tally()
        oldest: dict[str, int] = {}
        watermark: dict[str, int] = {}
        lines: set[str] = set()
        agent_lines: set[str] = set()
        for topic, g in parts:
            waiting.update(g.waiting)
            open_tasks.update(g.open_tasks)
            agents.update(g.agents)
            offers.update(g.window_offers)
            recycles.update(g.window_recycles)
            for line, ms in g.oldest_wait_started_ms.items():
                oldest[line] = min(oldest.get(line, ms), ms)
            if g.watermark_ms is not None:
                watermark[topic] = max(watermark.get(topic, g.watermark_ms), g.watermark_ms)
            lines.update(k[0] for k in g.open_tasks)
            lines.update(g.window_offers)
            agent_lines.update(k[0] for k in g.agents)

        fam = GaugeMetricFamily(
            "crm_kpi_tasks_waiting",
            "Tasks waiting in a queue for an offer now (UNASSIGNED or RECYCLED).",
            labels=["business_line", "category"],
        )
        for line in sorted(lines | agent_lines):
            for category in CATEGORIES:
                fam.add_metric([line, category], waiting.get((line, category), 0))
        yield fam
        fam = GaugeMetricFamily(
            "crm_kpi_tasks_open",
            "Tasks not finished, by business line, category and current status.",
            labels=["business_line", "category", "status"],
        )
        for (line, category, status), n in sorted(open_tasks.items()):
            fam.add_metric([line, category, status], n)
        yield fam
        fam = GaugeMetricFamily(
            "crm_kpi_oldest_waiting_task_timestamp_seconds",
            "When the longest-waiting task (REVISIT excluded) entered its queue, Unix "
            "seconds (event time); absent when none waits. Age: time() - this.",
            labels=["business_line"],
        )
        for line, ms in sorted(oldest.items()):
            fam.add_metric([line], ms / 1000)
        yield fam
        fam = GaugeMetricFamily(
            "crm_kpi_agents",
            "Agents by business line and latest presence.",
            labels=["business_line", "presence"],
        )
        for line in sorted(agent_lines | lines):
            for presence in PRESENCES:
                fam.add_metric([line, presence], agents.get((line, presence), 0))
        yield fam
        for name, tally, what in (
            ("crm_kpi_window_offers", offers, "Offers"),
            ("crm_kpi_window_recycles", recycles, "Recycles"),
        ):
            fam = GaugeMetricFamily(
                name,
                f"{what} in the last kpi_window_s of event time (recycle rate = "
                "recycles / offers; rebuilt after a restart).",
                labels=["business_line"],
            )
            for line in sorted(lines):
                fam.add_metric([line], tally.get(line, 0))
            yield fam
        fam = GaugeMetricFamily(
            "crm_kpi_watermark_timestamp_seconds",
            "Highest event time consumed per topic, Unix seconds (pipeline freshness).",
            labels=["topic"],
        )
        for topic, ms in sorted(watermark.items()):
            fam.add_metric([topic], ms / 1000)
        yield fam
