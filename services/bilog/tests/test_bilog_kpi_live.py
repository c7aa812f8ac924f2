"""The KPI consumer end to end: events logged through the bilog service (validation, PII,
wire format, the real Tansu broker, the dev registry) are read by ``crm_bilog kpi`` and
scraped from its /metrics port; a restart rebuilds the gauges and counts only new events."""

from __future__ import annotations

import asyncio
import time
import urllib.request
import uuid
from typing import Any

import grpc
from crm_bilog.app import App
from crm_bilog.client import BiEvent, BilogClient
from crm_bilog.kpi.app import KPI_HEALTH_NAME, build_kpi_app
from crm_bilog.settings import BilogSettings
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

T0 = 1_763_800_000_000
TT = "crm.bi.TaskTransition"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def transition(
    task: int, frm: str | None, to: str, at_s: float, *, line: int = 1, reason: str = ""
) -> BiEvent:
    return BiEvent(
        TT,
        {
            "task_id": task,
            "business_line": line,
            "category": "NEW_CLUE",
            "from_status": frm,
            "to_status": to,
            "agent_id": 40 + task,
            "reason": reason,
            "at": T0 + int(at_s * 1000),
        },
    )


def presence(agent: int, to: str, at_s: float, line: int = 1) -> BiEvent:
    return BiEvent(
        "crm.bi.AgentPresenceChanged",
        {
            "agent_id": agent,
            "business_line": line,
            "from_presence": None,
            "to_presence": to,
            "at": T0 + int(at_s * 1000),
        },
    )


def call(i: int, tag: str, line: int = 1) -> BiEvent:
    return BiEvent(
        "crm.bi.FactCallRecord",
        {
            "business_line": line,
            "bundle_id": f"task-{i}",
            "call_type": "CALLOUT",
            "contact_phone": "13812345678",
            "call_tag_id": tag,
            "provider_type": "ZT",
            "operator_header": {
                "timestamp": T0 + i * 1000,
                "http_host": "console.local",
                "request_id": f"req-{i}",
                "operator_id": 7,
            },
        },
    )


def first_wave() -> list[BiEvent]:
    """SALE: task 1 waits 20 s, is handled; task 2 waits 8 s, times out, is recycled and
    waits again; AFTER_SALE: task 3 waits. Two SALE agents busy, one AFTER_SALE idle."""
    return [
        transition(1, None, "UNASSIGNED", 0, reason="created"),
        transition(1, "UNASSIGNED", "ASSIGNED", 20, reason="offered"),
        transition(1, "ASSIGNED", "IN_PROGRESS", 25, reason="accepted"),
        transition(1, "IN_PROGRESS", "COMPLETED", 90, reason="completed"),
        transition(2, None, "UNASSIGNED", 2, reason="created"),
        transition(2, "UNASSIGNED", "ASSIGNED", 10, reason="offered"),
        transition(2, "ASSIGNED", "RECYCLED", 40, reason="timed_out"),
        transition(3, None, "UNASSIGNED", 5, line=2, reason="created"),
        presence(41, "IDLE", 0),
        presence(41, "BUSY", 20),
        presence(42, "BUSY", 10),
        presence(43, "IDLE", 3, line=2),
        call(1, "reached"),
        call(2, "no_answer"),
    ]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


SALE = (("business_line", "SALE"),)
SALE_NEW = (*SALE, ("category", "NEW_CLUE"))
AFTER_SALE_NEW = (("business_line", "AFTER_SALE"), ("category", "NEW_CLUE"))
SALE_OUT = (*SALE, ("call_type", "CALLOUT"))
CALLS, HANDLED = "crm_kpi_calls_total", "crm_kpi_tasks_handled_total"
RECYCLED = "crm_kpi_tasks_recycled_total"
WAITING, AGENTS, EVENTS = "crm_kpi_tasks_waiting", "crm_kpi_agents", "crm_kpi_events_total"


async def until_all(
    port: int, expected: dict[tuple[str, tuple[tuple[str, str], ...]], float], what: str
) -> None:
    """Until every expected sample has its value (a missing sample reads 0); partitions
    are consumed in no particular order, so nothing is asserted before all match."""

    def mismatches(s: Samples) -> dict[str, tuple[float, float]]:
        out = {}
        for (name, labels), want in expected.items():
            got = s.get((name, tuple(sorted(labels))), 0.0)
            if got != want:
                out[f"{name}{dict(labels)}"] = (got, want)
        return out

    deadline = time.monotonic() + 60
    while True:
        bad = mismatches(await asyncio.to_thread(scrape, port))
        if not bad:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: (got, wanted) {bad}")
        await asyncio.sleep(0.2)


async def serving(target: str, timeout: float = 30) -> None:
    """Until health reports the KPI consumer SERVING (its history replayed)."""
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=KPI_HEALTH_NAME))
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            assert time.monotonic() < deadline, "the KPI consumer never reported SERVING"
            await asyncio.sleep(0.05)


async def log_all(client: BilogClient, events: list[BiEvent]) -> list[Any]:
    results = await client.log_batch(events)
    return [r for r in results if not r.accepted]


