"""The pure KPI state machine: event-time folding, dedupe, out-of-order, lateness."""

from __future__ import annotations

import random

import pytest
from crm_bilog.kpi.domain import (
    OTHER_TAG,
    AgentPresence,
    CallRecord,
    Count,
    FailedEventRecord,
    PartitionKpis,
    TaskTransition,
    WaitSample,
    line_name,
)

T0 = 1_763_800_000_000
SALE, AFTER_SALE = 1, 2


def tr(
    task: int,
    frm: str | None,
    to: str,
    at_s: float,
    *,
    line: int = SALE,
    category: str = "NEW_CLUE",
    reason: str = "",
) -> TaskTransition:
    return TaskTransition(task, line, category, frm, to, 7, reason, T0 + int(at_s * 1000))


def life(task: int, *, line: int = SALE, wait_s: float = 10.0) -> list[TaskTransition]:
    """Created, waits ``wait_s``, offered, recycled on timeout, waits 5 s, offered,
    accepted, completed."""
    w = wait_s
    return [
        tr(task, None, "UNASSIGNED", 0, line=line, reason="created"),
        tr(task, "UNASSIGNED", "ASSIGNED", w, line=line, reason="offered"),
        tr(task, "ASSIGNED", "RECYCLED", w + 30, line=line, reason="timed_out"),
        tr(task, "RECYCLED", "ASSIGNED", w + 35, line=line, reason="offered"),
        tr(task, "ASSIGNED", "IN_PROGRESS", w + 40, line=line, reason="accepted"),
        tr(task, "IN_PROGRESS", "COMPLETED", w + 100, line=line, reason="completed"),
    ]


def fold(kpis: PartitionKpis, events: list) -> list:  # type: ignore[type-arg]
    out = []
    for ev in events:
        out.extend(kpis.apply(ev))
    return out


def counts(observations: list, name: str) -> dict[tuple[str, ...], int]:  # type: ignore[type-arg]
    found: dict[tuple[str, ...], int] = {}
    for o in observations:
        if isinstance(o, Count) and o.name == name:
            found[o.labels] = found.get(o.labels, 0) + 1
    return found


def waits(observations: list) -> list[float]:  # type: ignore[type-arg]
    return sorted(o.seconds for o in observations if isinstance(o, WaitSample))


def test_a_task_life_gives_waits_handled_and_recycles() -> None:
    kpis = PartitionKpis()
    out = fold(kpis, life(1, wait_s=12))
    assert waits(out) == [5.0, 12.0]
    assert counts(out, "handled") == {("SALE", "NEW_CLUE"): 1}
    assert counts(out, "recycled") == {("SALE", "timed_out"): 1}
    assert counts(out, "transitions")[("SALE", "ASSIGNED")] == 2
    g = kpis.gauges()
    assert g.waiting == {}
    assert g.open_tasks == {}
    assert g.window_offers == {"SALE": 2}
    assert g.window_recycles == {"SALE": 1}


def test_waiting_and_open_gauges_follow_the_latest_status() -> None:
    kpis = PartitionKpis()
    fold(kpis, [tr(1, None, "UNASSIGNED", 0), tr(2, None, "UNASSIGNED", 1)])
    fold(kpis, [tr(2, "UNASSIGNED", "ASSIGNED", 3)])
    fold(kpis, [tr(3, None, "UNASSIGNED", 4, line=AFTER_SALE, category="REVISIT")])
    g = kpis.gauges()
    assert g.waiting == {("SALE", "NEW_CLUE"): 1, ("AFTER_SALE", "REVISIT"): 1}
    assert g.open_tasks[("SALE", "NEW_CLUE", "ASSIGNED")] == 1
    # the oldest wait ignores REVISIT tasks (they wait for a due time the events lack)
    assert g.oldest_wait_started_ms == {"SALE": T0}
    assert g.watermark_ms == T0 + 4000


def test_replayed_events_are_counted_once() -> None:
    kpis = PartitionKpis()
    events = life(1) + life(2)
    first = fold(kpis, events)
    # the outbox resends a batch (at-least-once): every event a second time
    again = fold(kpis, events[3:] + events)
    assert again == []
    assert kpis.duplicates == len(events) + len(events) - 3
    assert counts(first, "handled") == {("SALE", "NEW_CLUE"): 2}


def test_a_merge_is_not_a_transition() -> None:
    kpis = PartitionKpis()
    out = fold(kpis, [tr(1, None, "UNASSIGNED", 0), tr(1, "UNASSIGNED", "UNASSIGNED", 2)])
    assert counts(out, "transitions") == {("SALE", "UNASSIGNED"): 1}
    assert kpis.gauges().waiting == {("SALE", "NEW_CLUE"): 1}


@pytest.mark.parametrize("seed", range(20))
def test_any_delivery_order_gives_the_same_kpis(seed: int) -> None:
    events = [ev for t in range(1, 6) for ev in life(t, wait_s=t * 3)]
    events += [tr(9, None, "UNASSIGNED", 1), tr(9, "UNASSIGNED", "CANCELLED", 500)]
    events += [tr(10, None, "UNASSIGNED", 2), tr(10, "UNASSIGNED", "ASSIGNED", 9)]
    ordered = PartitionKpis()
    expected = fold(ordered, events)
    shuffled_events = list(events)
    random.Random(seed).shuffle(shuffled_events)
    shuffled = PartitionKpis()
    got = fold(shuffled, shuffled_events)
    assert waits(got) == waits(expected)
    for name in ("handled", "recycled", "transitions"):
        assert counts(got, name) == counts(expected, name)
    assert shuffled.gauges() == ordered.gauges()
    assert shuffled.gauges().open_tasks == {("SALE", "NEW_CLUE", "ASSIGNED"): 1}


