"""After the day: read the platform's own records back, check they agree, report.

Three independent records of the same day are read:

- the assignment database (through ListTasks/GetTask: tasks, their transition history);
- the scheduler's jobs (List: every offer timeout and call-back job and its final state);
- the BI files the bilog sink wrote (Avro, ``<topic>/dt=…/hour=…/<topic>+<partition>+…``).

:func:`collect` gathers them into :class:`DayFacts` with the consistency checks;
:func:`text_report` prints a summary, :func:`html_report` writes a page with charts
(inline SVG, no JavaScript, opens from disk).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import fastavro
import grpc
from crm.assignment.v1 import assignment_pb2 as pb
from crm.assignment.v1 import assignment_pb2_grpc as pb_grpc
from crm.common.v1 import common_pb2
from crm.scheduler.v1 import scheduler_pb2 as spb
from crm.scheduler.v1 import scheduler_pb2_grpc as spb_grpc
from crm_bilog.sink.runner import FILE_NAME  # the sink's own file naming
from prometheus_client.parser import text_string_to_metric_families

from crm_tools.day import DayLog, line_label
from crm_tools.local_platform import Incident, LocalPlatform

STATUS = {v: k.removeprefix("STATUS_") for k, v in pb.Status.items()}
JOB_STATE = {v: k.removeprefix("JOB_STATE_") for k, v in spb.JobState.items()}
TransitionKey = tuple[int, str, int]  # (task id, to status, at in ms)
WAITING = (pb.STATUS_UNASSIGNED, pb.STATUS_RECYCLED)  # in a queue, waiting for an offer


@dataclass
class TaskFacts:
    id: int
    line: str
    category: str
    status: str
    recycles: int
    wait_s: float | None  # due (or created) -> accepted
    transitions: list[TransitionKey]
    calls: int = 0
    offers: int = 0  # offered from a queue (UNASSIGNED/RECYCLED -> ASSIGNED)
    accepts: int = 0  # ASSIGNED -> IN_PROGRESS
    timeouts: int = 0  # ASSIGNED -> RECYCLED (the offer rang out)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class DayFacts:
    tasks: list[TaskFacts] = field(default_factory=list)
    jobs: Counter[tuple[str, str]] = field(default_factory=Counter)  # (name, state)
    bi_records: Counter[tuple[str, str, int, str]] = field(default_factory=Counter)
    bi_transitions: Counter[TransitionKey] = field(default_factory=Counter)
    bi_lines: dict[TransitionKey, int] = field(default_factory=dict)
    bi_unique: dict[str, set[tuple[object, ...]]] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    incidents: list[Incident] = field(default_factory=list)
    sample_task: int = 0
    kpis: dict[tuple[str, str], float] = field(default_factory=dict)  # (metric, line)
    kpi_url: str = ""  # the KPI consumer's /metrics ("" when it does not run)
    kpi_error: str = ""  # why the KPIs could not be scraped

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def _ms(t: object) -> int:
    return int(t.ToNanoseconds()) // 1_000_000  # type: ignore[attr-defined]


async def read_tasks(stub: pb_grpc.AssignmentServiceAsyncStub) -> list[TaskFacts]:
    out: list[TaskFacts] = []
    token = ""
    while True:
        page = await stub.ListTasks(
            pb.ListTasksRequest(page=common_pb2.PageRequest(page_size=100, page_token=token))
        )
        for t in page.tasks:
            detail = await stub.GetTask(pb.GetTaskRequest(id=t.id))
            start = max(_ms(t.created_at), _ms(t.due_at) if t.HasField("due_at") else 0)
            accepted = [_ms(e.at) for e in detail.history if e.to_status == pb.STATUS_IN_PROGRESS]
            moves = [(e.from_status, e.to_status) for e in detail.history]
            out.append(
                TaskFacts(
                    id=t.id,
                    line=line_label(t.business_line),
                    category=pb.Category.Name(t.category).removeprefix("CATEGORY_"),
                    status=STATUS[t.status],
                    recycles=t.recycle_count,
                    wait_s=(accepted[-1] - start) / 1000 if accepted else None,
                    transitions=[(t.id, STATUS[e.to_status], _ms(e.at)) for e in detail.history],
                    calls=len(detail.calls),
                    offers=sum(1 for f, to in moves if to == pb.STATUS_ASSIGNED and f in WAITING),
                    accepts=moves.count((pb.STATUS_ASSIGNED, pb.STATUS_IN_PROGRESS)),
                    timeouts=moves.count((pb.STATUS_ASSIGNED, pb.STATUS_RECYCLED)),
                )
            )
        token = page.page.next_page_token
        if not token:
            return out


async def read_jobs(stub: spb_grpc.SchedulerServiceAsyncStub) -> Counter[tuple[str, str]]:
    jobs: Counter[tuple[str, str]] = Counter()
    token = ""
    while True:
        page = await stub.List(
            spb.ListRequest(page=common_pb2.PageRequest(page_size=500, page_token=token))
        )
        for j in page.jobs:
            jobs[(j.name, JOB_STATE[j.state])] += 1
        token = page.page.next_page_token
        if not token:
            return jobs


BiRead = tuple[
    Counter[tuple[str, str, int, str]],
    Counter[TransitionKey],
    dict[TransitionKey, int],
    dict[str, set[tuple[object, ...]]],
]


def _dedupe_key(name: str, rec: dict[str, object]) -> tuple[object, ...] | None:
    """The identity of a call record / presence change (delivery is at least once)."""
    if name == "FactCallRecord":
        head = rec["operator_header"]
        assert isinstance(head, dict)
        return (rec["bundle_id"], str(head["timestamp"]), head["operator_id"])
    if name == "AgentPresenceChanged":
        return (rec["agent_id"], rec["to_presence"], str(rec["at"]))
    return None


def read_bi(sink_dir: Path) -> BiRead:
    """Records per (record name, topic, partition, hour dir); TaskTransition keys; the
    distinct call records and presence changes."""
    records: Counter[tuple[str, str, int, str]] = Counter()
    keys: Counter[TransitionKey] = Counter()
    lines: dict[TransitionKey, int] = {}
    unique: dict[str, set[tuple[object, ...]]] = defaultdict(set)
    for path in sorted(sink_dir.rglob("*.avro")):
        rel = path.relative_to(sink_dir)
        m = FILE_NAME.match(path.name)
        if m is None or any(part.startswith((".", "_")) for part in rel.parts):
            continue  # a file being published
        try:
            with path.open("rb") as f:
                reader = fastavro.reader(f)
                schema = reader.writer_schema
                name = str(schema.get("name", "?")) if isinstance(schema, dict) else "?"
                name = name.rsplit(".", 1)[-1]
                n = 0
                for rec in reader:
                    n += 1
                    if name == "TaskTransition" and isinstance(rec, dict):
                        at = rec["at"]
                        at_ms = int(at.timestamp() * 1000) if hasattr(at, "timestamp") else int(at)
                        key = (int(rec["task_id"]), str(rec["to_status"]), at_ms)
                        keys[key] += 1
                        lines[key] = int(rec["business_line"])
                    elif isinstance(rec, dict):
                        other = _dedupe_key(name, rec)
                        if other is not None:
                            unique[name].add(other)
        except (OSError, ValueError):
            continue
        hour_dir = rel.parent.relative_to(rel.parts[0]).as_posix()
        records[(name, m.group("topic"), int(m.group("partition")), hour_dir)] += n
    return records, keys, lines, unique


async def collect(
    platform: LocalPlatform, log: DayLog, say: Callable[[str], None], bi_timeout: float = 30
) -> DayFacts:
    facts = DayFacts(incidents=list(platform.incidents))
    async with (
        grpc.aio.insecure_channel(platform.target("assignment")) as ach,
        grpc.aio.insecure_channel(platform.target("scheduler")) as sch,
    ):
        facts.tasks = await read_tasks(pb_grpc.AssignmentServiceStub(ach))
        # an accepted offer's timeout job still fires at the offer's deadline (a no-op):
        # wait for the last of them
        deadline = time.monotonic() + 30
        while True:
            facts.jobs = await read_jobs(spb_grpc.SchedulerServiceStub(sch))
            if time.monotonic() > deadline or all(
                state in ("SUCCEEDED", "CANCELLED", "DEAD") for _, state in facts.jobs
            ):
                break
            await asyncio.sleep(0.5)
    history: Counter[TransitionKey] = Counter(k for t in facts.tasks for k in t.transitions)
    say(
        f"read back {len(facts.tasks)} tasks ({sum(history.values())} transitions) and "
        f"{sum(facts.jobs.values())} scheduler jobs; waiting for the BI files"
    )
    started = time.monotonic()
    deadline = started + bi_timeout
    shown = started
    while True:  # the sink publishes files every few seconds
        (
            facts.bi_records,
            facts.bi_transitions,
            facts.bi_lines,
            facts.bi_unique,
        ) = await asyncio.to_thread(read_bi, platform.sink_dir)
        complete = (
            not (history - facts.bi_transitions)
            and len(facts.bi_unique.get("FactCallRecord", ())) >= sum(log.calls.values())
            and len(facts.bi_unique.get("AgentPresenceChanged", ())) >= log.presence_changes
        )
        if complete or time.monotonic() > deadline:
            break
        if time.monotonic() - shown >= 5:  # progress: what is still missing
            shown = time.monotonic()
            say(
                f"  ... BI files after {shown - started:.0f} s: {_bi_progress(facts, log, history)}"
            )
        await asyncio.sleep(1)
    say(f"BI files read: {_bi_progress(facts, log, history)}")
    facts.kpi_url = platform.kpi_metrics_url
    if facts.kpi_url:  # the KPI consumer runs: its cross-check is not optional
        facts.kpis, facts.kpi_error = await wait_kpis(facts.kpi_url, facts, deadline=bi_timeout)
    clues = [t for t in facts.tasks if t.category == "NEW_CLUE"]
    recycled = [t for t in clues if t.recycles]
    facts.sample_task = (
        recycled or clues or facts.tasks or [TaskFacts(0, "", "", "", 0, None, [])]
    )[0].id
    _checks(facts, log, history)
    return facts


def _bi_progress(facts: DayFacts, log: DayLog, history: Counter[TransitionKey]) -> str:
    missing = len(set(history) - set(facts.bi_transitions))
    calls = len(facts.bi_unique.get("FactCallRecord", ()))
    presence = len(facts.bi_unique.get("AgentPresenceChanged", ()))
    return (
        f"{len(history) - missing}/{len(history)} transitions, "
        f"{calls}/{sum(log.calls.values())} call records, "
        f"{presence}/{log.presence_changes} presence changes"
    )


KPI_TOTALS = ("crm_kpi_tasks_handled", "crm_kpi_calls", "crm_kpi_tasks_recycled")
KPI_WAIT = "crm_kpi_task_wait_seconds"  # histogram: its _count is one per offer
KPI_GAUGES = ("crm_kpi_tasks_waiting", "crm_kpi_tasks_open")


def read_kpis(url: str) -> dict[tuple[str, str], float]:
    """Sums per (metric, business line) from a /metrics page: the KPI counters, the
    wait-time histogram's sample count and the waiting/open task gauges."""
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 (local URL)
        text = resp.read().decode()
    out: dict[tuple[str, str], float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        if family.name in KPI_TOTALS:
            suffix = "_total"
        elif family.name == KPI_WAIT:
            suffix = "_count"
        elif family.name in KPI_GAUGES:
            suffix = ""
        else:
            continue
        for sample in family.samples:
            if sample.name == family.name + suffix:
                out[(family.name, sample.labels.get("business_line", ""))] += sample.value
    return dict(out)


def _kpi_expected(facts: DayFacts) -> dict[tuple[str, str], float]:
    """What the KPI consumer must show once it has read the whole day: the counters
    from the database, one wait sample per offer, and (the day drained) nothing waiting
    or open."""
    want: dict[tuple[str, str], float] = defaultdict(float)
    for t in facts.tasks:
        if t.status == "COMPLETED":
            want[("crm_kpi_tasks_handled", t.line)] += 1
        want[("crm_kpi_calls", t.line)] += t.calls
        want[("crm_kpi_tasks_recycled", t.line)] += t.recycles
        want[(KPI_WAIT, t.line)] += t.offers
        want[("crm_kpi_tasks_waiting", t.line)] += 0
        want[("crm_kpi_tasks_open", t.line)] += 0
    return dict(want)


def _kpi_off(
    facts: DayFacts, metrics: tuple[str, ...]
) -> dict[tuple[str, str], tuple[float, float]]:
    """(metric, line) -> (KPI, expected) where they differ, for these metrics; a line
    the KPIs show but the database does not counts too."""
    want = {k: v for k, v in _kpi_expected(facts).items() if k[0] in metrics}
    keys = set(want) | {k for k, v in facts.kpis.items() if k[0] in metrics and v}
    return {
        k: (facts.kpis.get(k, 0.0), want.get(k, 0.0))
        for k in sorted(keys)
        if facts.kpis.get(k, 0.0) != want.get(k, 0.0)
    }


async def wait_kpis(
    url: str, facts: DayFacts, deadline: float
) -> tuple[dict[tuple[str, str], float], str]:
    """The KPI consumer's figures once they match the database (or after ``deadline``
    seconds: the checks then report the difference), and why they could not be
    scraped at all ("" when they were)."""
    want = _kpi_expected(facts)
    end = time.monotonic() + deadline
    got: dict[tuple[str, str], float] = {}
    error = "not scraped"
    while time.monotonic() < end:
        try:
            got = await asyncio.to_thread(read_kpis, url)
        except (OSError, ValueError) as exc:
            error = f"scraping {url} failed: {exc}"
        else:
            error = "" if got else f"{url} shows no KPI figures"
            if got and all(got.get(k, 0) == v for k, v in want.items()):
                break
        await asyncio.sleep(1)
    return got, error


def _checks(facts: DayFacts, log: DayLog, history: Counter[TransitionKey]) -> None:
    add = facts.checks.append
    ids = {t.id for t in facts.tasks}
    lost = set(log.acknowledged.values()) - ids
    add(
        Check(
            "every acknowledged clue is a task in the assignment database",
            not lost,
            f"{len(log.acknowledged)} clues acknowledged, {len(lost)} missing",
        )
    )
    unique_bi = set(facts.bi_transitions)
    missing = set(history) - unique_bi
    add(
        Check(
            "every task transition in the database reached the BI files",
            not missing,
            f"{len(history)} transitions, {len(missing)} missing from the files, "
            f"{sum(facts.bi_transitions.values()) - len(unique_bi)} duplicates "
            "(at-least-once; consumers dedupe)",
        )
    )
    extra = unique_bi - set(history)
    add(
        Check(
            "no BI transition without a database transition",
            not extra,
            f"{len(extra)} BI-only transitions",
        )
    )
    db_recycled = sum(1 for k in history if k[1] == "RECYCLED")
    bi_recycled = sum(1 for k in unique_bi if k[1] == "RECYCLED")
    counted = sum(t.recycles for t in facts.tasks)
    add(
        Check(
            "recycles agree (task counters, history, BI files)",
            db_recycled == bi_recycled == counted,
            f"recycle_count {counted}, history {db_recycled}, BI {bi_recycled}",
        )
    )
    pending = {k: n for k, n in facts.jobs.items() if k[1] not in ("SUCCEEDED", "CANCELLED")}
    add(
        Check(
            "every scheduler job finished (none pending, none DEAD)",
            not pending,
            ", ".join(f"{n} x {name} {state}" for (name, state), n in sorted(facts.jobs.items()))
            or "no jobs",
        )
    )
    revisits = sum(1 for t in facts.tasks if t.category == "REVISIT")
    wakes = sum(n for (name, _), n in facts.jobs.items() if name == "assignment.wake-revisit")
    add(
        Check(
            "one call-back job per REVISIT task",
            wakes == revisits,
            f"{revisits} REVISIT tasks, {wakes} wake-revisit jobs",
        )
    )
    done = Counter(t.status for t in facts.tasks)
    client = sum(log.completed.values()), sum(log.failed.values())
    add(
        Check(
            "the agents' completions match the database",
            client == (done["COMPLETED"], done["FAILED"]),
            f"agents completed {client[0]}, failed {client[1]}; database "
            f"{done['COMPLETED']} COMPLETED, {done['FAILED']} FAILED",
        )
    )
    bi = {name: len(keys) for name, keys in facts.bi_unique.items()}
    bi.setdefault("FactCallRecord", 0)
    bi.setdefault("AgentPresenceChanged", 0)
    db_calls = sum(t.calls for t in facts.tasks)
    client_calls = sum(log.calls.values())
    add(
        Check(
            "call records agree (agents, database, BI files)",
            client_calls == db_calls == bi["FactCallRecord"],
            f"agents recorded {client_calls}, database {db_calls}, "
            f"BI FactCallRecord {bi['FactCallRecord']}",
        )
    )
    add(
        Check(
            "presence changes agree (agents, BI files)",
            log.presence_changes == bi["AgentPresenceChanged"],
            f"agents changed presence {log.presence_changes} times, "
            f"BI AgentPresenceChanged {bi['AgentPresenceChanged']}",
        )
    )
    offers = sum(t.offers for t in facts.tasks)
    accepts = sum(t.accepts for t in facts.tasks)
    timeouts = sum(t.timeouts for t in facts.tasks)
    expiries = sum(n for (name, _), n in facts.jobs.items() if name == "assignment.expire-offer")
    add(
        Check(
            "one expire-offer job per offer; every offer accepted or timed out and recycled",
            expiries == offers == accepts + timeouts and timeouts >= log.ring_outs,
            f"{offers} offers in the history, {expiries} expire-offer jobs; {accepts} "
            f"accepted + {timeouts} OFFERED->RECYCLED (agents let {log.ring_outs} ring out)",
        )
    )
    if facts.kpi_url:
        _kpi_checks(facts, log)
    add(
        Check(
            "all queues drained",
            log.drained,
            "waiting, offered, in progress, scheduled: 0"
            if log.drained
            else "work left at the end",
        )
    )


KPI_CHECKS = (
    (
        "realtime KPIs (from the BI stream) agree with the database",
        ("crm_kpi_tasks_handled", "crm_kpi_tasks_recycled"),
        "tasks handled and recycled per line match",
    ),
    (
        "realtime KPI calls agree with the call records",
        ("crm_kpi_calls",),
        "calls per line match the database's call records",
    ),
    (
        "realtime KPI wait-time histogram has one sample per offer",
        (KPI_WAIT,),
        "crm_kpi_task_wait_seconds_count per line = offers in the history",
    ),
    (
        "realtime KPIs show nothing waiting or open after the drain",
        KPI_GAUGES,
        "crm_kpi_tasks_waiting and crm_kpi_tasks_open are 0 on every line",
    ),
)


def _kpi_checks(facts: DayFacts, log: DayLog) -> None:
    """The KPI consumer runs: its figures must be there and agree (never skipped)."""
    for name, metrics, ok_text in KPI_CHECKS:
        if not facts.kpis:
            facts.checks.append(Check(name, False, facts.kpi_error or "no KPI figures"))
            continue
        off = _kpi_off(facts, metrics)
        detail = ok_text
        if metrics == ("crm_kpi_calls",):
            kpi_calls = sum(v for (m, _), v in facts.kpis.items() if m == "crm_kpi_calls")
            bi_calls = len(facts.bi_unique.get("FactCallRecord", ()))
            detail += f" (KPI {kpi_calls:g}, BI FactCallRecord {bi_calls})"
            if kpi_calls != bi_calls and not off:
                off = {("crm_kpi_calls", "all lines"): (kpi_calls, float(bi_calls))}
        if off:
            detail = "; ".join(
                f"{m} {line}: KPI {got:g}, expected {want:g}"
                for (m, line), (got, want) in off.items()
            )
        facts.checks.append(Check(name, not off, detail))


# -- text -------------------------------------------------------------------------------
def per_line(facts: DayFacts) -> dict[str, Counter[str]]:
    out: dict[str, Counter[str]] = defaultdict(Counter)
    for t in facts.tasks:
        out[t.line][t.status] += 1
        out[t.line]["recycles"] += t.recycles
        out[t.line]["tasks"] += 1
    return out


def text_report(facts: DayFacts, log: DayLog) -> str:
    out = ["", "=== the day in numbers ==="]
    acked = len(log.acknowledged)
    out.append(
        f"clues: {acked} acknowledged ({log.merged} merged into open tasks), "
        f"{len(log.turned_away)} turned away (line not open); {log.revisits} call-backs"
    )
    out.append(
        f"offers: {sum(log.offers.values())}, {log.ring_outs} rang out; client retries after "
        f"UNAVAILABLE: {log.retries}, offer streams broken and reopened: {log.stream_breaks}"
    )
    out.append(f"{'line':<12}{'tasks':>6}{'done':>6}{'failed':>7}{'recycles':>9}{'wait p50':>10}")
    waits = wait_by_line(facts, log)
    for line, n in sorted(per_line(facts).items()):
        w = sorted(waits.get(line, []))
        p50 = f"{w[len(w) // 2]:.0f} min" if w else "-"
        out.append(
            f"{line:<12}{n['tasks']:>6}{n['COMPLETED']:>6}{n['FAILED']:>7}"
            f"{n['recycles']:>9}{p50:>10}"
        )
    before = [w for h, line, w in log.offer_windows if line == 1 and h < 11]
    after = [w for h, line, w in log.offer_windows if line == 1 and h >= 11.2]
    if before and after:
        out.append(
            f"live config: sales offers carried a {max(before):.0f} s accept window before "
            f"the 11:00 change and {max(after):.0f} s after it (no restart)"
        )
    bi_total = sum(facts.bi_records.values())
    out.append(
        f"BI files: {bi_total} records in {len(facts.bi_records)} partitions "
        "(" + ", ".join(f"{name} {n}" for name, n in sorted(_by_record(facts).items())) + ")"
    )
    if facts.kpis:
        lines_seen = sorted({line for _, line in facts.kpis if line})
        out.append(
            "realtime KPIs (crm_bilog kpi, Prometheus): "
            + "; ".join(
                f"{line} "
                + ", ".join(f"{label} {facts.kpis.get((m, line), 0):g}" for label, m in KPI_COLUMNS)
                for line in lines_seen
            )
        )
    elif facts.kpi_url:
        out.append(f"realtime KPIs (crm_bilog kpi): NOT SCRAPED: {facts.kpi_error}")
    for inc in facts.incidents:
        out.append(f"incident: {inc.process} exited ({inc.exit_code}); restarted={inc.restarted}")
    out.append("consistency checks (assignment database / scheduler jobs / BI files):")
    for c in facts.checks:
        out.append(f"  [{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}")
    return "\n".join(out)


def _by_record(facts: DayFacts) -> Counter[str]:
    c: Counter[str] = Counter()
    for (name, _, _, _), n in facts.bi_records.items():
        c[name] += n
    return c


def wait_by_line(facts: DayFacts, log: DayLog) -> dict[str, list[float]]:
    """Waits until an agent accepted, in simulated minutes, per line."""
    out: dict[str, list[float]] = defaultdict(list)
    for t in facts.tasks:
        if t.wait_s is not None:
            out[t.line].append(max(0.0, t.wait_s) / log.hour_s * 60)
    return out


# -- HTML -------------------------------------------------------------------------------
COLORS = {
    "SALE": "#2563eb",
    "AFTER_SALE": "#16a34a",
    "FINANCE": "#d97706",
    "completed": "#16a34a",
    "failed": "#dc2626",
    "recycles": "#7c3aed",  # not FINANCE's amber
    "with an agent": "#6b7280",
}
PALETTE = ["#2563eb", "#16a34a", "#d97706", "#dc2626", "#7c3aed", "#0891b2", "#65a30d"]


def _color(name: str, i: int) -> str:
    for line, color in COLORS.items():
        if name.startswith(line + " ") or name == line:
            return color
    return PALETTE[i % len(PALETTE)]


def bar_chart(title: str, groups: list[str], series: dict[str, list[float]], unit: str = "") -> str:
    """Grouped vertical bars: one group per label, one bar per series."""
    w, h, left, bottom, top = 640, 260, 48, 40, 30
    peak = max([v for vals in series.values() for v in vals] + [1])
    gw = (w - left - 10) / max(1, len(groups))
    bw = gw * 0.8 / max(1, len(series))
    parts = [_frame(title, w, h, left, bottom, top, peak, unit)]
    for gi, g in enumerate(groups):
        x0 = left + gi * gw + gw * 0.1
        for si, (name, vals) in enumerate(series.items()):
            v = vals[gi]
            bh = (h - bottom - top) * v / peak
            x = x0 + si * bw
            y = h - bottom - bh
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bw - 2:.1f}" height="{bh:.1f}" '
                f'fill="{_color(name, si)}"><title>{html.escape(name)} {g}: {v:g}</title></rect>'
            )
            if v:
                parts.append(
                    f'<text x="{x + bw / 2 - 1:.1f}" y="{y - 3:.1f}" font-size="10" '
                    f'text-anchor="middle">{v:g}</text>'
                )
        parts.append(
            f'<text x="{x0 + gw * 0.4:.1f}" y="{h - bottom + 14}" font-size="11" '
            f'text-anchor="middle">{html.escape(g)}</text>'
        )
    parts.append(_legend(list(series), w, h))
    return _svg(w, h, parts)


