"""`make bench`: benchmarks, each reported as a ratio to a baseline of the same run.

The machine is shared and noisy, so absolute numbers mean little; a ratio measured side
by side does. Results are printed as a table and written to .bench/results.json (and a
time-stamped copy).

assignment (issue #3): target >= 0.33x the no-op RPC throughput
  baseline  a bare grpc.aio no-op unary RPC (own process, no interceptors, no database),
            measured before, between and after every figure; each figure's ratio is to
            the mean of the baseline right before and right after it
  rounds    --rounds (3) rounds of clue then flow; each row is the median round, with
            every round's ratio printed under it (one round swings +-0.06 here)
  clue      CreateClue alone (new customer each time: customer upsert + task + audit)
  flow      one task through the platform: CreateClue -> dispatched to a streaming agent
            -> AcceptTask -> CompleteTask (4 RPCs/stream messages; 16 agents, 16
            concurrent CreateClue producers like the clue measure's 16 callers, up to 32
            clues in flight); flows/s and, for a like-for-like ratio, the gRPC
            messages/s it takes.

bilog (issue #5): acked events/s through LogBatch(500) vs a raw confluent-kafka + fastavro
  producer loop on the same broker (target >= 0.5x); sink events/s written (see
  crm_tools.bench_bilog).

recommendation (issue #6): Recommend top-20 p99 over 100,000 cars and 1,000,000
  interactions vs a no-op RPC p99 on the same server, both at 100 calls/s open loop
  (target <= 3x), and both saturated (16 in flight; no target); index memory in MB
  (see crm_tools.bench_recommendation).

scheduler (issue #4): fire lateness p50/p99 of 10,000 jobs spread over 10 s (target p99
  < 250 ms), no-op job throughput vs a raw Celery no-op task loop on the same Redis
  (target >= 0.5x), worker memory with 100,000 pending future jobs (flat); see
  crm_tools.bench_scheduler.

operator (issue #7): CRMConfig change -> applied by a live config watcher p50/p99
  (target p99 < 1 s), and etcd put -> applied vs a raw etcd watch p99 (target <= 3x);
  see crm_tools.bench_operator.

`--only SECTION` runs a subset; `--strict` exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


class NoopBaseline:
    """The baseline: a bare grpc.aio no-op server in a process of its own, measured as often
    as a section needs (``measure()``), so each figure can be set against the baseline
    measured right before and right after it (the shared machine's load drifts)."""

    def __init__(self, concurrency: int, seconds: float) -> None:
        self.concurrency = concurrency
        self.seconds = seconds
        port = free_port()
        self.proc = start_service(
            "noop", "crm_tools.noop_server", port, {"CRM_NOOP_PORT": str(port)}, OUT / "noop.log"
        )
        self.channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> NoopBaseline:
        try:
            await wait_serving(self.proc)
            self.channel = grpc.aio.insecure_channel(self.proc.target)
        except BaseException:
            self.proc.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.channel is not None:
            await self.channel.close(None)
        self.proc.stop()

    async def measure(self) -> Measure:
        assert self.channel is not None
        ping = self.channel.unary_unary(NOOP_METHOD, None, None)
        payload = b"x" * 64

        async def call(_: int) -> None:
            await ping(payload)

        return await closed_loop("no-op RPC (baseline)", call, self.concurrency, self.seconds)


def bracketing(before: Measure, after: Measure) -> Measure:
    """The baseline of a figure measured between ``before`` and ``after``: their mean."""
    return Measure(
        "no-op RPC (baseline)",
        before.ops + after.ops,
        before.seconds + after.seconds,
        (before.p50_ms + after.p50_ms) / 2,
        (before.p99_ms + after.p99_ms) / 2,
    )


async def start_assignment(etcd: str) -> ServiceProc:
    await asyncio.to_thread(drop_database, "crm_bench")
    db_url = await asyncio.to_thread(create_database, "crm_bench")
    prefix = "/crm/bench/config"
    for line in ("SALE", "AFTER_SALE"):
        await put_json(
            etcd, f"{prefix}/assignment/{line}", {"accept_timeout_s": 600, "merge_window_s": 0}
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


# The flow runs on its own business line: the CreateClue measure leaves a backlog of
# SALE tasks that would otherwise be dispatched first.
FLOW_LINE = common_pb2.BUSINESS_LINE_AFTER_SALE


def clue(
    i: int, run: str, line: common_pb2.BusinessLine.ValueType = common_pb2.BUSINESS_LINE_SALE
) -> pb.CreateClueRequest:
    return pb.CreateClueRequest(
        idempotency_key=f"{run}-{i}",
        phone=f"139{i:08d}",
        business_line=line,
        source="app",
        city="beijing",
        intent_car_ids=[i % 1000 + 1],
        brands=["BMW"],
        budget_max_yuan=200_000,
    )


async def bench_clue(
    stub: pb_grpc.AssignmentServiceAsyncStub, concurrency: int, seconds: float, run: str
) -> Measure:
    """New clues only: ``run`` makes the idempotency keys of a round its own (a repeated key
    would be answered from the stored task, a much cheaper call)."""

    async def call(i: int) -> None:
        await stub.CreateClue(clue(i, run))

    return await closed_loop("CreateClue", call, concurrency, seconds)


async def bench_flow(
    stub: pb_grpc.AssignmentServiceAsyncStub,
    agents: int,
    seconds: float,
    run: str,
    producers: int = 16,
) -> Measure:
    """Agents stream offers and accept+complete at once; ``producers`` concurrent
    CreateClue callers keep up to ``2 * agents`` clues in flight. Too few producers cap
    the flow at their CreateClue round trips, not at the server: with 4 the clue
    group-commit wrote batches of 1.9 clues on average and the flow read 0.29-0.30x
    (two runs), with 16 (the clue measure's callers) 0.38-0.41x, the server's CPU the
    same. A flow's latency runs from CreateClue to Complete, so it includes the wait in
    the queue while every agent is busy. ``run`` keeps a round's idempotency keys its
    own; an offer left over from an earlier round (at most one per agent: its stream was
    cancelled) is handled but not counted."""
    base = 5000
    for a in range(agents):
        await stub.UpsertAgent(
            pb.UpsertAgentRequest(
                agent=pb.Agent(
                    id=base + a,
                    name=f"bench {a}",
                    business_line=FLOW_LINE,
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

    counter = 0

    async def producer() -> None:
        nonlocal counter
        while time.perf_counter() < t_end:
            await slots.acquire()
            counter += 1
            t = time.perf_counter()
            resp = await stub.CreateClue(clue(counter, run, FLOW_LINE))
            sent[resp.task.id] = t

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
    await asyncio.gather(*(producer() for _ in range(producers)))
    stop.set()
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


def row(
    measure: str,
    m: Measure,
    rate: float,
    unit: str,
    ratio: float,
    target: float | None = None,
    op: str = ">=",
) -> dict[str, Any]:
    """One result row; ``target`` applies to ``ratio`` with ``op`` (>= or <=)."""
    return {
        "measure": measure,
        "rate": rate,
        "unit": unit,
        "ratio": ratio,
        "target": target,
        "target_op": op,
        "ops": m.ops,
        "seconds": m.seconds,
        "p50_ms": m.p50_ms,
        "p99_ms": m.p99_ms,
    }


async def section_assignment(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``--rounds`` rounds of CreateClue then flow, with the no-op measured before, between
    and after every figure (no-op, clue, no-op, flow, no-op, clue, ...): each figure's
    ratio is to the mean of the no-op right before and right after it, and each row shows
    the median round (its ratio, rate and latencies) with every round's ratio. One figure
    of a few seconds on this shared machine swings by +-0.06 from run to run; the median of
    rounds, each against its own neighbouring baseline, is the steady figure."""
    stack = await asyncio.to_thread(up)
    noops: list[Measure] = []
    clues: list[tuple[Measure, float]] = []
    flows: list[tuple[Measure, float]] = []
    async with NoopBaseline(args.concurrency, args.seconds) as noop:
        svc = await start_assignment(stack.etcd_endpoint)
        try:
            async with grpc.aio.insecure_channel(svc.target) as ch:
                stub = pb_grpc.AssignmentServiceStub(ch)
                noops.append(await noop.measure())
                for r in range(args.rounds):
                    clue_m = await bench_clue(stub, args.concurrency, args.seconds, f"clue{r}")
                    noops.append(await noop.measure())
                    clues.append((clue_m, clue_m.rate / (bracketing(*noops[-2:]).rate or 1.0)))
                    flow_m = await bench_flow(
                        stub, args.agents, args.seconds, f"flow{r}", args.producers
                    )
                    noops.append(await noop.measure())
                    flows.append((flow_m, flow_m.rate / (bracketing(*noops[-2:]).rate or 1.0)))
        finally:
            svc.stop()
    every = Measure(
        "no-op RPC (baseline)",
        sum(m.ops for m in noops),
        sum(m.seconds for m in noops),
        statistics.median(m.p50_ms for m in noops),
        statistics.median(m.p99_ms for m in noops),
    )
    clue_m, clue_ratio = median_round(clues)
    flow_m, flow_ratio = median_round(flows)
    return [
        row(f"no-op RPC (baseline, {len(noops)} runs)", every, every.rate, "RPC/s", 1.0),
        row("CreateClue", clue_m, clue_m.rate, "RPC/s", clue_ratio, 0.33) | spread(clues),
        row(
            "flow (clue+offer+accept+complete)",
            flow_m,
            flow_m.rate,
            "flows/s",
            flow_ratio,
        )
        | spread(flows),
        row(
            "flow, as gRPC messages",
            flow_m,
            flow_m.rate * 4,
            "msg/s",
            flow_ratio * 4,
            0.33,
        )
        | spread([(m, ratio * 4) for m, ratio in flows]),
    ]


def median_round(rounds: list[tuple[Measure, float]]) -> tuple[Measure, float]:
    """The round with the median ratio (the lower middle one of an even count)."""
    ordered = sorted(rounds, key=lambda mr: mr[1])
    return ordered[(len(ordered) - 1) // 2]


def spread(rounds: list[tuple[Measure, float]]) -> dict[str, Any]:
    """Every round's ratio, in the order measured (printed under the row, kept in JSON)."""
    return {"round_ratios": [round(ratio, 3) for _, ratio in rounds]}


async def section_bilog(args: argparse.Namespace) -> list[dict[str, Any]]:
    from crm_tools import bench_bilog

    return await bench_bilog.run(args.seconds)


async def section_recommendation(args: argparse.Namespace) -> list[dict[str, Any]]:
    from crm_tools import bench_recommendation

    rows = await bench_recommendation.run(args.seconds, args.concurrency)
    out: list[dict[str, Any]] = []
    for r in rows:
        if "p99_ratio_to_noop" in r:  # latency rows: the ratio is p99 / no-op p99
            out.append({**r, "ratio": r["p99_ratio_to_noop"], "target_op": "<="})
        else:  # the index row: memory, reported as the rate column in MB
            out.append(
                {
                    **r,
                    "rate": r.get("index_mb", 0.0),
                    "unit": "MB (index)",
                    "ratio": 0.0,
                    "target": None,
                    "p50_ms": 0.0,
                    "p99_ms": 0.0,
                }
            )
    return out


async def section_scheduler(args: argparse.Namespace) -> list[dict[str, Any]]:
    from crm_tools import bench_scheduler

    rows = await bench_scheduler.run(max(args.seconds, 10.0))
    for r in rows:  # its targets are stated as text with a precomputed verdict ("ok")
        r.setdefault("rate", r.get("value", 0.0))
        r.setdefault("ratio", r.get("value", 0.0) if r.get("unit") == "ratio" else 0.0)
        r.setdefault("p50_ms", 0.0)
        r.setdefault("p99_ms", 0.0)
    return rows


async def section_operator(args: argparse.Namespace) -> list[dict[str, Any]]:
    from crm_tools import bench_operator

    return await bench_operator.run(max(args.seconds, 10.0))


SECTIONS: dict[str, Callable[[argparse.Namespace], Awaitable[list[dict[str, Any]]]]] = {
    "assignment": section_assignment,
    "bilog": section_bilog,
    "recommendation": section_recommendation,
    "scheduler": section_scheduler,
    "operator": section_operator,
}


def print_table(section: str, rows: list[dict[str, Any]]) -> bool:
    """Print one section; True when every target of it is met."""
    print(f"\n[{section}]")
    print(
        f"{'measure':<38}{'rate':>10} {'unit':<9}{'p50 ms':>8}{'p99 ms':>8}"
        f"{'ratio':>7}{'target':>12}"
    )
    ok = True
    for r in rows:
        mark = ""
        if isinstance(r.get("target"), str):  # a stated target with its own verdict
            met = bool(r.get("ok"))
            ok = ok and met
            mark = f"{r['target']}" + (" ok" if met else " MISS")
        elif r.get("target") is not None:
            op = r.get("target_op", ">=")
            met = r["ratio"] >= r["target"] if op == ">=" else r["ratio"] <= r["target"]
            r["met"] = met
            ok = ok and met
            mark = f"{op}{r['target']}" + (" ok" if met else " MISS")
        print(
            f"{r['measure']:<38}{r['rate']:>10.0f} {r['unit']:<9}{r['p50_ms']:>8.2f}"
            f"{r['p99_ms']:>8.2f}{r['ratio']:>7.2f}{mark:>12}"
        )
        if r.get("round_ratios"):
            rounds = " ".join(f"{x:.2f}" for x in r["round_ratios"])
            print(f"{'':<4}median of {len(r['round_ratios'])} rounds; ratio per round: {rounds}")
    return ok


async def amain(args: argparse.Namespace) -> int:
    OUT.mkdir(exist_ok=True)
    await asyncio.to_thread(up)
    chosen = args.only or list(SECTIONS)
    print(f"bench: {args.seconds:.0f} s per measure; sections: {', '.join(chosen)}")
    results: dict[str, list[dict[str, Any]]] = {}
    ok = True
    for name in chosen:
        results[name] = await SECTIONS[name](args)
        ok = print_table(name, results[name]) and ok
    doc = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": args.seconds,
        "concurrency": args.concurrency,
        "note": "every ratio is against a baseline measured in the same run",
        "sections": results,
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
    ap.add_argument(
        "--producers", type=int, default=16, help="concurrent CreateClue callers in the flow"
    )
    ap.add_argument(
        "--rounds", type=int, default=3, help="assignment: rounds of CreateClue + flow (median)"
    )
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    ap.add_argument(
        "--only", action="append", choices=list(SECTIONS), help="run only these sections"
    )
    return asyncio.run(amain(args=ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
