"""A compressed call-center day played against a running :class:`LocalPlatform`.

09:00-18:00 in ``hour_s`` real seconds per hour. Clues arrive for the sales and
after-sales lines, agents take offers from their streams, accept, call, complete or ask
for a call-back (a REVISIT task the scheduler wakes up), one sleepy agent lets offers
ring out (the scheduler's timeout jobs recycle them), agents go on lunch break and come
back, ops change the sales routing live at 11:00 and open the FINANCE line at 13:00 (one
config document: until then a FINANCE clue is turned away), and with ``chaos`` the
scheduler worker, the BI intake and the assignment service are killed with SIGKILL and
restarted mid-afternoon while work goes on. The clients behave like production ones:
a call that fails with UNAVAILABLE is retried with the same idempotency key, an offer
stream that breaks is opened again.

:func:`play` returns a :class:`DayLog` of what the clients saw; ``crm_tools.day_report``
reads the databases, scheduler jobs and BI files back and checks they agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias, TypeVar

import grpc
from crm.assignment.v1 import assignment_pb2 as pb
from crm.assignment.v1 import assignment_pb2_grpc as pb_grpc
from crm.common.v1 import common_pb2
from crm.recommendation.v1 import recommendation_pb2 as rpb
from crm.scheduler.v1 import scheduler_pb2 as spb
from crm.scheduler.v1 import scheduler_pb2_grpc as spb_grpc
from crm_common.config_watch import put_json
from crm_common.lines import default_name
from google.protobuf.timestamp_pb2 import Timestamp

from crm_tools.local_platform import LocalPlatform

Line: TypeAlias = common_pb2.BusinessLine.ValueType
SALE: Line = common_pb2.BUSINESS_LINE_SALE
AFTER_SALE: Line = common_pb2.BUSINESS_LINE_AFTER_SALE
FINANCE: Line = common_pb2.BUSINESS_LINE_FINANCE


def line_label(code: int) -> str:
    """A line as the KPI consumer labels it (``SALE``, ``LINE_4``): lines are data."""
    return default_name(code)


T = TypeVar("T")

# Config as ops would write it (timings compressed: the demo lasts a minute, not a day).
SALE_CONFIG: dict[str, object] = {
    "accept_timeout_s": 3,
    "merge_window_s": 3600,
    "default_priority": 5,
    "source_priority": {"400-hotline": 8, "app": 5, "web": 4},
    "revisit_same_agent_window_s": 10,
}
AFTER_SALE_CONFIG: dict[str, object] = {"accept_timeout_s": 3, "default_priority": 5}
FINANCE_CONFIG: dict[str, object] = {
    "code": 3,  # a line is data: its code is in its config (optional for the well-known)
    "accept_timeout_s": 4,
    "default_priority": 6,
    "source_priority": {"loan-calculator": 8},
    "weights": {"wait_per_minute": 5},
}
SALE_CHANGE: dict[str, object] = {**SALE_CONFIG, "accept_timeout_s": 8, "weights": {"star": 500}}
SALE_CHANGE_FIELDS: dict[str, object] = {"accept_timeout_s": 8, "weights.star": 500}
"""The 11:00 change as the fields ops patch (``crmctl config set --set PATH=VALUE``)."""
INITIAL_CONFIG: dict[str, dict[str, object]] = {
    "assignment/SALE": SALE_CONFIG,
    "assignment/AFTER_SALE": AFTER_SALE_CONFIG,
}

CITIES = ["beijing", "shanghai", "tianjin"]
BRANDS = ["BMW", "Audi", "Toyota", "Honda", "Volkswagen"]
SOURCES = {SALE: ["app", "web", "400-hotline"], AFTER_SALE: ["app", "400-hotline"]}
SOURCES[FINANCE] = ["loan-calculator", "app"]
# clues per simulated hour: a morning peak, a lunch dip, an afternoon peak
ARRIVALS = {9: 3, 10: 4, 11: 4, 12: 2, 13: 4, 14: 4, 15: 4, 16: 3, 17: 2}


class StreamEnded(Exception):
    """The offer stream ended (the server is stopping)."""


@dataclass
class AgentSpec:
    id: int
    name: str
    line: Line
    cities: list[str]
    brands: list[str]
    capacity: int = 1
    answers: bool = True  # a sleepy agent never accepts: its offers time out
    lunch: bool = False  # on BREAK 12:00-13:00


AGENTS = [
    AgentSpec(101, "Li Na", SALE, ["beijing", "tianjin"], ["BMW", "Audi"], lunch=True),
    AgentSpec(102, "Wang Wei", SALE, ["beijing", "shanghai"], ["Toyota", "Honda"]),
    AgentSpec(103, "Zhang Min", SALE, [], ["Volkswagen"], capacity=2, lunch=True),
    AgentSpec(104, "Sleepy Liu", SALE, [], [], answers=False),
    AgentSpec(201, "Chen Jing", AFTER_SALE, [], ["BMW"], lunch=True),
    AgentSpec(202, "Zhao Lei", AFTER_SALE, ["shanghai"], []),
    AgentSpec(301, "Sun Hui", FINANCE, [], []),
    AgentSpec(302, "Zhou Yan", FINANCE, ["beijing"], [], lunch=True),
]


@dataclass(frozen=True)
class InFlight:
    """Work under way at one moment: what a kill at that moment could lose."""

    held: int  # tasks agents accepted and are calling about (the clients' own count)
    jobs_pending: int  # scheduler jobs not finished (scheduled, enqueued or running)
    jobs_due: int  # of those, due now (enqueued or running): a worker should be on them
    queues: str = ""  # the assignment service's view (QueueStats), when it answered

    def __str__(self) -> str:
        return (
            f"in flight: {self.held} tasks held by agents mid-call, "
            f"{self.jobs_pending} scheduler jobs pending ({self.jobs_due} due)"
            + (f"; {self.queues}" if self.queues else "")
        )


@dataclass
class DayLog:
    """What the clients of the platform saw during the day."""

    started: float = 0.0
    hour_s: float = 4.0
    acknowledged: dict[str, int] = field(default_factory=dict)  # idempotency key -> task
    merged: int = 0
    turned_away: list[str] = field(default_factory=list)  # clues refused (line closed)
    offers: Counter[int] = field(default_factory=Counter)  # by line
    ring_outs: int = 0
    accepted: Counter[int] = field(default_factory=Counter)
    completed: Counter[int] = field(default_factory=Counter)
    failed: Counter[int] = field(default_factory=Counter)
    calls: Counter[int] = field(default_factory=Counter)  # call records, by line
    revisits: int = 0
    presence_changes: int = 0
    retries: int = 0  # calls retried after UNAVAILABLE (a service was down)
    stream_breaks: int = 0  # open offer streams broken (a restart of the service)
    events: list[tuple[float, str]] = field(default_factory=list)  # (sim hour, text)
    marks: list[tuple[float, str]] = field(default_factory=list)  # ops events (charts)
    timeline: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    offer_windows: list[tuple[float, int, float]] = field(default_factory=list)
    finance_open_at: float | None = None
    drained: bool = False
    in_flight: dict[str, InFlight] = field(default_factory=dict)  # at each chaos kill

    def sim_hour(self, now: float | None = None) -> float:
        t = time.monotonic() if now is None else now
        return 9.0 + (t - self.started) / self.hour_s

    def clock(self) -> str:
        h = self.sim_hour()
        return f"{int(h):02d}:{int((h % 1) * 60):02d}"

    def note(self, text: str, say: Callable[[str], None], mark: bool = False) -> None:
        self.events.append((self.sim_hour(), text))
        if mark:
            self.marks.append((self.sim_hour(), text))
        say(f"{self.clock()}  {text}")


def ts(seconds_from_now: float) -> Timestamp:
    t = Timestamp()
    t.FromNanoseconds(int((time.time() + seconds_from_now) * 1e9))
    return t


async def retrying(log: DayLog, call: Callable[[], Awaitable[T]], give_up_s: float = 60) -> T:
    """``call()``, again while the service is UNAVAILABLE (restarting), up to ``give_up_s``.
    Safe because every call made this way is idempotent or carries an idempotency key."""
    deadline = time.monotonic() + give_up_s
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            if time.monotonic() > deadline:
                raise
            log.retries += 1
            await asyncio.sleep(0.3)


@dataclass
class Day:
    platform: LocalPlatform
    stub: pb_grpc.AssignmentServiceAsyncStub
    log: DayLog
    rng: random.Random
    inventory: dict[str, list[rpb.Car]]
    say: Callable[[str], None]
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    on_shift: dict[int, asyncio.Event] = field(default_factory=dict)
    presence: dict[int, int] = field(default_factory=dict)
    rang_out: asyncio.Event = field(default_factory=asyncio.Event)
    holding: int = 0  # tasks accepted and not yet completed or failed, over all agents
    finance_clues: int = 0  # FINANCE clues sent once the line is open
    mid_call: asyncio.Event = field(default_factory=asyncio.Event)  # set while holding > 0

    async def set_presence(self, agent: AgentSpec, presence: int) -> None:
        if self.presence.get(agent.id) == presence:
            return
        await retrying(
            self.log,
            lambda: self.stub.SetPresence(
                pb.SetPresenceRequest(agent_id=agent.id, presence=presence)  # type: ignore[arg-type]
            ),
        )
        self.presence[agent.id] = presence
        self.log.presence_changes += 1

    # -- an agent at the console --------------------------------------------------------
    async def agent(self, spec: AgentSpec) -> None:
        """Take offers from the stream, call, complete; reopen the stream when it breaks."""
        gate = self.on_shift.setdefault(spec.id, asyncio.Event())
        while not self.stop.is_set():
            await gate.wait()
            try:
                await self.set_presence(spec, pb.PRESENCE_IDLE)
                await self._offers(spec, gate)
            except (grpc.aio.AioRpcError, StreamEnded) as exc:
                if isinstance(exc, grpc.aio.AioRpcError) and exc.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.CANCELLED,
                ):
                    raise
                if self.stop.is_set():
                    return
                await asyncio.sleep(0.3)

    async def _offers(self, spec: AgentSpec, gate: asyncio.Event) -> None:
        stream = self.stub.StreamOffers(pb.StreamOffersRequest(agent_id=spec.id))
        stopper = asyncio.ensure_future(self.stop.wait())
        opened = time.monotonic()
        try:
            while gate.is_set() and not self.stop.is_set():
                nxt = asyncio.ensure_future(stream.read())
                done, _ = await asyncio.wait(
                    {nxt, stopper}, timeout=0.5, return_when=asyncio.FIRST_COMPLETED
                )
                while not done and gate.is_set():
                    done, _ = await asyncio.wait(
                        {nxt, stopper}, timeout=0.5, return_when=asyncio.FIRST_COMPLETED
                    )
                if nxt not in done:
                    nxt.cancel()
                    return
                msg = nxt.result()
                if not isinstance(msg, pb.StreamOffersResponse):
                    raise StreamEnded  # the server stopped: open the stream again
                await self._handle(spec, msg.offer)
        except (grpc.aio.AioRpcError, StreamEnded):
            if time.monotonic() - opened > 1 and not self.stop.is_set():
                self.log.stream_breaks += 1
            raise
        finally:
            stopper.cancel()
            stream.cancel()

    async def _handle(self, spec: AgentSpec, offer: pb.Offer) -> None:
        task = offer.task
        self.log.offers[spec.line] += 1
        window = offer.deadline.ToNanoseconds() / 1e9 - time.time()
        self.log.offer_windows.append((self.log.sim_hour(), spec.line, window))
        if not spec.answers:
            self.log.ring_outs += 1
            self.rang_out.set()
            self.log.note(f"{spec.name} lets the offer of task {task.id} ring out", self.say)
            return
        await asyncio.sleep(self.rng.uniform(0.05, 0.3))
        try:
            await retrying(
                self.log,
                lambda: self.stub.AcceptTask(
                    pb.AcceptTaskRequest(task_id=task.id, agent_id=spec.id)
                ),
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION or not await self._holds(
                spec, task.id
            ):
                return  # too late: recycled to someone else
        self.log.accepted[spec.line] += 1
        self.holding += 1
        self.mid_call.set()
        try:
            started = ts(0)
            await asyncio.sleep(self.rng.uniform(0.2, 0.6) * self.log.hour_s / 4)  # the call
            roll = self.rng.random()
            call_req = pb.RecordCallRequest(
                call_id=f"call-{task.id}-{spec.id}",
                task_id=task.id,
                agent_id=spec.id,
                call_type=pb.CALL_TYPE_CALLOUT,
                provider=self.rng.choice([pb.TELEPHONY_PROVIDER_ZT, pb.TELEPHONY_PROVIDER_RL]),
                started_at=started,
                duration_seconds=0 if roll < 0.1 else self.rng.randrange(60, 900),
                outcome=pb.CALL_OUTCOME_NO_ANSWER if roll < 0.1 else pb.CALL_OUTCOME_CONNECTED,
                note="" if roll < 0.1 else "talked about the car and a test drive",
            )
            # the same call id on a retry returns the same record (idempotent)
            await retrying(self.log, lambda: self.stub.RecordCall(call_req))
            self.log.calls[spec.line] += 1
            req: Any
            if roll < 0.1:
                req = pb.FailTaskRequest(task_id=task.id, agent_id=spec.id, reason="unreachable")
                call: Callable[[], Awaitable[Any]] = lambda: self.stub.FailTask(req)  # noqa: E731
                outcome = "failed"
            elif roll < 0.3 and task.category == pb.CATEGORY_NEW_CLUE:
                req = pb.CompleteTaskRequest(
                    task_id=task.id,
                    agent_id=spec.id,
                    note="asked to call back",
                    revisit_at=ts(self.log.hour_s),
                )
                call = lambda: self.stub.CompleteTask(req)  # noqa: E731
                outcome = "revisit"
            else:
                req = pb.CompleteTaskRequest(task_id=task.id, agent_id=spec.id, note="visit booked")
                call = lambda: self.stub.CompleteTask(req)  # noqa: E731
                outcome = "completed"
            try:
                await retrying(self.log, call)
            except grpc.aio.AioRpcError as exc:
                # a retry after a restart may find the first attempt already applied
                if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
            if outcome == "failed":
                self.log.failed[spec.line] += 1
            else:
                self.log.completed[spec.line] += 1
            if outcome == "revisit":
                self.log.revisits += 1
                self.log.note(f"{spec.name} completed task {task.id}; call-back in 1 h", self.say)
        finally:
            self.holding -= 1
            if not self.holding:
                self.mid_call.clear()

    async def _holds(self, spec: AgentSpec, task_id: int) -> bool:
        detail = await retrying(self.log, lambda: self.stub.GetTask(pb.GetTaskRequest(id=task_id)))
        return detail.task.status == pb.STATUS_IN_PROGRESS and detail.task.agent_id == spec.id

    # -- clues --------------------------------------------------------------------------
    async def clue(self, n: int, line: Line, phone: str) -> None:
        brand = self.rng.choice(BRANDS)
        car = self.rng.choice(self.inventory[brand])
        key = f"day-{n}"
        req = pb.CreateClueRequest(
            idempotency_key=key,
            phone=phone,
            business_line=line,
            source=self.rng.choice(SOURCES[line]),
            city=self.rng.choice(CITIES),
            intent_car_ids=[car.id],
            brands=[brand],
            budget_min_yuan=50_000,
            budget_max_yuan=self.rng.choice([150_000, 300_000]),
        )
        try:
            resp = await retrying(self.log, lambda: self.stub.CreateClue(req))
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            self.log.turned_away.append(key)
            self.log.note(f"{line_label(line)} clue turned away: {exc.details()}", self.say)
            return
        self.log.acknowledged[key] = resp.task.id
        if resp.merged:
            self.log.merged += 1

    async def clues(self) -> None:
        n = 0
        phones: list[tuple[Line, str]] = []
        for hour, count in ARRIVALS.items():
            hour_end = self.log.started + (hour - 9 + 1) * self.log.hour_s
            for i in range(count):
                n += 1
                open_lines = [SALE, SALE, SALE, AFTER_SALE, AFTER_SALE]
                if self.log.finance_open_at is not None:
                    open_lines += [FINANCE, FINANCE]
                if phones and i == count - 1:  # a customer calls again: merges
                    line, phone = self.rng.choice(phones)
                else:
                    line = SALE if n == 1 else self.rng.choice(open_lines)
                    if self.log.finance_open_at is not None and not self.finance_clues:
                        line = FINANCE  # the first clue after the line opened
                    self.finance_clues += line == FINANCE
                    phone = f"1{self.rng.choice('358')}{self.rng.randrange(10**9):09d}"
                    phones.append((line, phone))
                await self.clue(n, line, phone)
                if n == 2:
                    detail = await self.stub.GetTask(
                        pb.GetTaskRequest(id=self.log.acknowledged["day-2"])
                    )
                    await self.stub.SetCustomerStar(
                        pb.SetCustomerStarRequest(customer_id=detail.task.customer_id, star=True)
                    )
                    self.log.note(f"customer {detail.task.customer_id} is a star", self.say)
                left = hour_end - time.monotonic()
                await asyncio.sleep(max(0.0, left / max(1, count - i)) * self.rng.uniform(0.5, 1))
            await asyncio.sleep(max(0.0, hour_end - time.monotonic()))

    async def sample(self) -> None:
        """Queue depths over the day (for the report's timeline)."""
        while not self.stop.is_set():
            with contextlib.suppress(grpc.aio.AioRpcError):
                stats = await self.stub.QueueStats(pb.QueueStatsRequest(), timeout=2)
                point: Counter[str] = Counter()
                for q in stats.queues:
                    name = line_label(q.business_line)
                    point[f"{name} waiting"] += q.waiting
                    point["with an agent"] += q.in_progress + q.offered
                self.log.timeline.append((self.log.sim_hour(), dict(point)))
            await asyncio.sleep(self.log.hour_s / 6)


async def at_hour(log: DayLog, hour: float) -> None:
    await asyncio.sleep(max(0.0, log.started + (hour - 9) * log.hour_s - time.monotonic()))


async def wait_drained(
    stub: pb_grpc.AssignmentServiceAsyncStub, log: DayLog, timeout: float
) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(grpc.aio.AioRpcError):
            stats = await stub.QueueStats(pb.QueueStatsRequest(), timeout=2)
            if all(q.waiting + q.offered + q.in_progress + q.scheduled == 0 for q in stats.queues):
                return True
        await asyncio.sleep(0.5)
    return False


PENDING_JOB_STATES = (
    spb.JOB_STATE_SCHEDULED,
    spb.JOB_STATE_ENQUEUED,
    spb.JOB_STATE_RUNNING,
)


async def jobs_pending(platform: LocalPlatform) -> tuple[int, int]:
    """Scheduler jobs not finished, and of those the ones due now."""
    pending = due = 0
    async with grpc.aio.insecure_channel(platform.target("scheduler")) as ch:
        sched = spb_grpc.SchedulerServiceStub(ch)
        token = ""
        while True:
            page = await sched.List(
                spb.ListRequest(
                    states=PENDING_JOB_STATES,
                    page=common_pb2.PageRequest(page_size=500, page_token=token),
                ),
                timeout=5,
            )
            pending += len(page.jobs)
            due += sum(1 for j in page.jobs if j.state != spb.JOB_STATE_SCHEDULED)
            token = page.page.next_page_token
            if not token:
                return pending, due


async def queue_view(stub: pb_grpc.AssignmentServiceAsyncStub) -> str:
    stats = await stub.QueueStats(pb.QueueStatsRequest(), timeout=5)
    return (
        f"a moment before, assignment showed {sum(q.offered for q in stats.queues)} offers out, "
        f"{sum(q.in_progress for q in stats.queues)} tasks in progress, "
        f"{sum(q.waiting for q in stats.queues)} waiting"
    )


async def kill_mid_call(day: Day, names: tuple[str, ...], timeout: float) -> InFlight:
    """SIGKILL ``names`` at a moment when agents are mid-call on tasks (accepted, not yet
    completed: RecordCall, CompleteTask and their BI events still to come), waiting up
    to ``timeout`` s for one; returns what was in flight (the tasks held counted at the
    kill; the scheduler's jobs read right after it, as the scheduler API stays up). The
    chaos notes print it; the e2e test asserts there was work to lose."""
    queues = ""
    with contextlib.suppress(grpc.aio.AioRpcError):  # the assignment service's view
        queues = await queue_view(day.stub)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(day.mid_call.wait(), timeout)
    held = day.holding
    for name in names:
        await day.platform.kill(name)
    pending, due = await jobs_pending(day.platform)
    return InFlight(held=held, jobs_pending=pending, jobs_due=due, queues=queues)


CHAOS_FIRST = ("scheduler-worker", "scheduler-pump", "bilog", "bilog-sink")
"""Killed together at 14:00, back at 14:30 (the scheduler's pump and worker, the BI
intake and the BI file sink); the assignment service is killed alone at 15:00."""


async def play(
    platform: LocalPlatform,
    inventory: list[rpb.Car],
    *,
    seed: int = 7,
    hour_s: float = 4.0,
    chaos: bool = False,
    say: Callable[[str], None] = print,
    open_finance: Callable[[], Awaitable[str]] | None = None,
    change_config: Callable[[str, dict[str, object]], Awaitable[int]] | None = None,
) -> DayLog:
    """Play the day; returns what the clients saw (the report checks it against the
    platform's own records). ``open_finance()`` opens the FINANCE line and says how;
    ``change_config(key, fields)`` patches fields of a config key (e.g.
    ``assignment/SALE``) and returns the revision written; without them the config is
    written to etcd directly."""
    log = DayLog(hour_s=hour_s)
    rng = random.Random(seed)
    by_brand: dict[str, list[rpb.Car]] = {}
    for car in inventory:
        by_brand.setdefault(car.brand, []).append(car)
    async with grpc.aio.insecure_channel(platform.target("assignment")) as ch:
        stub = pb_grpc.AssignmentServiceStub(ch)
        day = Day(platform, stub, log, rng, by_brand, say)
        for a in AGENTS:
            await stub.UpsertAgent(
                pb.UpsertAgentRequest(
                    agent=pb.Agent(
                        id=a.id,
                        name=a.name,
                        business_line=a.line,
                        cities=a.cities,
                        brands=a.brands,
                        capacity=a.capacity,
                    )
                )
            )
        log.started = time.monotonic()
        log.note(
            f"the day starts: {len(AGENTS)} agents on three lines; for sales only "
            "Sleepy Liu is at the console yet",
            say,
        )
        late = [a for a in AGENTS if a.line == SALE and a.answers]  # the sales shift
        for a in AGENTS:
            day.on_shift[a.id] = asyncio.Event()
            if a not in late:
                day.on_shift[a.id].set()
        tasks = [asyncio.create_task(day.agent(a)) for a in AGENTS]
        sampler = asyncio.create_task(day.sample())
        clues = asyncio.create_task(day.clues())

        async def ops() -> None:
            with contextlib.suppress(TimeoutError):  # the first sales offer rings out
                await asyncio.wait_for(day.rang_out.wait(), 2 * hour_s)
            for a in late:
                day.on_shift[a.id].set()
            log.note(f"the sales shift signs in: {', '.join(a.name for a in late)}", say)
            await at_hour(log, 9.5)
            log.note("a FINANCE clue arrives before the line is configured", say)
            await day.clue(0, FINANCE, f"15{rng.randrange(10**9):09d}")
            await at_hour(log, 10)
            log.note("Sleepy Liu goes on BREAK: no more offers for them", say)
            day.on_shift[104].clear()
            await day.set_presence(AGENTS[3], pb.PRESENCE_BREAK)
            await at_hour(log, 11)

            async def sales_change() -> None:  # crmctl takes a while: the day goes on
                log.note(
                    "ops patch the sales routing: accept window 8 s, weights.star 500 "
                    + ("(`crmctl config set assignment SALE --set ...`)" if change_config else ""),
                    say,
                )
                if change_config is not None:
                    rev = await change_config("assignment/SALE", SALE_CHANGE_FIELDS)
                else:
                    rev = await put_json(
                        platform.etcd, f"{platform.prefix}/assignment/SALE", SALE_CHANGE
                    )
                log.note(
                    f"ops raise the sales accept window 3 s -> 8 s and favour star customers "
                    f"(etcd revision {rev}); applied live",
                    say,
                    mark=True,
                )

            change = asyncio.create_task(sales_change())
            await at_hour(log, 12)
            lunch = [a for a in AGENTS if a.lunch]
            log.note(f"lunch: {', '.join(a.name for a in lunch)} on BREAK", say, mark=True)
            for a in lunch:
                day.on_shift[a.id].clear()
                await day.set_presence(a, pb.PRESENCE_BREAK)
            await at_hour(log, 13)
            for a in lunch:
                day.on_shift[a.id].set()
            log.note("back from lunch", say, mark=True)
            how = await (open_finance() if open_finance else _open_finance(platform))
            log.finance_open_at = log.sim_hour()
            log.note(f"ops open the FINANCE line ({how}): it starts taking clues", say, mark=True)
            await change
            if chaos:
                await at_hour(log, 14)
                # kill while agents are mid-call and offer timeouts are pending
                now = await kill_mid_call(day, CHAOS_FIRST, hour_s)
                log.in_flight["scheduler worker"] = now
                log.note(
                    "CHAOS: scheduler worker and BI intake killed (SIGKILL), with the "
                    f"scheduler pump and the BI file sink; {now}",
                    say,
                    mark=True,
                )
                await at_hour(log, 14.5)
                back = asyncio.gather(*(platform.restart(name) for name in CHAOS_FIRST))
                await at_hour(log, 15)
                now = await kill_mid_call(day, ("assignment",), hour_s)
                log.in_flight["assignment"] = now
                log.note(f"CHAOS: the assignment service killed (SIGKILL); {now}", say, mark=True)
                await platform.restart("assignment")
                log.note("assignment back; clients retried and reopened their streams", say)
                await back
                log.note("scheduler pump and worker, BI intake and file sink back", say)

        try:
            await asyncio.gather(clues, ops())
            log.note("18:00: no more clues; waiting for queues and call-backs to drain", say)
            log.drained = await wait_drained(stub, log, timeout=max(60.0, 10 * hour_s))
        finally:
            day.stop.set()
            for a in AGENTS:
                day.on_shift[a.id].set()
            await asyncio.gather(*tasks, sampler, return_exceptions=True)
            clues.cancel()
        log.note("queues drained" if log.drained else "WARNING: queues did not drain", say)
    return log


async def _open_finance(platform: LocalPlatform) -> str:
    rev = await put_json(platform.etcd, f"{platform.prefix}/assignment/FINANCE", FINANCE_CONFIG)
    return f"config written to etcd at revision {rev}"
