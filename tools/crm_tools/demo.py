"""`make demo`: the platform locally, and a short, compressed call-center scenario.

1. the local stack is up (MariaDB, Redis, etcd, Tansu; `make demo` starts it);
2. the assignment service runs as its own process on a fresh `crm_demo` database,
   configured from etcd (routing weights and timeouts per business line);
3. agents of the sales and after-sales lines go IDLE and open their offer streams;
   clues arrive (some are duplicates and merge, one customer is a star);
4. agents accept, call and complete, some ask for a revisit (call-back); one agent
   never answers, so its offers time out and are recycled to colleagues;
5. mid-run, ops change the sales routing config in etcd: the service applies it live;
6. a summary is printed; everything started here is stopped, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeAlias

import grpc
from crm.assignment.v1 import assignment_pb2 as pb
from crm.assignment.v1 import assignment_pb2_grpc as pb_grpc
from crm.common.v1 import common_pb2
from crm_common.config_watch import put_json
from crm_devstack import create_database, drop_database, free_port, up
from google.protobuf.timestamp_pb2 import Timestamp

from crm_tools.procs import ServiceProc, run_module, start_service, wait_serving

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
        resp = await stub.CreateClue(
            pb.CreateClueRequest(
                idempotency_key=f"demo-{i}",
                phone=phone,
                business_line=line,
                source=rng.choice(SOURCES),
                city=rng.choice(CITIES),
                intent_car_ids=[rng.randrange(1, 5000)],
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
            say(f"clue {i} ({LINE_NAMES[line]}, {brand}) -> new task {resp.task.id}")
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


async def scenario(svc: ServiceProc, etcd: str, prefix: str, seed: int, clues: int) -> int:
    rng = random.Random(seed)
    tally = Tally()
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
        agents = [asyncio.create_task(agent_loop(stub, a, tally, rng, stop)) for a in AGENTS]
        half = max(5, clues // 2)
        say(f"morning wave: {half} clues")
        await send_clues(stub, tally, rng, range(half))
        with contextlib.suppress(TimeoutError):  # until the sleepy agent let one ring out
            await asyncio.wait_for(tally.rang_out.wait(), 15)
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
        await report(stub, tally, drained)
    return 0 if drained else 1


async def report(stub: pb_grpc.AssignmentServiceAsyncStub, tally: Tally, drained: bool) -> None:
    print("\n=== summary ===")
    before = [w for _, w in tally.offer_windows[: tally.offers_before_change]]
    after = [w for t, w in tally.offer_windows if t in tally.wave2]
    statuses: Counter[str] = Counter()
    recycled = 0
    per_line: dict[str, Counter[str]] = defaultdict(Counter)
    token = ""
    sample = 0
    while True:
        page = await stub.ListTasks(
            pb.ListTasksRequest(page=common_pb2.PageRequest(page_size=100, page_token=token))
        )
        for t in page.tasks:
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
    print("all queues drained" if drained else "WARNING: queues did not drain in time")


async def amain(args: argparse.Namespace) -> int:
    out = ROOT / ".demo"
    out.mkdir(exist_ok=True)
    say("starting the local stack (MariaDB, Redis, etcd, Tansu) if needed")
    stack = await asyncio.to_thread(up)
    await asyncio.to_thread(drop_database, args.name)
    db_url = await asyncio.to_thread(create_database, args.name)
    prefix = f"/crm/{args.name}/config"
    for key, value in (("SALE", SALE_CONFIG), ("AFTER_SALE", AFTER_SALE_CONFIG)):
        await put_json(stack.etcd_endpoint, f"{prefix}/assignment/{key}", value)
    port = free_port()
    env = {
        "CRM_ASSIGNMENT_PORT": str(port),
        "CRM_ASSIGNMENT_HOST": "127.0.0.1",
        "CRM_ASSIGNMENT_METRICS_PORT": str(free_port()),
        "CRM_ASSIGNMENT_DATABASE_URL": db_url,
        "CRM_ASSIGNMENT_ETCD_ENDPOINTS": stack.etcd_endpoint,
        "CRM_ASSIGNMENT_CONFIG_PREFIX": prefix,
        "CRM_ASSIGNMENT_RECYCLE_POLL_S": "0.25",
    }
    log = out / f"{args.name}-assignment.log"
    log.write_bytes(b"")
    say(f"migrating the {args.name} database")
    await asyncio.to_thread(run_module, "crm_assignment", ["migrate"], env, log)
    say(f"starting the assignment service on 127.0.0.1:{port} (logs: {log})")
    svc = start_service("assignment", "crm_assignment", port, env, log)
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, main_task.cancel)
    try:
        await wait_serving(svc)
        say("assignment is SERVING (health check)")
        return await scenario(svc, stack.etcd_endpoint, prefix, args.seed, args.clues)
    except asyncio.CancelledError:
        say("interrupted: stopping")
        return 130
    finally:
        code = await asyncio.to_thread(svc.stop)
        say(
            f"assignment stopped (exit code {code}); etcd/Tansu stay up for reuse "
            "(`make stack-down` stops them)"
        )
        with contextlib.suppress(Exception):
            lines = log.read_text().splitlines()
            errors = [ln for ln in lines if '"level": "ERROR"' in ln or '"level":"ERROR"' in ln]
            if errors:
                print(f"{len(errors)} error log lines, first: {errors[0][:300]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seed", type=int, default=7, help="random seed of the scenario")
    ap.add_argument("--clues", type=int, default=24, help="how many clues arrive")
    ap.add_argument("--name", default="crm_demo", help="database name and etcd prefix")
    args = ap.parse_args()
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