def line_chart(
    title: str, points: list[tuple[float, dict[str, int]]], marks: list[tuple[float, str]]
) -> str:
    """Series over the simulated day (x: hour 9..18), with vertical event marks."""
    w, h, left, bottom, top = 640, 260, 48, 40, 30
    names = sorted({k for _, p in points for k in p})
    peak = max([v for _, p in points for v in p.values()] + [1])
    end = max([18.5] + [hour + 0.25 for hour, _ in points])

    def xy(hour: float, v: float) -> tuple[float, float]:
        x = left + (w - left - 10) * (min(max(hour, 9), end) - 9) / (end - 9)
        return x, h - bottom - (h - bottom - top) * v / peak

    parts = [_frame(title, w, h, left, bottom, top, peak, "")]
    for clock in range(9, int(end) + 1, 1 if end < 20 else 2):
        x, _ = xy(clock, 0)
        parts.append(
            f'<text x="{x:.1f}" y="{h - bottom + 14}" font-size="10" '
            f'text-anchor="middle">{clock}:00</text>'
        )
    for hour, text in marks:
        x, _ = xy(hour, 0)
        parts.append(
            f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{h - bottom}" stroke="#9ca3af" '
            f'stroke-dasharray="3,3"><title>{html.escape(text)}</title></line>'
        )
    for i, name in enumerate(names):
        pts = " ".join("{:.1f},{:.1f}".format(*xy(hour, p.get(name, 0))) for hour, p in points)
        dash = ' stroke-dasharray="5,3"' if name == "with an agent" else ""
        parts.append(
            f'<polyline points="{pts}" fill="none" stroke="{_color(name, i)}" '
            f'stroke-width="2"{dash}><title>{html.escape(name)}</title></polyline>'
        )
    parts.append(_legend(names, w, h))
    return _svg(w, h, parts)