async def test_kpis_from_the_event_stream_survive_a_restart(
    app: App, settings: BilogSettings
) -> None:
    kpi_settings = settings.model_copy(
        update={
            "kpi_port": 0,
            "kpi_metrics_port": 0,
            "kpi_group_id": f"kpi-{uuid.uuid4().hex[:8]}",
            "kpi_session_timeout_ms": 3000,
        }
    )
    async with BilogClient(app.target) as client:
        assert await log_all(client, first_wave()) == []
        # AFTER_SALE task 4 reaches the broker in reverse order (one call per event)
        for event in reversed(
            [
                transition(4, None, "UNASSIGNED", 10, line=2, reason="created"),
                transition(4, "UNASSIGNED", "ASSIGNED", 17, line=2, reason="offered"),
                transition(4, "ASSIGNED", "IN_PROGRESS", 18, line=2, reason="accepted"),
                transition(4, "IN_PROGRESS", "COMPLETED", 30, line=2, reason="completed"),
            ]
        ):
            assert await log_all(client, [event]) == []
        # at-least-once: the outbox sends part of the wave again
        assert await log_all(client, first_wave()[:7]) == []
        # a bad row (no to_status) goes to the failed-events topic
        bad = BiEvent(TT, {"task_id": 9, "business_line": 1, "at": T0})
        assert len(await log_all(client, [bad])) == 1

        kpi = build_kpi_app(kpi_settings)
        async with kpi:
            await kpi.wait_ready(60)
            port = kpi.server.metrics_port
            assert port is not None
            await serving(kpi.target)

            tt_topic = f"{settings.topic_prefix}task_transition"
            # deduped: the resent events are not counted twice
            await until_all(
                port,
                {
                    ("crm_kpi_failed_events_total", (("schema", TT),)): 1,
                    (CALLS, (*SALE_OUT, ("call_tag", "no_answer"))): 1,
                    (CALLS, (*SALE_OUT, ("call_tag", "reached"))): 1,
                    (RECYCLED, (*SALE, ("reason", "timed_out"))): 1,
                    (HANDLED, SALE_NEW): 1,
                    ("crm_kpi_task_transitions_total", (*SALE, ("to_status", "ASSIGNED"))): 2,
                    ("crm_kpi_task_wait_seconds_count", SALE_NEW): 2,
                    ("crm_kpi_task_wait_seconds_sum", SALE_NEW): 28.0,  # 20 + 8
                    ("crm_kpi_task_wait_seconds_bucket", (*SALE_NEW, ("le", "15.0"))): 1,
                    (WAITING, SALE_NEW): 1,  # task 2, recycled
                    (WAITING, AFTER_SALE_NEW): 1,  # task 3; task 4 is done
                    (HANDLED, AFTER_SALE_NEW): 1,
                    ("crm_kpi_task_wait_seconds_sum", AFTER_SALE_NEW): 7.0,  # 10 s -> 17 s
                    ("crm_kpi_task_wait_seconds_count", AFTER_SALE_NEW): 1,
                    (AGENTS, (*SALE, ("presence", "BUSY"))): 2,
                    (AGENTS, (*SALE, ("presence", "IDLE"))): 0,
                    (AGENTS, (("business_line", "AFTER_SALE"), ("presence", "IDLE"))): 1,
                    ("crm_kpi_window_offers", SALE): 2,
                    ("crm_kpi_window_recycles", SALE): 1,
                    ("crm_kpi_oldest_waiting_task_timestamp_seconds", SALE): (T0 + 40_000) / 1000,
                    (EVENTS, (("outcome", "duplicate"), ("topic", tt_topic))): 7,
                },
                "the first wave",
            )

        # while the consumer is down: task 2 is offered again, accepted and completed
        second = [
            transition(2, "RECYCLED", "ASSIGNED", 52, reason="offered"),
            transition(2, "ASSIGNED", "IN_PROGRESS", 55, reason="accepted"),
            transition(2, "IN_PROGRESS", "COMPLETED", 99, reason="completed"),
        ]
        assert await log_all(client, second) == []

        restarted = build_kpi_app(kpi_settings)
        async with restarted:
            await restarted.wait_ready(60)
            port = restarted.server.metrics_port
            assert port is not None
            # counters count only what the previous process had not: one completion,
            # one wait (recycled at 40 s, offered at 52 s), no recycle, no call, no bad row;
            # gauges are rebuilt from the history
            await until_all(
                port,
                {
                    (HANDLED, SALE_NEW): 1,
                    ("crm_kpi_task_wait_seconds_count", SALE_NEW): 1,
                    ("crm_kpi_task_wait_seconds_sum", SALE_NEW): 12.0,
                    (RECYCLED, (*SALE, ("reason", "timed_out"))): 0,
                    ("crm_kpi_failed_events_total", (("schema", TT),)): 0,
                    (CALLS, (*SALE_OUT, ("call_tag", "reached"))): 0,
                    (WAITING, SALE_NEW): 0,
                    (WAITING, AFTER_SALE_NEW): 1,
                    (AGENTS, (*SALE, ("presence", "BUSY"))): 2,
                    ("crm_kpi_window_offers", SALE): 3,
                },
                "the second wave",
            )
