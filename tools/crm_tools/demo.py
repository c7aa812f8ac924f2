"""`make demo`: the platform locally, and a short, compressed call-center scenario.

1. the local stack is up (MariaDB, Redis, etcd, Tansu; `make demo` starts it);
2. the platform runs as processes, each on a free port (logs under .demo/):
   the recommendation service (fresh `<name>_reco` database, a small car inventory
   loaded through UpsertCars), the bilog dev schema registry (`<name>_bireg`), the
   bilog intake service and its file sink (Avro files under .demo/<name>/bi-files),
   and the assignment service (fresh `<name>` database, configured from etcd: routing
   weights and timeouts per business line; task details carry recommended cars and
   every task transition goes to bilog);
3. agents of the sales and after-sales lines go IDLE and open their offer streams;
   clues arrive (some are duplicates and merge, one customer is a star);
4. agents accept, call and complete, some ask for a revisit (call-back); one agent
   never answers, so its offers time out and are recycled to colleagues;
5. mid-run, ops change the sales routing config in etcd: the service applies it live;
6. a summary is printed (with the cars recommended on a task and the BI records read
   back from the sink's files); everything started here is stopped, in reverse order,
   also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shutil
import signal
import sys
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeAlias

import fastavro
import grpc
from crm.assignment.v1 import assignment_pb2 as pb
from crm.assignment.v1 import assignment_pb2_grpc as pb_grpc
from crm.common.v1 import common_pb2
from crm.recommendation.v1 import recommendation_pb2 as rpb
from crm.recommendation.v1 import recommendation_pb2_grpc as rpb_grpc
from crm_common.config_watch import put_json
from crm_devstack import create_database, drop_database, free_port, up
from google.protobuf.timestamp_pb2 import Timestamp

from crm_tools.procs import (
    ServiceProc,
    start_service,
    wait_http,
    wait_log,
    wait_serving,
)

Line: TypeAlias = common_pb2.BusinessLine.ValueType
SALE: Line = common_pb2.BUSINESS_LINE_SALE
AFTER_SALE: Line = common_pb2.BUSINESS_LINE_AFTER_SALE
LINE_NAMES = {SALE: "SALE", AFTER_SALE: "AFTER_SALE"}
STATUS = {v: k.removeprefix("STATUS_") for k, v in pb.Status.items()}
ROOT = Path(__file__).resolve().parents[2]

# Config as ops would write it (compressed timings so the demo lasts seconds, not hours).
SALE_CONFIG: dict[str, object] = {
    "accept_timeout_s": 3,
    "merge_window_s": 3600,
    "default_priority": 5,
    "source_priority": {"400-hotline": 8, "app": 5, "web": 4},
    "revisit_same_agent_window_s": 10,
}
AFTER_SALE_CONFIG: dict[str, object] = {"accept_timeout_s": 3, "default_priority": 5}


@dataclass
class AgentSpec:
    id: int
    name: str
    line: Line
    cities: list[str]
    brands: list[str]
    capacity: int = 1
    answers: bool = True  # a sleepy agent never accepts: its offers time out


AGENTS = [
    AgentSpec(101, "Li Na", SALE, ["beijing", "tianjin"], ["BMW", "Audi"]),
    AgentSpec(102, "Wang Wei", SALE, ["beijing", "shanghai"], ["Toyota", "Honda"]),
    AgentSpec(103, "Zhang Min", SALE, [], ["Volkswagen"], capacity=2),
    AgentSpec(104, "Sleepy Liu", SALE, [], [], answers=False),
    AgentSpec(201, "Chen Jing", AFTER_SALE, [], ["BMW"]),
    AgentSpec(202, "Zhao Lei", AFTER_SALE, ["shanghai"], []),
]

CITIES = ["beijing", "shanghai", "tianjin"]
BRANDS = ["BMW", "Audi", "Toyota", "Honda", "Volkswagen"]
SOURCES = ["app", "web", "400-hotline"]
SERIES = {
    "BMW": ["3 Series", "5 Series", "X3", "X5"],
    "Audi": ["A4L", "A6L", "Q5L"],
    "Toyota": ["Camry", "Corolla", "RAV4", "Sienna"],
    "Honda": ["Accord", "Civic", "CR-V", "Odyssey"],
    "Volkswagen": ["Passat", "Lavida", "Tiguan L", "Golf"],
}
BODY_TYPES = {
    "X3": rpb.BODY_TYPE_SUV,
    "X5": rpb.BODY_TYPE_SUV,
    "Q5L": rpb.BODY_TYPE_SUV,
    "RAV4": rpb.BODY_TYPE_SUV,
    "CR-V": rpb.BODY_TYPE_SUV,
    "Tiguan L": rpb.BODY_TYPE_SUV,
    "Sienna": rpb.BODY_TYPE_MPV,
    "Odyssey": rpb.BODY_TYPE_MPV,
    "Golf": rpb.BODY_TYPE_HATCHBACK,
}
INVENTORY_SIZE = 300


def make_inventory(seed: int, size: int = INVENTORY_SIZE) -> list[rpb.Car]:
    """A small used-car inventory over the demo's brands and cities (ids 1..size)."""
    rng = random.Random(seed)
    cars = []
    for car_id in range(1, size + 1):
        brand = BRANDS[car_id % len(BRANDS)]
        series = rng.choice(SERIES[brand])
        year = rng.randint(2015, 2024)
        cars.append(
            rpb.Car(
                id=car_id,
                brand=brand,
                series=series,
                model_year=year,
                mileage_km=rng.randrange(5_000, 15_000) * (2025 - year),
                price_yuan=rng.randrange(50, 401) * 1000,
                city=rng.choice(CITIES),
                body_type=BODY_TYPES.get(series, rpb.BODY_TYPE_SEDAN),
                status=rpb.CAR_STATUS_ON_SALE,
            )
        )
    return cars