def hbar_chart(title: str, rows: list[tuple[str, float]]) -> str:
    w = 640
    row_h = 18
    h = 40 + row_h * max(1, len(rows))
    peak = max([v for _, v in rows] + [1])
    parts = [f'<text x="8" y="18" font-size="13" font-weight="bold">{html.escape(title)}</text>']
    for i, (label, v) in enumerate(rows):
        y = 30 + i * row_h
        bw = (w - 330) * v / peak
        parts.append(
            f'<text x="310" y="{y + 12}" font-size="10" text-anchor="end">'
            f"{html.escape(label)}</text>"
        )
        parts.append(
            f'<rect x="316" y="{y + 2}" width="{bw:.1f}" height="{row_h - 5}" '
            f'fill="{PALETTE[sum(map(ord, label.split()[0])) % len(PALETTE)]}"/>'
        )
        parts.append(f'<text x="{320 + bw:.1f}" y="{y + 12}" font-size="10">{v:g}</text>')
    return _svg(w, h, parts)


def _frame(
    title: str, w: int, h: int, left: int, bottom: int, top: int, peak: float, unit: str
) -> str:
    out = [f'<text x="8" y="18" font-size="13" font-weight="bold">{html.escape(title)}</text>']
    out.append(
        f'<line x1="{left}" y1="{h - bottom}" x2="{w - 10}" y2="{h - bottom}" stroke="#111"/>'
    )
    for frac in (0.5, 1.0):
        y = h - bottom - (h - bottom - top) * frac
        out.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{w - 10}" y2="{y:.1f}" stroke="#e5e7eb"/>'
            f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">'
            f"{peak * frac:.3g}{unit}</text>"
        )
    return "".join(out)