def test_a_wait_is_not_measured_across_a_missing_event() -> None:
    kpis = PartitionKpis()
    # created, then (the first offer and its recycle are not delivered yet) the re-offer
    out = fold(kpis, [tr(1, None, "UNASSIGNED", 0), tr(1, "RECYCLED", "ASSIGNED", 100)])
    assert waits(out) == []
    out = fold(kpis, [tr(1, "ASSIGNED", "RECYCLED", 90)])
    assert waits(out) == [10.0]  # recycled at 90, re-offered at 100
    out = fold(kpis, [tr(1, "UNASSIGNED", "ASSIGNED", 4)])
    assert waits(out) == [4.0]


def test_a_terminal_status_is_final_whatever_the_clocks_say() -> None:
    kpis = PartitionKpis()
    # another replica's clock is behind: its COMPLETED carries an earlier time
    fold(kpis, [tr(1, None, "UNASSIGNED", 0), tr(1, "UNASSIGNED", "ASSIGNED", 10)])
    fold(kpis, [tr(1, "IN_PROGRESS", "COMPLETED", 5)])
    assert kpis.gauges().open_tasks == {}


def test_finished_tasks_are_forgotten_and_their_late_events_dropped() -> None:
    kpis = PartitionKpis(retention_ms=60_000)
    fold(kpis, [tr(1, None, "UNASSIGNED", 0), tr(1, "UNASSIGNED", "CANCELLED", 1)])
    fold(kpis, [tr(2, None, "UNASSIGNED", 200)])  # event time moves on
    assert kpis.tasks_tracked == 1
    # a very late copy of task 1's creation must not resurrect it as waiting
    assert kpis.apply(tr(1, None, "UNASSIGNED", 0)) == []
    assert kpis.late == 1
    assert kpis.gauges().waiting == {("SALE", "NEW_CLUE"): 1}
    # an open task is never forgotten, however old its events
    assert kpis.apply(tr(2, "UNASSIGNED", "ASSIGNED", 100_000)) != []


def test_window_gauges_keep_only_the_last_window_of_event_time() -> None:
    kpis = PartitionKpis(window_ms=60_000)
    fold(kpis, life(1)[:3])  # offer at 10, recycle at 40
    fold(kpis, [tr(2, None, "UNASSIGNED", 90), tr(2, "UNASSIGNED", "ASSIGNED", 95)])
    g = kpis.gauges()
    assert g.window_offers == {"SALE": 1}
    assert g.window_recycles == {"SALE": 1}
    fold(kpis, [tr(3, None, "UNASSIGNED", 200)])
    g = kpis.gauges()
    assert g.window_offers == {"SALE": 0}
    assert g.window_recycles == {"SALE": 0}


def test_agents_by_latest_presence() -> None:
    kpis = PartitionKpis()
    ap = AgentPresence
    fold(
        kpis,
        [
            ap(1, SALE, None, "IDLE", T0),
            ap(2, SALE, None, "IDLE", T0),
            ap(1, SALE, "IDLE", "BUSY", T0 + 2000),
            ap(2, SALE, "BUSY", "BREAK", T0 + 5000),
            ap(2, SALE, "IDLE", "BUSY", T0 + 3000),  # late: older than the BREAK
            ap(3, AFTER_SALE, None, "OFFLINE", T0),
        ],
    )
    assert kpis.gauges().agents == {
        ("SALE", "BUSY"): 1,
        ("SALE", "BREAK"): 1,
        ("AFTER_SALE", "OFFLINE"): 1,
    }


def test_calls_deduped_and_tags_bounded() -> None:
    kpis = PartitionKpis(max_call_tags=2)

    def call(i: int, tag: str) -> CallRecord:
        return CallRecord(SALE, f"b{i}", "CALLOUT", tag, "ZT", f"r{i}", T0 + i)

    out = fold(kpis, [call(1, "reached"), call(2, "no_answer"), call(1, "reached")])
    out += fold(kpis, [call(3, "busy"), call(4, "reached")])
    assert counts(out, "calls") == {
        ("SALE", "CALLOUT", "reached"): 2,
        ("SALE", "CALLOUT", "no_answer"): 1,
        ("SALE", "CALLOUT", OTHER_TAG): 1,
    }
    assert kpis.duplicates == 1


def test_failed_events_deduped_per_replay() -> None:
    kpis = PartitionKpis()
    bad = FailedEventRecord("f1", "crm.bi.TaskTransition", 0, T0)
    out = fold(kpis, [bad, bad, FailedEventRecord("f1", "crm.bi.TaskTransition", 1, T0 + 5)])
    assert counts(out, "failed_events") == {("crm.bi.TaskTransition",): 2}


def test_line_names() -> None:
    assert [line_name(n) for n in (1, 2, 3, 7)] == ["SALE", "AFTER_SALE", "FINANCE", "LINE_7"]
    # lines are data: a line added by config (or any code a producer sends) is labelled
    # by its code, and its events count like any other
    assert [line_name(n) for n in (4, 0, -1, 2**31)] == [
        "LINE_4",
        "LINE_0",
        "LINE_-1",
        f"LINE_{2**31}",
    ]
    kpis = PartitionKpis()
    out = fold(kpis, life(1, line=4) + life(2, line=-1))
    assert counts(out, "handled") == {("LINE_4", "NEW_CLUE"): 1, ("LINE_-1", "NEW_CLUE"): 1}