@dataclass
class Tally:
    offers: Counter[int] = field(default_factory=Counter)
    accepted: Counter[int] = field(default_factory=Counter)
    completed: Counter[int] = field(default_factory=Counter)
    failed: Counter[int] = field(default_factory=Counter)
    revisits: int = 0
    merged: int = 0
    created: int = 0
    # (task id, accept window in seconds) of offers to sales agents
    offer_windows: list[tuple[int, float]] = field(default_factory=list)
    wave2: set[int] = field(default_factory=set)  # tasks created after the config change
    rang_out: asyncio.Event = field(default_factory=asyncio.Event)
    offers_before_change: int = 0
    tasks: set[int] = field(default_factory=set)
    cars_by_brand: dict[str, list[rpb.Car]] = field(default_factory=dict)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ts(seconds_from_now: float) -> Timestamp:
    t = Timestamp()
    t.FromNanoseconds(int((time.time() + seconds_from_now) * 1e9))
    return t


async def agent_loop(
    stub: pb_grpc.AssignmentServiceAsyncStub,
    spec: AgentSpec,
    tally: Tally,
    rng: random.Random,
    stop: asyncio.Event,
) -> None:
    """One agent at the console: take offers from the stream, call, complete."""
    await stub.SetPresence(pb.SetPresenceRequest(agent_id=spec.id, presence=pb.PRESENCE_IDLE))
    stream = stub.StreamOffers(pb.StreamOffersRequest(agent_id=spec.id))
    stopper = asyncio.create_task(stop.wait())
    try:
        while not stop.is_set():
            nxt: asyncio.Task[object] = asyncio.create_task(stream.read())
            done, _ = await asyncio.wait({nxt, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if nxt not in done:
                nxt.cancel()
                break
            msg = nxt.result()
            if not isinstance(msg, pb.StreamOffersResponse):
                break  # end of stream
            offer = msg.offer
            task = offer.task
            tally.offers[spec.line] += 1
            window = offer.deadline.ToNanoseconds() / 1e9 - time.time()
            if spec.line == SALE:
                tally.offer_windows.append((task.id, window))
            if not spec.answers:
                tally.rang_out.set()
                say(f"  {spec.name} lets offer of task {task.id} ring out ...")
                continue
            await asyncio.sleep(rng.uniform(0.1, 0.5))
            try:
                await stub.AcceptTask(pb.AcceptTaskRequest(task_id=task.id, agent_id=spec.id))
            except grpc.aio.AioRpcError as exc:
                say(f"  {spec.name} was too late for task {task.id}: {exc.code().name}")
                continue
            tally.accepted[spec.line] += 1
            await asyncio.sleep(rng.uniform(0.3, 1.0))  # the call
            roll = rng.random()
            if roll < 0.1:
                await stub.FailTask(
                    pb.FailTaskRequest(
                        task_id=task.id, agent_id=spec.id, reason="customer unreachable"
                    )
                )
                tally.failed[spec.line] += 1
                say(f"  {spec.name} failed task {task.id} (customer unreachable)")
            elif roll < 0.3 and task.category == pb.CATEGORY_NEW_CLUE:
                await stub.CompleteTask(
                    pb.CompleteTaskRequest(
                        task_id=task.id,
                        agent_id=spec.id,
                        note="asked to call back",
                        revisit_at=ts(4),
                    )
                )
                tally.completed[spec.line] += 1
                tally.revisits += 1
                say(f"  {spec.name} completed task {task.id}; call-back in 4 s")
            else:
                await stub.CompleteTask(
                    pb.CompleteTaskRequest(
                        task_id=task.id, agent_id=spec.id, note="test drive booked"
                    )
                )
                tally.completed[spec.line] += 1
                kind = "revisit" if task.category == pb.CATEGORY_REVISIT else "task"
                say(f"  {spec.name} completed {kind} {task.id}")
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.CANCELLED:
            raise
    finally:
        stopper.cancel()
        stream.cancel()


async def send_clues(
    stub: pb_grpc.AssignmentServiceAsyncStub,
    tally: Tally,
    rng: random.Random,
    indexes: range,
    wave: set[int] | None = None,
) -> None:
    """Clues ``indexes``; the ids of the tasks they create go into ``wave`` if given."""
    phones = [f"138{rng.randrange(10**8):08d}" for _ in range(indexes.stop)]
    lines = [SALE if i % 3 else AFTER_SALE for i in range(indexes.stop)]
    for i in indexes:
        # every fifth clue repeats the previous customer (same line, moments later):
        # it merges into that customer's open task
        dup = i % 5 == 4
        phone = phones[i - 1] if dup else phones[i]
        line = lines[i - 1] if dup else lines[i]
        brand = rng.choice(BRANDS)
        car = rng.choice(tally.cars_by_brand[brand])  # a car of the inventory
        resp = await stub.CreateClue(
            pb.CreateClueRequest(
                idempotency_key=f"demo-{i}",
                phone=phone,
                business_line=line,
                source=rng.choice(SOURCES),
                city=rng.choice(CITIES),
                intent_car_ids=[car.id],
                brands=[brand],
                budget_min_yuan=50_000,
                budget_max_yuan=rng.choice([150_000, 300_000]),
            )
        )
        tally.tasks.add(resp.task.id)
        if wave is not None and not resp.merged:
            wave.add(resp.task.id)
        if resp.merged:
            tally.merged += 1
            say(f"clue {i} ({LINE_NAMES[line]}, {brand}) merged into open task {resp.task.id}")
        else:
            tally.created += 1
            say(
                f"clue {i} ({LINE_NAMES[line]}, {brand} {car.series} #{car.id}) "
                f"-> new task {resp.task.id}"
            )
        if i == 2:
            await stub.SetCustomerStar(
                pb.SetCustomerStarRequest(customer_id=resp.task.customer_id, star=True)
            )
            say(f"  customer {resp.task.customer_id} flagged as a star customer")
        await asyncio.sleep(rng.uniform(0.1, 0.4))


async def wait_drained(stub: pb_grpc.AssignmentServiceAsyncStub, timeout: float) -> bool:
    """True once no task waits, is offered or in progress (revisits included)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = await stub.QueueStats(pb.QueueStatsRequest())
        if all(q.waiting + q.offered + q.in_progress + q.scheduled == 0 for q in stats.queues):
            return True
        await asyncio.sleep(0.5)
    return False


async def scenario(
    svc: ServiceProc,
    etcd: str,
    prefix: str,
    seed: int,
    clues: int,
    inventory: list[rpb.Car],
    sink_dir: Path,
) -> int:
    rng = random.Random(seed)
    tally = Tally()
    for car in inventory:
        tally.cars_by_brand.setdefault(car.brand, []).append(car)
    stop = asyncio.Event()
    async with grpc.aio.insecure_channel(svc.target) as ch:
        stub = pb_grpc.AssignmentServiceStub(ch)
        say("agents sign in")
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
        # The early shift: only the sleepy agent is at the console for sales when the first
        # sales clue arrives, so it is offered to them, rings out and is recycled later.
        early = [a for a in AGENTS if not a.answers]
        agents = [asyncio.create_task(agent_loop(stub, a, tally, rng, stop)) for a in early]
        half = max(5, clues // 2)
        say(f"morning wave: {half} clues; only {early[0].name} is signed in for sales yet")
        await send_clues(stub, tally, rng, range(2))
        with contextlib.suppress(TimeoutError):  # until the sleepy agent got that offer
            await asyncio.wait_for(tally.rang_out.wait(), 15)
        say("the rest of the shift signs in")
        agents += [
            asyncio.create_task(agent_loop(stub, a, tally, rng, stop))
            for a in AGENTS
            if a not in early
        ]
        await send_clues(stub, tally, rng, range(2, half))
        say("the sleepy agent goes on BREAK: no more offers for them")
        await stub.SetPresence(pb.SetPresenceRequest(agent_id=104, presence=pb.PRESENCE_BREAK))
        say("ops raise the sales accept window to 8 s and favour star customers (etcd put)")
        tally.offers_before_change = len(tally.offer_windows)
        rev = await put_json(
            etcd,
            f"{prefix}/assignment/SALE",
            {**SALE_CONFIG, "accept_timeout_s": 8, "weights": {"star": 500}},
        )
        say(f"  config written at etcd revision {rev}; the service applies it live")
        await asyncio.sleep(1.0)
        say(f"afternoon wave: {max(clues - half, 3)} clues")
        await send_clues(stub, tally, rng, range(half, max(clues, half + 3)), tally.wave2)
        say("all clues sent; waiting for the queues to drain (revisits included)")
        drained = await wait_drained(stub, timeout=90)
        stop.set()
        await asyncio.gather(*agents, return_exceptions=True)
        await report(stub, tally, drained, sink_dir)
    return 0 if drained else 1


async def show_recommendations(stub: pb_grpc.AssignmentServiceAsyncStub, task_id: int) -> None:
    """The cars an agent sees beside a task (GetTask -> recommendations)."""
    detail = await stub.GetTask(pb.GetTaskRequest(id=task_id))
    recs = detail.recommendations
    if not recs.available:  # e.g. a cold channel missed the deadline: once more
        await asyncio.sleep(0.5)
        detail = await stub.GetTask(pb.GetTaskRequest(id=task_id))
        recs = detail.recommendations
    asked = ", ".join(f"#{c}" for clue in detail.clues for c in clue.intent_car_ids)
    if not recs.available:
        print(f"recommendations on task {task_id}: unavailable ({recs.unavailable_reason})")
        return
    print(
        f"recommendations on task {task_id} (asked about {asked or '-'}): available, "
        f"{len(recs.cars)} cars; top 3:"
    )
    for r in recs.cars[:3]:
        c = r.car
        why = "; ".join(reason.text for reason in r.reasons[:2])
        print(
            f"  #{c.id} {c.brand} {c.series} {c.model_year} {c.price_yuan // 1000}k yuan "
            f"{c.city} (score {r.score:.3f}): {why}"
        )


def count_bi_records(sink_dir: Path) -> dict[tuple[str, str], tuple[int, int]]:
    """Avro records and files per (record name, topic/dt=../hour=..) under the sink dir."""
    out: dict[tuple[str, str], tuple[int, int]] = {}
    for path in sorted(sink_dir.rglob("*.avro")):
        rel = path.relative_to(sink_dir)
        if any(part.startswith((".", "_")) for part in rel.parts):
            continue  # temporary files of a publish in progress, unreadable rows
        try:
            with path.open("rb") as f:
                reader = fastavro.reader(f)
                schema = reader.writer_schema
                name = str(schema.get("name", "?")) if isinstance(schema, dict) else "?"
                n = sum(1 for _ in reader)
        except (OSError, ValueError):
            continue
        key = (name.rsplit(".", 1)[-1], rel.parent.as_posix())
        records, files = out.get(key, (0, 0))
        out[key] = (records + n, files + 1)
    return out


async def wait_bi_files(
    sink_dir: Path, expected: int, timeout: float = 20.0, settle: float = 4.0
) -> dict[tuple[str, str], tuple[int, int]]:
    """Poll the sink's files until they hold ``expected`` records, or the count stopped
    growing for ``settle`` seconds (after at least one record), or ``timeout``."""
    deadline = time.monotonic() + timeout
    last = -1
    since = time.monotonic()
    while True:
        counts = await asyncio.to_thread(count_bi_records, sink_dir)
        total = sum(r for r, _ in counts.values())
        now = time.monotonic()
        if total != last:
            last, since = total, now
        quiet = now - since
        if (total >= expected and quiet >= 1.5) or (total > 0 and quiet >= settle):
            return counts
        if now >= deadline:
            return counts
        await asyncio.sleep(0.5)


async def report(
    stub: pb_grpc.AssignmentServiceAsyncStub, tally: Tally, drained: bool, sink_dir: Path
) -> None:
    print("\n=== summary ===")
    before = [w for _, w in tally.offer_windows[: tally.offers_before_change]]
    after = [w for t, w in tally.offer_windows if t in tally.wave2]
    statuses: Counter[str] = Counter()
    recycled = 0
    per_line: dict[str, Counter[str]] = defaultdict(Counter)
    token = ""
    sample = 0
    all_tasks: list[int] = []  # revisit tasks included
    while True:
        page = await stub.ListTasks(
            pb.ListTasksRequest(page=common_pb2.PageRequest(page_size=100, page_token=token))
        )
        for t in page.tasks:
            all_tasks.append(t.id)
            statuses[STATUS[t.status]] += 1
            per_line[common_pb2.BusinessLine.Name(t.business_line).removeprefix("BUSINESS_LINE_")][
                STATUS[t.status]
            ] += 1
            recycled += t.recycle_count
            if t.recycle_count and not sample:
                sample = t.id  # show the life of a task that was lost and recycled
        token = page.page.next_page_token
        if not token:
            break
    print(
        f"clues: {tally.created} new tasks, {tally.merged} merged into open tasks; "
        f"{tally.revisits} call-backs scheduled"
    )
    print(f"offers made: {sum(tally.offers.values())}; offers lost and recycled: {recycled}")
    print(f"{'line':<12}{'COMPLETED':>10}{'FAILED':>8}{'other':>7}")
    for line, c in sorted(per_line.items()):
        other = sum(c.values()) - c["COMPLETED"] - c["FAILED"]
        print(f"{line:<12}{c['COMPLETED']:>10}{c['FAILED']:>8}{other:>7}")
    if before and after:
        print(
            f"live config: sales offers carried a {max(before):.0f} s accept window before "
            f"the change and {max(after):.0f} s after it (no restart)"
        )
    else:
        print("live config: no sales offer on one side of the change to compare")
    stats = await stub.QueueStats(pb.QueueStatsRequest())
    print(
        "agents by presence: "
        + ", ".join(
            f"{common_pb2.BusinessLine.Name(p.business_line).removeprefix('BUSINESS_LINE_')}/"
            f"{pb.Presence.Name(p.presence).removeprefix('PRESENCE_')}={p.agents}"
            for p in stats.agents
        )
    )
    sample = sample or max(tally.tasks, default=0)
    if sample:
        detail = await stub.GetTask(pb.GetTaskRequest(id=sample))
        print(f"history of task {sample} (customer {detail.customer.phone.masked}):")
        for e in detail.history:
            who = f" agent {e.agent_id}" if e.agent_id else ""
            print(
                f"  {e.kind:<18} {STATUS.get(e.from_status, '-'):>12} -> "
                f"{STATUS.get(e.to_status, '-'):<12}{who}"
            )
        await show_recommendations(stub, sample)
    # every task transition goes out through the assignment outbox -> bilog -> Kafka ->
    # the sink's Avro files: wait for as many records as the tasks have history events
    expected = 0
    for task_id in sorted(all_tasks):
        expected += len((await stub.GetTask(pb.GetTaskRequest(id=task_id))).history)
    counts = await wait_bi_files(sink_dir, expected)
    total = sum(r for r, _ in counts.values())
    if not counts:
        print(f"BI files: 0 records under {sink_dir} (expected {expected} task events)")
    for (name, where), (records, files) in sorted(counts.items()):
        print(f"BI files: {records} {name} records in {files} files ({where})")
    if counts:
        print(
            f"BI records: {total} read back from {sink_dir}; the task histories list "
            f"{expected} transitions"
        )
    print("all queues drained" if drained else "WARNING: queues did not drain in time")


def db_names(name: str) -> dict[str, str]:
    """The fresh databases of a demo run, by role."""
    return {"assignment": name, "recommendation": f"{name}_reco", "registry": f"{name}_bireg"}


async def fresh_database(name: str) -> str:
    await asyncio.to_thread(drop_database, name)
    return await asyncio.to_thread(create_database, name)


async def load_inventory(reco: ServiceProc, cars: list[rpb.Car]) -> int:
    async with grpc.aio.insecure_channel(reco.target) as ch:
        stub = rpb_grpc.RecommendationServiceStub(ch)
        created = 0
        for i in range(0, len(cars), 100):
            resp = await stub.UpsertCars(rpb.UpsertCarsRequest(cars=cars[i : i + 100]))
            created += resp.created_count + resp.updated_count
    return created


async def amain(args: argparse.Namespace) -> int:
    out = ROOT / ".demo"
    out.mkdir(exist_ok=True)
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, main_task.cancel)
    procs: list[ServiceProc] = []  # in start order; stopped in reverse
    logs: list[Path] = []

    def log_of(role: str) -> Path:
        path = out / f"{args.name}-{role}.log"
        path.write_bytes(b"")
        logs.append(path)
        return path

    def started(proc: ServiceProc) -> ServiceProc:
        procs.append(proc)
        where = f"127.0.0.1:{proc.port}" if proc.port else "no port"
        say(f"started {proc.name:<14} {where:<16} pid {proc.popen.pid}  log {proc.log_path}")
        return proc

    try:
        say("starting the local stack (MariaDB, Redis, etcd, Tansu) if needed")
        stack = await asyncio.to_thread(up)
        dbs = db_names(args.name)
        prefix = f"/crm/{args.name}/config"
        for key, value in (("SALE", SALE_CONFIG), ("AFTER_SALE", AFTER_SALE_CONFIG)):
            await put_json(stack.etcd_endpoint, f"{prefix}/assignment/{key}", value)
        common = {"ETCD_ENDPOINTS": stack.etcd_endpoint, "CONFIG_PREFIX": prefix}

        # -- recommendation: fresh database, migrate, serve, load the inventory -------------
        reco_port = free_port()
        reco_env = {
            f"CRM_RECOMMENDATION_{k}": v
            for k, v in {
                **common,
                "HOST": "127.0.0.1",
                "PORT": str(reco_port),
                "METRICS_PORT": "-1",
                "DATABASE_URL": await fresh_database(dbs["recommendation"]),
                "REFRESH_INTERVAL_S": "0.5",
            }.items()
        }
        reco_log = log_of("recommendation")

        # -- bilog: dev schema registry, intake service, file sink --------------------------
        sink_dir = out / args.name / "bi-files"
        shutil.rmtree(sink_dir, ignore_errors=True)
        sink_dir.mkdir(parents=True)
        run_id = uuid.uuid4().hex[:8]
        reg_port = free_port()
        bilog_common = {
            **common,
            "KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
            "TOPIC_PREFIX": f"demo{run_id}.",
            "SCHEMA_REGISTRY_URL": f"http://127.0.0.1:{reg_port}",
            "METRICS_PORT": "-1",
            "HOST": "127.0.0.1",
            "READINESS_INTERVAL_S": "0.2",
        }
        reg_env = {
            f"CRM_BILOG_{k}": v
            for k, v in {
                **bilog_common,
                "REGISTRY_HOST": "127.0.0.1",
                "REGISTRY_PORT": str(reg_port),
                "DATABASE_URL": await fresh_database(dbs["registry"]),
            }.items()
        }
        reg_log = log_of("bilog-registry")
        # -- assignment: fresh database, pointed at recommendation and bilog ----------------
        port, bilog_port = free_port(), free_port()
        env = {
            "CRM_ASSIGNMENT_PORT": str(port),
            "CRM_ASSIGNMENT_HOST": "127.0.0.1",
            "CRM_ASSIGNMENT_METRICS_PORT": str(free_port()),
            "CRM_ASSIGNMENT_DATABASE_URL": await fresh_database(dbs["assignment"]),
            "CRM_ASSIGNMENT_ETCD_ENDPOINTS": stack.etcd_endpoint,
            "CRM_ASSIGNMENT_CONFIG_PREFIX": prefix,
            "CRM_ASSIGNMENT_RECYCLE_POLL_S": "0.25",
            "CRM_ASSIGNMENT_RECOMMENDATION_TARGET": f"127.0.0.1:{reco_port}",
            "CRM_ASSIGNMENT_RECOMMENDATION_TIMEOUT_S": "2",
            "CRM_ASSIGNMENT_BILOG_TARGET": f"127.0.0.1:{bilog_port}",
        }
        log = log_of("assignment")

        # each service migrates its fresh database itself (`serve --migrate`): one cold
        # Python start per process instead of two
        say(f"fresh databases {', '.join(dbs.values())}; the services migrate them at start")
        reco = started(
            start_service(
                "recommendation",
                "crm_recommendation",
                reco_port,
                reco_env,
                reco_log,
                ["serve", "--migrate"],
            )
        )
        registry = started(
            start_service(
                "bilog-registry", "crm_bilog", reg_port, reg_env, reg_log, ["registry", "--migrate"]
            )
        )
        await wait_serving(reco)
        say("recommendation is SERVING (health check)")
        loaded = await load_inventory(reco, make_inventory(args.seed))
        say(f"  {loaded} cars loaded into the inventory (UpsertCars)")
        await wait_http(registry, "/subjects")
        say("bilog-registry answers GET /subjects")

        bilog_env = {
            f"CRM_BILOG_{k}": v for k, v in {**bilog_common, "PORT": str(bilog_port)}.items()
        }
        bilog = started(start_service("bilog", "crm_bilog", bilog_port, bilog_env, log_of("bilog")))
        await wait_serving(bilog)
        say("bilog is SERVING (Kafka answers, topics exist, schemas registered)")
        sink_env = {
            f"CRM_BILOG_{k}": v
            for k, v in {
                **bilog_common,
                "SINK_DIR": str(sink_dir),
                "SINK_GROUP_ID": f"demo-sink-{run_id}",
                "SINK_SESSION_TIMEOUT_MS": "3000",
                "SINK_IDLE_FLUSH_S": "1",
                "SINK_ROTATE_INTERVAL_S": "3",
            }.items()
        }
        sink = started(
            start_service("bilog-sink", "crm_bilog", 0, sink_env, log_of("bilog-sink"), ["sink"])
        )
        # the sink reads its topics from the beginning: the assignment service need not
        # wait for its group join (a few seconds on Tansu), the two readiness waits overlap
        sink_ready = asyncio.ensure_future(wait_log(sink, "partitions assigned", timeout=30))

        svc = started(
            start_service("assignment", "crm_assignment", port, env, log, ["serve", "--migrate"])
        )
        try:
            await wait_serving(svc)
            say("assignment is SERVING (health check)")
            await sink_ready
            say(f"bilog-sink has its partitions; files go to {sink_dir}")
        finally:
            sink_ready.cancel()
        say(
            "platform up: "
            + ", ".join(f"{p.name}" + (f"@{p.port}" if p.port else "") for p in procs)
        )
        return await scenario(
            svc,
            stack.etcd_endpoint,
            prefix,
            args.seed,
            args.clues,
            make_inventory(args.seed),
            sink_dir,
        )
    except asyncio.CancelledError:
        say("interrupted: stopping")
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C: stop anyway
            loop.add_signal_handler(sig, lambda: say("stopping the processes, please wait"))
        for proc in reversed(procs):
            code = await asyncio.to_thread(proc.stop)
            say(f"{proc.name} stopped (exit code {code})")
        if procs:
            say("etcd/Tansu stay up for reuse (`make stack-down` stops them)")
        for path in logs:
            with contextlib.suppress(Exception):
                lines = path.read_text().splitlines()
                errors = [ln for ln in lines if '"level": "ERROR"' in ln or '"level":"ERROR"' in ln]
                if errors:
                    print(f"{path.name}: {len(errors)} error log lines, first: {errors[0][:300]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seed", type=int, default=7, help="random seed of the scenario")
    ap.add_argument("--clues", type=int, default=24, help="how many clues arrive")
    ap.add_argument("--name", default="crm_demo", help="database name and etcd prefix")
    args = ap.parse_args()
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