def _legend(names: list[str], w: int, h: int) -> str:
    out = []
    x = 60.0
    for i, name in enumerate(names):
        out.append(
            f'<rect x="{x:.0f}" y="{h - 14}" width="10" height="10" fill="{_color(name, i)}"/>'
            f'<text x="{x + 14:.0f}" y="{h - 5}" font-size="10">{html.escape(name)}</text>'
        )
        x += 24 + 6.2 * len(name)
    return "".join(out)


def _svg(w: int, h: int, parts: list[str]) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        f'viewBox="0 0 {w} {h}" font-family="sans-serif">{"".join(parts)}</svg>'
    )


WAIT_BINS = [(0, 5), (5, 10), (10, 20), (20, 40), (40, 80), (80, 10**9)]


KPI_COLUMNS = (
    ("handled", "crm_kpi_tasks_handled"),
    ("calls", "crm_kpi_calls"),
    ("recycled", "crm_kpi_tasks_recycled"),
    ("wait samples", KPI_WAIT),
    ("waiting now", "crm_kpi_tasks_waiting"),
    ("open now", "crm_kpi_tasks_open"),
)


def kpi_panel(facts: DayFacts) -> str:
    """The realtime KPIs as scraped at the end (what a Grafana board would show)."""
    if not facts.kpi_url:
        return "<h3>Realtime KPIs</h3><p>the KPI consumer did not run</p>"
    if not facts.kpis:
        return (
            f'<h3>Realtime KPIs</h3><p class="fail">not scraped: '
            f"{html.escape(facts.kpi_error or 'no figures')}</p>"
        )
    lines = sorted({line for _, line in facts.kpis if line})
    head = "".join(f"<th>{html.escape(label)}</th>" for label, _ in KPI_COLUMNS)
    rows = "".join(
        f"<tr><td>{html.escape(line)}</td>"
        + "".join(f"<td>{facts.kpis.get((m, line), 0):g}</td>" for _, m in KPI_COLUMNS)
        + "</tr>"
        for line in lines
    )
    return (
        "<h3>Realtime KPIs (crm_bilog kpi, scraped from "
        f"<code>{html.escape(facts.kpi_url)}</code> at the end)</h3>"
        f"<table><tr><th>line</th>{head}</tr>{rows}</table>"
    )


