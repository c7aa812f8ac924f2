"""Realtime KPIs of one partition of the BI event stream (pure: no I/O, no clock).

:class:`PartitionKpis` folds the decoded events of one Kafka partition into the state
the KPIs are read from, in event time (the events' own ``at`` / ``timestamp``), never in
arrival time:

* **tasks** (``crm.bi.TaskTransition``, key ``business_line:task_id``: all of a task's
  events are on one partition): the current status of every task not yet finished; a
  finished task (COMPLETED / FAILED / CANCELLED) is kept ``retention_ms`` of event time
  after it finished, then forgotten;
* **agents** (``crm.bi.AgentPresenceChanged``): the latest presence of every agent;
* **calls** (``crm.bi.FactCallRecord``) and **bad rows** (``crm.bi.FailedEvent``): only
  what dedupes them, for ``retention_ms``;
* offers and recycles of the last ``window_ms`` of event time, per business line (the
  recycle rate that survives a restart, see :mod:`crm_bilog.kpi`).

Event-time correctness:

* **Replays are deduped.** Delivery is at-least-once (the assignment outbox resends a
  batch it did not see acknowledged), so a TaskTransition is identified by
  ``(task_id, at, from_status, to_status)`` (the schema has no event id; see
  ``crm_assignment.clients.bilog_outbox``); a call by ``(bundle_id, timestamp,
  call_type, request_id)``; a bad row by ``(failure_id, replays)``; a presence change is
  idempotent (latest wins).
* **Out-of-order delivery is tolerated.** The current status of a task is the one of its
  latest event by ``(at, status rank)``, except that a terminal status, once seen, is
  final (the state machine never leaves it, whatever another replica's clock says). A
  wait episode (the task entered a queue: created or recycled) is paired with the event
  that left that status (its ``from_status``), whichever of the two arrives first.
* **Late events are dropped, not misapplied.** The partition's watermark is the highest
  event time seen; an event of a task the state no longer knows that is older than
  ``watermark - retention_ms`` belongs to a task already forgotten and is counted as
  late instead of resurrecting it.

:meth:`PartitionKpis.apply` returns the *observations* an event produces (counter
increments, wait-time samples), at most once per distinct event: the caller decides
whether to export them (live events) or only rebuild the state (replayed history).
Gauges are read from :meth:`PartitionKpis.gauges`.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from crm_common.lines import default_name

__all__ = [
    "OTHER_TAG",
    "TERMINAL",
    "WAITING",
    "AgentPresence",
    "CallRecord",
    "Count",
    "FailedEventRecord",
    "Gauges",
    "Observation",
    "PartitionKpis",
    "TaskTransition",
    "WaitSample",
    "line_name",
]

WAITING: frozenset[str] = frozenset({"UNASSIGNED", "RECYCLED"})
"""Statuses of a task waiting in a queue for an offer."""
TERMINAL: frozenset[str] = frozenset({"COMPLETED", "FAILED", "CANCELLED"})
"""Statuses a task never leaves."""
OTHER_TAG = "other"
"""Call tag label of tags beyond ``max_call_tags`` per business line."""

# Tie-break of two events of a task with the same ``at``: the one further along wins.
_RANK = {"UNASSIGNED": 0, "RECYCLED": 1, "ASSIGNED": 2, "IN_PROGRESS": 3}
_TERMINAL_RANK = 4


def line_name(business_line: int) -> str:
    """``1`` -> ``SALE`` (a well-known line); any other code, configured or not, is
    ``LINE_<n>``: lines are data (``crm_common.lines``), their names live in the assignment
    config, and a label keyed by the code stays the same when a line is renamed. Never
    fails, whatever the code (an event is never lost to its label)."""
    return default_name(business_line)


def _rank(status: str) -> int:
    return _TERMINAL_RANK if status in TERMINAL else _RANK.get(status, 0)


# -- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TaskTransition:
    """A decoded ``crm.bi.TaskTransition``."""

    task_id: int
    business_line: int
    category: str
    from_status: str | None
    to_status: str
    agent_id: int | None
    reason: str
    at_ms: int

    @property
    def key(self) -> tuple[int, int, str | None, str]:
        """What identifies the event across replays."""
        return (self.task_id, self.at_ms, self.from_status, self.to_status)

    @property
    def order(self) -> tuple[int, int]:
        return (self.at_ms, _rank(self.to_status))


@dataclass(frozen=True, slots=True)
class AgentPresence:
    """A decoded ``crm.bi.AgentPresenceChanged``."""

    agent_id: int
    business_line: int
    from_presence: str | None
    to_presence: str
    at_ms: int


@dataclass(frozen=True, slots=True)
class CallRecord:
    """A decoded ``crm.bi.FactCallRecord`` (no phone: the KPIs do not need it)."""

    business_line: int
    bundle_id: str
    call_type: str
    call_tag: str
    provider: str
    request_id: str
    at_ms: int

    @property
    def key(self) -> tuple[str, int, str, str]:
        return (self.bundle_id, self.at_ms, self.call_type, self.request_id)


@dataclass(frozen=True, slots=True)
class FailedEventRecord:
    """A decoded ``crm.bi.FailedEvent`` (a bad row)."""

    failure_id: str
    schema: str
    replays: int
    at_ms: int

    @property
    def key(self) -> tuple[str, int]:
        return (self.failure_id, self.replays)


Event = TaskTransition | AgentPresence | CallRecord | FailedEventRecord


# -- observations ---------------------------------------------------------------------------

CounterName = Literal["transitions", "handled", "recycled", "calls", "failed_events"]


@dataclass(frozen=True, slots=True)
class Count:
    """Increment counter ``name`` with ``labels`` by one.

    * ``transitions``: (line, to_status) of every distinct task transition;
    * ``handled``: (line, category) of a task COMPLETED;
    * ``recycled``: (line, reason) of a task RECYCLED;
    * ``calls``: (line, call_type, call_tag);
    * ``failed_events``: (schema,) of a bad row.
    """

    name: CounterName
    labels: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class WaitSample:
    """A finished wait: a task entered a queue (created or recycled) and was offered
    ``seconds`` later (event time)."""

    line: str
    category: str
    seconds: float


Observation = Count | WaitSample


# -- state ----------------------------------------------------------------------------------


@dataclass
class _Task:
    line: str
    category: str
    events: list[TaskTransition] = field(default_factory=list)
    """Distinct events, kept sorted by ``order``."""
    paired: set[tuple[int, int, str | None, str]] = field(default_factory=set)
    """Keys of the enqueue events whose wait was already measured."""
    terminal: TaskTransition | None = None

    def current(self) -> TaskTransition:
        return self.terminal if self.terminal is not None else self.events[-1]


@dataclass(frozen=True, slots=True)
class Gauges:
    """What the state says now (summed over partitions by the exporter)."""

    open_tasks: dict[tuple[str, str, str], int]
    """(line, category, status) -> tasks not finished, by current status."""
    waiting: dict[tuple[str, str], int]
    """(line, category) -> tasks waiting in a queue."""
    oldest_wait_started_ms: dict[str, int]
    """line -> when the longest-waiting non-REVISIT task entered its queue (event time);
    a REVISIT task waits for its due time, which the events do not carry."""
    agents: dict[tuple[str, str], int]
    """(line, presence) -> agents whose latest presence that is."""
    window_offers: dict[str, int]
    window_recycles: dict[str, int]
    watermark_ms: int | None


class PartitionKpis:
    """The KPI state of one partition (see the module doc)."""

    def __init__(
        self,
        *,
        retention_ms: int = 24 * 3600 * 1000,
        window_ms: int = 15 * 60 * 1000,
        max_call_tags: int = 50,
    ) -> None:
        if retention_ms <= 0 or window_ms <= 0 or max_call_tags < 0:
            raise ValueError("retention_ms and window_ms must be > 0, max_call_tags >= 0")
        self.retention_ms = retention_ms
        self.window_ms = window_ms
        self.max_call_tags = max_call_tags
        self.watermark_ms: int | None = None
        self.duplicates = 0
        self.late = 0
        self._tasks: dict[int, _Task] = {}
        self._finished: list[tuple[int, int]] = []  # heap of (terminal at, task id)
        self._agents: dict[int, AgentPresence] = {}
        self._calls: set[tuple[str, int, str, str]] = set()
        self._calls_expiry: list[tuple[int, tuple[str, int, str, str]]] = []  # heap
        self._failed: set[tuple[str, int]] = set()
        self._failed_expiry: list[tuple[int, tuple[str, int]]] = []  # heap
        self._tags: dict[str, set[str]] = defaultdict(set)
        # per line: sorted event times of offers / recycles (inside the window)
        self._offers: dict[str, list[int]] = defaultdict(list)
        self._recycles: dict[str, list[int]] = defaultdict(list)

    # -- entry point -----------------------------------------------------------------------

    def apply(self, event: Event) -> list[Observation]:
        """Fold one event in; the observations it produces (empty for a duplicate or a
        late event)."""
        if isinstance(event, TaskTransition):
            out = self._transition(event)
        elif isinstance(event, AgentPresence):
            out = self._presence(event)
        elif isinstance(event, CallRecord):
            out = self._call(event)
        else:
            out = self._failed_event(event)
        self._advance(event.at_ms)
        return out

    def _advance(self, at_ms: int) -> None:
        if self.watermark_ms is not None and at_ms <= self.watermark_ms:
            return
        self.watermark_ms = at_ms
        horizon = at_ms - self.retention_ms
        while self._finished and self._finished[0][0] < horizon:
            self._tasks.pop(heapq.heappop(self._finished)[1], None)
        while self._calls_expiry and self._calls_expiry[0][0] < horizon:
            self._calls.discard(heapq.heappop(self._calls_expiry)[1])
        while self._failed_expiry and self._failed_expiry[0][0] < horizon:
            self._failed.discard(heapq.heappop(self._failed_expiry)[1])
        window_start = at_ms - self.window_ms
        for times in (*self._offers.values(), *self._recycles.values()):
            del times[: bisect.bisect_left(times, window_start)]

    def _is_late(self, at_ms: int) -> bool:
        return self.watermark_ms is not None and at_ms < self.watermark_ms - self.retention_ms

    # -- tasks -----------------------------------------------------------------------------

    def _transition(self, ev: TaskTransition) -> list[Observation]:
        if ev.from_status == ev.to_status:  # a merge into the task: not a transition
            return []
        task = self._tasks.get(ev.task_id)
        if task is None:
            if self._is_late(ev.at_ms):
                self.late += 1
                return []
            task = self._tasks[ev.task_id] = _Task(line_name(ev.business_line), ev.category)
        if any(e.key == ev.key for e in task.events):
            self.duplicates += 1
            return []
        bisect.insort(task.events, ev, key=lambda e: e.order)
        line = task.line
        out: list[Observation] = [Count("transitions", (line, ev.to_status))]
        if ev.to_status == "COMPLETED":
            out.append(Count("handled", (line, task.category)))
        elif ev.to_status == "RECYCLED":
            out.append(Count("recycled", (line, ev.reason or "unknown")))
        if ev.to_status in TERMINAL and task.terminal is None:
            task.terminal = ev
            heapq.heappush(self._finished, (ev.at_ms, ev.task_id))
        self._window(ev, line)
        out.extend(self._pair_waits(task))
        return out

    def _window(self, ev: TaskTransition, line: str) -> None:
        if self.watermark_ms is not None and ev.at_ms < self.watermark_ms - self.window_ms:
            return
        if ev.to_status == "ASSIGNED":
            bisect.insort(self._offers[line], ev.at_ms)
        elif ev.to_status == "RECYCLED":
            bisect.insort(self._recycles[line], ev.at_ms)

    def _pair_waits(self, task: _Task) -> list[Observation]:
        """Wait samples of enqueue events whose leaving event is now known: the event
        right after the enqueue (in event time) that leaves its status. While an event
        in between is missing (the successor does not start from the enqueue's status),
        nothing is measured: a gap never makes a wait look longer than it was."""
        out: list[Observation] = []
        events = task.events
        for start, leave in itertools.pairwise(events):
            if start.to_status not in WAITING or start.key in task.paired:
                continue
            if leave.from_status != start.to_status:
                continue
            task.paired.add(start.key)
            if leave.to_status == "ASSIGNED":
                seconds = max(0, leave.at_ms - start.at_ms) / 1000
                out.append(WaitSample(task.line, task.category, seconds))
        return out

    # -- agents, calls, bad rows -----------------------------------------------------------

    def _presence(self, ev: AgentPresence) -> list[Observation]:
        known = self._agents.get(ev.agent_id)
        if known is None or (ev.at_ms, ev.to_presence) > (known.at_ms, known.to_presence):
            self._agents[ev.agent_id] = ev
        elif known == ev:
            self.duplicates += 1
        return []

    def _call(self, ev: CallRecord) -> list[Observation]:
        if ev.key in self._calls:
            self.duplicates += 1
            return []
        if self._is_late(ev.at_ms):
            self.late += 1
            return []
        self._calls.add(ev.key)
        heapq.heappush(self._calls_expiry, (ev.at_ms, ev.key))
        line = line_name(ev.business_line)
        tags = self._tags[line]
        tag = ev.call_tag
        if tag not in tags:
            if len(tags) < self.max_call_tags:
                tags.add(tag)
            else:
                tag = OTHER_TAG
        return [Count("calls", (line, ev.call_type, tag))]

    def _failed_event(self, ev: FailedEventRecord) -> list[Observation]:
        if ev.key in self._failed:
            self.duplicates += 1
            return []
        if self._is_late(ev.at_ms):
            self.late += 1
            return []
        self._failed.add(ev.key)
        heapq.heappush(self._failed_expiry, (ev.at_ms, ev.key))
        return [Count("failed_events", (ev.schema,))]

    # -- reading ---------------------------------------------------------------------------

    def gauges(self) -> Gauges:
        open_tasks: Counter[tuple[str, str, str]] = Counter()
        waiting: Counter[tuple[str, str]] = Counter()
        oldest: dict[str, int] = {}
        for task in self._tasks.values():
            cur = task.current()
            if cur.to_status in TERMINAL:
                continue
            open_tasks[(task.line, task.category, cur.to_status)] += 1
            if cur.to_status in WAITING:
                waiting[(task.line, task.category)] += 1
                if task.category != "REVISIT":
                    oldest[task.line] = min(oldest.get(task.line, cur.at_ms), cur.at_ms)
        agents: Counter[tuple[str, str]] = Counter(
            (line_name(a.business_line), a.to_presence) for a in self._agents.values()
        )
        return Gauges(
            open_tasks=dict(open_tasks),
            waiting=dict(waiting),
            oldest_wait_started_ms=oldest,
            agents=dict(agents),
            window_offers={k: len(v) for k, v in self._offers.items()},
            window_recycles={k: len(v) for k, v in self._recycles.items()},
            watermark_ms=self.watermark_ms,
        )

    @property
    def tasks_tracked(self) -> int:
        return len(self._tasks)

    def lines(self) -> Iterable[str]:
        """Business lines seen (so a line's gauges read 0 rather than vanish)."""
        seen = {t.line for t in self._tasks.values()}
        seen.update(line_name(a.business_line) for a in self._agents.values())
        seen.update(self._offers, self._recycles)
        return seen
