"""`make bench`: benchmarks, each reported as a ratio to a baseline of the same run.

The machine is shared and noisy, so absolute numbers mean little; a ratio measured side
by side does. Results are printed as a table and written to .bench/results.json (and a
time-stamped copy).

assignment (issue #3): target >= 0.33x the no-op RPC throughput
  baseline  a bare grpc.aio no-op unary RPC (own process, no interceptors, no database)
  clue      CreateClue alone (new customer each time: customer upsert + task + audit)
  flow      one task through the platform: CreateClue -> dispatched to a streaming agent
            -> AcceptTask -> CompleteTask (4 RPCs/stream messages and 4 transactions);
            flows/s and, for a like-for-like ratio, the gRPC messages/s it takes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from crm.assignment.v1 import assignment_pb2 as pb
from crm.assignment.v1 import assignment_pb2_grpc as pb_grpc
from crm.common.v1 import common_pb2
from crm_common.config_watch import put_json
from crm_devstack import create_database, drop_database, free_port, up

from crm_tools.noop_server import NOOP_METHOD
from crm_tools.procs import ServiceProc, run_module, start_service, wait_serving

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / ".bench"


@dataclass
class Measure:
    name: str
    ops: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


async def closed_loop(
    name: str,
    call: Callable[[int], Awaitable[None]],
    concurrency: int,
    seconds: float,
    warmup: float = 1.0,
) -> Measure:
    """``concurrency`` workers call ``call(i)`` back to back; only the window after
    ``warmup`` counts."""
    lat: list[float] = []
    counter = 0
    t_start = time.perf_counter()
    t_measure = t_start + warmup
    t_end = t_measure + seconds

    async def worker() -> None:
        nonlocal counter
        while True:
            counter += 1
            i = counter
            t0 = time.perf_counter()
            if t0 >= t_end:
                return
            await call(i)
            if t0 >= t_measure:
                lat.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Measure(name, len(lat), seconds, pct(lat, 0.5), pct(lat, 0.99))


async def bench_noop(concurrency: int, seconds: float) -> Measure:
    port = free_port()
    proc = start_service(
        "noop", "crm_tools.noop_server", port, {"CRM_NOOP_PORT": str(port)}, OUT / "noop.log"
    )
    try:
        await wait_serving(proc)
        async with grpc.aio.insecure_channel(proc.target) as ch:
            ping = ch.unary_unary(NOOP_METHOD, None, None)
            payload = b"x" * 64

            async def call(_: int) -> None:
                await ping(payload)

            return await closed_loop("no-op RPC (baseline)", call, concurrency, seconds)
    finally:
        proc.stop()


async def start_assignment(etcd: str) -> ServiceProc:
    await asyncio.to_thread(drop_database, "crm_bench")
    db_url = await asyncio.to_thread(create_database, "crm_bench")
    prefix = "/crm/bench/config"
    await put_json(
        etcd, f"{prefix}/assignment/SALE", {"accept_timeout_s": 600, "merge_window_s": 0}
    )
    port = free_port()
    env = {
        "CRM_ASSIGNMENT_PORT": str(port),
        "CRM_ASSIGNMENT_HOST": "127.0.0.1",
        "CRM_ASSIGNMENT_METRICS_PORT": str(free_port()),
        "CRM_ASSIGNMENT_DATABASE_URL": db_url,
        "CRM_ASSIGNMENT_ETCD_ENDPOINTS": etcd,
        "CRM_ASSIGNMENT_CONFIG_PREFIX": prefix,
        "CRM_ASSIGNMENT_LOG_LEVEL": "WARNING",
    }
    log = OUT / "assignment.log"
    log.write_bytes(b"")
    await asyncio.to_thread(run_module, "crm_assignment", ["migrate"], env, log)
    proc = start_service("assignment", "crm_assignment", port, env, log)
    await wait_serving(proc)
    return proc


def clue(i: int, run: str) -> pb.CreateClueRequest:
    return pb.CreateClueRequest(
        idempotency_key=f"{run}-{i}",
        phone=f"139{i:08d}",
        business_line=common_pb2.BUSINESS_LINE_SALE,
        source="app",
        city="beijing",
        intent_car_ids=[i % 1000 + 1],
        brands=["BMW"],
        budget_max_yuan=200_000,
    )


async def bench_clue(
    stub: pb_grpc.AssignmentServiceAsyncStub, concurrency: int, seconds: float
) -> Measure:
    async def call(i: int) -> None:
        await stub.CreateClue(clue(i, "clue"))

    return await closed_loop("CreateClue", call, concurrency, seconds)


async def bench_flow(
    stub: pb_grpc.AssignmentServiceAsyncStub, agents: int, seconds: float
) -> Measure:
    """Agents stream offers and accept+complete at once; a producer keeps the queue fed
    with ``agents`` clues in flight. A flow's latency runs from CreateClue to Complete."""
    base = 5000
    for a in range(agents):
        await stub.UpsertAgent(
            pb.UpsertAgentRequest(
                agent=pb.Agent(
                    id=base + a,
                    name=f"bench {a}",
                    business_line=common_pb2.BUSINESS_LINE_SALE,
                    capacity=1,
                )
            )
        )
        await stub.SetPresence(pb.SetPresenceRequest(agent_id=base + a, presence=pb.PRESENCE_IDLE))
    sent: dict[int, float] = {}
    done_lat: list[float] = []
    slots = asyncio.Semaphore(agents * 2)
    t0 = time.perf_counter()
    t_measure, t_end = t0 + 1.0, t0 + 1.0 + seconds
    stop = asyncio.Event()

    async def producer() -> None:
        i = 0
        while time.perf_counter() < t_end:
            await slots.acquire()
            i += 1
            t = time.perf_counter()
            resp = await stub.CreateClue(clue(i, "flow"))
            sent[resp.task.id] = t
        stop.set()

    async def agent(aid: int) -> None:
        stream = stub.StreamOffers(pb.StreamOffersRequest(agent_id=aid))
        try:
            async for msg in stream:
                tid = msg.offer.task.id
                await stub.AcceptTask(pb.AcceptTaskRequest(task_id=tid, agent_id=aid))
                await stub.CompleteTask(pb.CompleteTaskRequest(task_id=tid, agent_id=aid))
                now = time.perf_counter()
                started = sent.pop(tid, None)
                if started is not None and started >= t_measure and now <= t_end:
                    done_lat.append(now - started)
                slots.release()
                if stop.is_set():
                    return
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise

    workers = [asyncio.create_task(agent(base + a)) for a in range(agents)]
    await producer()
    await asyncio.sleep(0.5)
    for w in workers:
        w.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*workers, return_exceptions=True)
    return Measure(
        "flow: clue -> offer -> accept -> complete",
        len(done_lat),
        seconds,
        pct(done_lat, 0.5),
        pct(done_lat, 0.99),
    )