def html_report(
    facts: DayFacts,
    log: DayLog,
    title: str,
    config_history: dict[str, str] | None = None,
) -> str:
    lines = sorted(per_line(facts))
    pl = per_line(facts)
    handled = bar_chart(
        "Tasks handled per business line",
        lines,
        {
            "completed": [float(pl[x]["COMPLETED"]) for x in lines],
            "failed": [float(pl[x]["FAILED"]) for x in lines],
        },
    )
    waits = wait_by_line(facts, log)
    labels = [f"{a}-{b}" if b < 10**9 else f"{a}+" for a, b in WAIT_BINS]
    wait_chart = bar_chart(
        "Wait until an agent accepted (simulated minutes)",
        labels,
        {
            line: [float(sum(1 for w in waits.get(line, []) if a <= w < b)) for a, b in WAIT_BINS]
            for line in lines
        },
    )
    recycles = bar_chart(
        "Offers lost and recycled per line",
        lines,
        {"recycles": [float(pl[x]["recycles"]) for x in lines]},
    )
    queue = line_chart("Tasks waiting / with an agent over the day", log.timeline, log.marks)
    bi_rows = [
        (f"{topic.rsplit('.', 1)[-1]} p{part} {hour}", float(n))
        for (_, topic, part, hour), n in sorted(facts.bi_records.items())
    ]
    bi = hbar_chart("BI records per Kafka partition and hour (read back from the files)", bi_rows)
    checks = "".join(
        f'<tr><td class="{"ok" if c.ok else "fail"}">{"✔" if c.ok else "✘"}</td>'
        f"<td>{html.escape(c.name)}</td><td>{html.escape(c.detail)}</td></tr>"
        for c in facts.checks
    )
    events = "".join(
        f"<li><b>{int(h):02d}:{int((h % 1) * 60):02d}</b> {html.escape(text)}</li>"
        for h, text in log.events
    )
    table = "".join(
        f"<tr><td>{x}</td><td>{pl[x]['tasks']}</td><td>{pl[x]['COMPLETED']}</td>"
        f"<td>{pl[x]['FAILED']}</td><td>{pl[x]['recycles']}</td></tr>"
        for x in lines
    )
    verdict = "all checks passed" if facts.ok else "SOME CHECKS FAILED"
    history = "".join(
        f"<h3>Config history of {html.escape(key)} (crmctl config history)</h3>"
        f"<pre>{html.escape(text)}</pre>"
        for key, text in (config_history or {}).items()
    )
    chaos = "".join(
        f"<li>{html.escape(what)} killed with {html.escape(str(now))}</li>"
        for what, now in log.in_flight.items()
    )
    chaos_card = f'<div class="card"><h3>Chaos</h3><ul>{chaos}</ul></div>' if chaos else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em auto; max-width: 1360px; color: #111; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(660px, 1fr)); gap: 16px; }}
.card {{ border: 1px solid #e5e7eb; border-radius: 8px; padding: 8px; }}
table {{ border-collapse: collapse; }}
td, th {{ padding: 3px 10px; border-bottom: 1px solid #eee; }}
.ok {{ color: #16a34a; }} .fail {{ color: #dc2626; font-weight: bold; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{len(log.acknowledged)} clues acknowledged, {log.merged} merged, {len(log.turned_away)}
turned away; {sum(log.offers.values())} offers, {log.ring_outs} rang out;
{log.revisits} call-backs; {sum(facts.bi_records.values())} BI records read back.
<b class="{"ok" if facts.ok else "fail"}">{verdict}</b>.</p>
<div class="grid">
<div class="card">{handled}</div><div class="card">{wait_chart}</div>
<div class="card">{queue}</div><div class="card">{recycles}</div>
<div class="card">{bi}</div>
<div class="card"><h3>Per line</h3><table><tr><th>line</th><th>tasks</th><th>completed</th>
<th>failed</th><th>recycles</th></tr>{table}</table>
<h3>Consistency checks</h3><table>{checks}</table></div>
<div class="card">{kpi_panel(facts)}{history}</div>{chaos_card}
<div class="card"><h3>The day</h3><ul>{events}</ul></div>
</div></body></html>
"""


def write_html(
    path: Path,
    facts: DayFacts,
    log: DayLog,
    title: str,
    config_history: dict[str, str] | None = None,
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html_report(facts, log, title, config_history), encoding="utf-8")
    with contextlib.suppress(Exception):
        path.chmod(0o644)
    return path