async def amain(args: argparse.Namespace) -> int:
    OUT.mkdir(exist_ok=True)
    stack = await asyncio.to_thread(up)
    print(f"bench: {args.seconds:.0f} s per measure, concurrency {args.concurrency}")
    noop = await bench_noop(args.concurrency, args.seconds)
    svc = await start_assignment(stack.etcd_endpoint)
    try:
        async with grpc.aio.insecure_channel(svc.target) as ch:
            stub = pb_grpc.AssignmentServiceStub(ch)
            clue_m = await bench_clue(stub, args.concurrency, args.seconds)
            flow_m = await bench_flow(stub, args.agents, args.seconds)
    finally:
        svc.stop()
    rows = [
        ("no-op RPC (baseline)", noop.rate, "RPC/s", noop, 1.0, None),
        ("CreateClue", clue_m.rate, "RPC/s", clue_m, clue_m.rate / noop.rate, 0.33),
        (
            "flow (clue+offer+accept+complete)",
            flow_m.rate,
            "flows/s",
            flow_m,
            flow_m.rate / noop.rate,
            None,
        ),
        (
            "flow, as gRPC messages",
            flow_m.rate * 4,
            "msg/s",
            flow_m,
            flow_m.rate * 4 / noop.rate,
            0.33,
        ),
    ]
    print(
        f"\n{'measure':<36}{'rate':>10} {'unit':<8}{'p50 ms':>8}{'p99 ms':>8}"
        f"{'ratio':>8}{'target':>8}"
    )
    results = []
    ok = True
    for name, rate, unit, m, ratio, target in rows:
        mark = ""
        if target is not None:
            mark = f">={target}" + (" ok" if ratio >= target else " MISS")
            ok = ok and ratio >= target
        print(
            f"{name:<36}{rate:>10.0f} {unit:<8}{m.p50_ms:>8.2f}{m.p99_ms:>8.2f}"
            f"{ratio:>8.2f}{mark:>10}"
        )
        results.append(
            {
                "measure": name,
                "rate": rate,
                "unit": unit,
                "ratio": ratio,
                "target": target,
                **asdict(m),
            }
        )
    doc = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": args.seconds,
        "concurrency": args.concurrency,
        "median_ratio_note": "ratios are against the no-op RPC of this run",
        "results": results,
    }
    text = json.dumps(doc, indent=2)
    (OUT / "results.json").write_text(text)
    (OUT / f"results-{time.strftime('%Y%m%dT%H%M%S')}.json").write_text(text)
    print(f"\nwritten to {OUT.relative_to(ROOT)}/results.json")
    return 0 if ok or not args.strict else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0, help="measured window per measure")
    ap.add_argument("--concurrency", type=int, default=16, help="calls in flight")
    ap.add_argument("--agents", type=int, default=16, help="streaming agents in the flow")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    return asyncio.run(amain(args=ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
