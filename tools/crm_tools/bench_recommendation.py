"""Recommendation benchmark (issue #6): Recommend latency against a no-op RPC, same server.

    PYTHONPATH=tools .venv/bin/python -m crm_tools.bench_recommendation [--seconds 8] [--reuse]

and ``await run(seconds, concurrency)`` from ``crm_tools.bench``.

What is measured, honestly:

- data: 100,000 cars and 1,000,000 interactions (100,000 customers, 10 each: mostly cars
  of one city + series + price band, 20 % anything), generated vectorized and bulk-loaded
  into MySQL with ``LOAD DATA LOCAL INFILE`` (multi-row INSERT batches when the server
  refuses local files), change sequence set past the rows: the service then loads its
  index from MySQL exactly as in production (`python -m crm_recommendation serve`, its
  own process); the index build time is reported. ``--reuse`` (this module only, for
  iterating) keeps the database of an earlier run when it holds exactly those rows
  (same counts, same change sequence) and skips the minute of generating and loading;
- baseline: the standard health ``Check`` on the *same* server (interceptor, metrics and
  logging included), closed loop, same client channel, same concurrency;
- Recommend top-20 as the console sends it: customer id, 1-3 intent cars, their city and
  a +-25 % budget band;
- latency at a serving load (the target): calls arrive open loop at ``OPEN_RATE``/s
  (Poisson), each latency counted from its planned arrival; the baseline gets the same
  arrivals. A closed loop with 16 in flight keeps the server saturated: there each
  latency is mostly the queue ahead of it (about 16 service times), so its p99 ratio is
  the ratio of CPU per call, a throughput figure; it is still measured and printed
  (``N in flight`` rows), against its own closed-loop baseline, without a target;
- each pair is measured *interleaved*: after a warm-up of each, ``--seconds`` are split
  into windows of about one second that alternate baseline / Recommend (the order
  flipped every round), and each side's p50 / p99 is taken over all its windows. The
  machine is shared, so its load changes over seconds; measured back to back, one side
  could get a quiet machine and the other a loaded one. Interleaved, both see the same
  load. The ratio of each round is kept too (its spread is printed);
- then Recommend without city and budget (every car on sale is a candidate: the worst
  case, no target), one window;
- memory: the index's own estimate (``crm_recommendation_index_bytes`` on /metrics) and
  the process RSS.

Target: Recommend p99 <= 3x the no-op p99, at ``OPEN_RATE``/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pymysql
from crm.recommendation.v1 import recommendation_pb2 as pb
from crm.recommendation.v1 import recommendation_pb2_grpc as pb_grpc
from crm_devstack import create_database, drop_database, free_port, mysql_url, up
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url

from crm_tools.bench import OUT, Measure, closed_loop, pct
from crm_tools.eval_recommendation import make_cars
from crm_tools.procs import ServiceProc, run_module, start_service, wait_serving

__all__ = ["run"]

DB_NAME = "crm_bench_recommendation"
N_CARS = 100_000
N_CUSTOMERS = 100_000
PER_CUSTOMER = 10
TARGET_RATIO = 3.0
OPEN_RATE = 100.0
"""Calls/s of the latency measure (open loop): one Recommend each time an agent opens a
task, e.g. 1,000 agents each opening one every 10 s, on one replica. Well below what one
replica serves here (several hundred/s), so the p99 is the service's latency, not the
length of a queue."""


def _interactions(
    cars_sorted: npt.NDArray[np.int64], rng: np.random.Generator
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[Any]]:
    """(customer, car, kind, time) columns: each customer browses a window of the car list
    sorted by (city, series, price) around an anchor (80 %) or anything (20 %)."""
    n = N_CUSTOMERS * PER_CUSTOMER
    customer = np.repeat(np.arange(1, N_CUSTOMERS + 1, dtype=np.int64), PER_CUSTOMER)
    anchor = rng.integers(0, len(cars_sorted), N_CUSTOMERS)
    pos = np.repeat(anchor, PER_CUSTOMER) + rng.integers(-25, 26, n)
    pos = np.clip(pos, 0, len(cars_sorted) - 1)
    noise = rng.random(n) < 0.2
    pos[noise] = rng.integers(0, len(cars_sorted), int(noise.sum()))
    kind = rng.choice(4, n, p=[0.6, 0.25, 0.1, 0.05]).astype(np.int64) + 1
    start = np.datetime64("2025-08-01T00:00:00")
    seconds = rng.integers(0, 90 * 86400, n)
    return customer, cars_sorted[pos], kind, start + seconds.astype("timedelta64[s]")


def _load(url: str, seed: int) -> dict[str, float]:
    """Generates and bulk-loads the data; returns timings."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    cars, _ = make_cars(N_CARS, rng)
    order = sorted(range(N_CARS), key=lambda i: (cars[i].city, cars[i].series, cars[i].price_yuan))
    ids_sorted = np.array([cars[i].id for i in order], dtype=np.int64)
    customer, car_id, kind, at = _interactions(ids_sorted, rng)
    kinds = np.array(["", "VIEWED", "ASKED", "CALLED", "VISITED"])
    t1 = time.perf_counter()
    now = "2025-11-01 00:00:00"
    car_lines = [
        f"{c.id}\t{c.brand}\t{c.series}\t{c.model_year}\t{c.mileage_km}\t{c.price_yuan}\t"
        f"{c.city}\t{c.body_type.name}\t{c.status.name}\t{i + 1}\t{now}\t{now}"
        for i, c in enumerate(cars)
    ]
    stamps = np.char.replace(np.datetime_as_string(at, unit="s"), "T", " ")
    seqs = np.arange(N_CARS + 1, N_CARS + 1 + len(customer))
    int_lines = [
        f"{s}\t{cu}\t{ca}\t{k}\t{ts}\t{ts}"
        for s, cu, ca, k, ts in zip(
            seqs.tolist(), customer.tolist(), car_id.tolist(), kinds[kind].tolist(),
            stamps.tolist(), strict=True,
        )
    ]  # fmt: skip
    u = make_url(url)
    conn = pymysql.connect(
        host=u.host or "127.0.0.1",
        port=u.port or 3306,
        user=u.username,
        password=u.password or "",
        database=u.database,
        local_infile=True,
        autocommit=True,
    )
    try:
        with conn.cursor() as cur:
            _bulk(cur, "car", car_lines,
                  "id, brand, series, model_year, mileage_km, price_yuan, city, body_type, "
                  "status, seq, created_at, updated_at")  # fmt: skip
            _bulk(cur, "interaction", int_lines,
                  "seq, customer_id, car_id, kind, occurred_at, recorded_at")  # fmt: skip
            cur.execute(
                "UPDATE change_sequence SET value = %s WHERE name = 'data'",
                (N_CARS + len(int_lines),),
            )
    finally:
        conn.close()
    return {"generate_s": t1 - t0, "load_s": time.perf_counter() - t1}


def _bulk(cur: Any, table: str, lines: list[str], columns: str) -> None:
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".tsv", delete=False) as f:
            f.write("\n".join(lines))
            path = f.name
        cur.execute(
            f"LOAD DATA LOCAL INFILE %s INTO TABLE {table} "
            f"FIELDS TERMINATED BY '\\t' LINES TERMINATED BY '\\n' ({columns})",
            (path,),
        )
        Path(path).unlink(missing_ok=True)
        return
    except pymysql.err.MySQLError as exc:
        print(f"bench: LOAD DATA refused ({exc}); falling back to INSERT batches")
    width = columns.count(",") + 1
    sql = f"INSERT INTO {table} ({columns}) VALUES ({', '.join(['%s'] * width)})"
    for i in range(0, len(lines), 10_000):
        cur.executemany(sql, [line.split("\t") for line in lines[i : i + 10_000]])


def _loaded(url: str) -> bool:
    """Whether the database already holds this benchmark's data (an earlier run's)."""
    u = make_url(url)
    try:
        conn = pymysql.connect(
            host=u.host or "127.0.0.1", port=u.port or 3306, user=u.username,
            password=u.password or "", database=u.database,
        )  # fmt: skip
    except pymysql.err.MySQLError:
        return False
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM car")
            cars = cur.fetchone()
            cur.execute("SELECT COUNT(*) FROM interaction")
            interactions = cur.fetchone()
            cur.execute("SELECT value FROM change_sequence WHERE name = 'data'")
            row = cur.fetchone()
    except pymysql.err.MySQLError:
        return False
    finally:
        conn.close()
    n_int = N_CUSTOMERS * PER_CUSTOMER
    found = tuple(None if r is None else r[0] for r in (cars, interactions, row))
    return found == (N_CARS, n_int, N_CARS + n_int)


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _queries(
    seed: int, n: int = 5000
) -> tuple[list[pb.RecommendRequest], list[pb.RecommendRequest]]:
    rng = np.random.default_rng(seed)
    cars, _ = make_cars(N_CARS, np.random.default_rng(seed))  # same cars as loaded
    with_filters: list[pb.RecommendRequest] = []
    open_ones: list[pb.RecommendRequest] = []
    for _ in range(n):
        intent = [cars[int(i)] for i in rng.integers(0, N_CARS, int(rng.integers(1, 4)))]
        price = intent[0].price_yuan
        customer_id = int(rng.integers(1, N_CUSTOMERS + 1))
        intent_ids = [c.id for c in intent]
        with_filters.append(
            pb.RecommendRequest(
                customer_id=customer_id,
                intent_car_ids=intent_ids,
                count=20,
                city=intent[0].city,
                budget_min_yuan=int(price * 0.75),
                budget_max_yuan=int(price * 1.25),
            )
        )
        open_ones.append(
            pb.RecommendRequest(customer_id=customer_id, intent_car_ids=intent_ids, count=20)
        )
    return with_filters, open_ones


async def _window(
    call: Callable[[int], Awaitable[None]], concurrency: int, seconds: float
) -> list[float]:
    """One closed-loop window: ``concurrency`` workers call back to back for ``seconds``;
    the latency (s) of every call started inside the window."""
    lat: list[float] = []
    counter = 0
    t_end = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal counter
        while True:
            counter += 1
            i = counter
            t0 = time.perf_counter()
            if t0 >= t_end:
                return
            await call(i)
            lat.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return lat


async def _open_window(
    call: Callable[[int], Awaitable[None]], rate: float, seconds: float, seed: int
) -> list[float]:
    """One open-loop window: calls arrive at ``rate``/s (Poisson, seeded) whether or not
    earlier ones have finished, for ``seconds``; the latency (s) of each, counted from its
    planned arrival (a late start counts against the server: no coordinated omission)."""
    rng = np.random.default_rng(seed)
    lat: list[float] = []
    tasks: list[asyncio.Task[None]] = []
    t_start = time.perf_counter()
    t_next = t_start

    async def one(i: int, planned: float) -> None:
        await call(i)
        lat.append(time.perf_counter() - planned)

    i = 0
    while True:
        t_next += float(rng.exponential(1.0 / rate))
        if t_next >= t_start + seconds:
            break
        delay = t_next - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        i += 1
        tasks.append(asyncio.create_task(one(seed * 1_000_000 + i, t_next)))
    await asyncio.gather(*tasks)
    return lat


async def interleaved(
    base: tuple[str, Callable[[int], Awaitable[None]]],
    other: tuple[str, Callable[[int], Awaitable[None]]],
    concurrency: int,
    seconds: float,
    window: float = 1.0,
    open_rate: float | None = None,
) -> tuple[Measure, Measure, list[tuple[float, float]]]:
    """Both calls measured in alternating windows (see the module doc): the two measures
    over all windows, and each round's (p50 ratio, p99 ratio) of other / base. Closed
    loop with ``concurrency`` in flight, or open loop at ``open_rate`` calls/s."""

    async def measure(call: Callable[[int], Awaitable[None]], s: float, r: int) -> list[float]:
        if open_rate is None:
            return await _window(call, concurrency, s)
        return await _open_window(call, open_rate, s, r)

    for _, call in (base, other):
        await measure(call, 1.0, 0)  # warm-up, not counted
    rounds = max(1, round(seconds / window))
    lat: dict[str, list[float]] = {base[0]: [], other[0]: []}
    per_round: list[tuple[float, float]] = []
    for r in range(rounds):
        got: dict[str, list[float]] = {}
        for name, call in (base, other) if r % 2 == 0 else (other, base):
            got[name] = await measure(call, window, r + 1)
            lat[name].extend(got[name])
        b, o = got[base[0]], got[other[0]]
        if b and o:
            per_round.append((pct(o, 0.5) / pct(b, 0.5), pct(o, 0.99) / pct(b, 0.99)))
    measures = tuple(
        Measure(name, len(lat[name]), rounds * window, pct(lat[name], 0.5), pct(lat[name], 0.99))
        for name in (base[0], other[0])
    )
    return measures[0], measures[1], per_round


async def run(seconds: float, concurrency: int, reuse: bool = False) -> list[dict[str, Any]]:
    """Loads the data (or, with ``reuse``, keeps an earlier run's identical data), starts
    the service, measures; one dict per measure."""
    seed = 6
    stack = await asyncio.to_thread(up)
    url = mysql_url(DB_NAME)
    reused = reuse and await asyncio.to_thread(_loaded, url)
    if not reused:
        await asyncio.to_thread(drop_database, DB_NAME)
        url = await asyncio.to_thread(create_database, DB_NAME)
    OUT.mkdir(exist_ok=True)
    log = OUT / "recommendation.log"
    log.write_bytes(b"")
    port, metrics_port = free_port(), free_port()
    env = {
        "CRM_RECOMMENDATION_PORT": str(port),
        "CRM_RECOMMENDATION_HOST": "127.0.0.1",
        "CRM_RECOMMENDATION_METRICS_PORT": str(metrics_port),
        "CRM_RECOMMENDATION_DATABASE_URL": url,
        "CRM_RECOMMENDATION_ETCD_ENDPOINTS": stack.etcd_endpoint,
        "CRM_RECOMMENDATION_CONFIG_PREFIX": "/crm/bench/config",
        "CRM_RECOMMENDATION_LOG_LEVEL": "WARNING",
    }
    if reused:
        timings = {"generate_s": 0.0, "load_s": 0.0}
        print(f"bench: reusing the {N_CARS:,} cars + {N_CUSTOMERS * PER_CUSTOMER:,} "
              f"interactions already in {DB_NAME}")  # fmt: skip
    else:
        await asyncio.to_thread(run_module, "crm_recommendation", ["migrate"], env, log)
        timings = await asyncio.to_thread(_load, url, seed)
        print(
            f"bench: {N_CARS:,} cars + {N_CUSTOMERS * PER_CUSTOMER:,} interactions generated "
            f"in {timings['generate_s']:.1f}s, bulk-loaded in {timings['load_s']:.1f}s"
        )
    filtered, unfiltered = await asyncio.to_thread(_queries, seed)
    t_start = time.perf_counter()
    proc: ServiceProc = start_service("recommendation", "crm_recommendation", port, env, log)
    try:
        await wait_serving(proc, timeout=300)
        index_s = time.perf_counter() - t_start
        async with grpc.aio.insecure_channel(proc.target) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            stub = pb_grpc.RecommendationServiceStub(ch)
            check = health_pb2.HealthCheckRequest(service="")

            async def noop(_: int) -> None:
                await health.Check(check)

            async def rec(i: int) -> None:
                await stub.Recommend(filtered[i % len(filtered)])

            async def rec_open(i: int) -> None:
                await stub.Recommend(unfiltered[i % len(unfiltered)])

            base, m_rec, per_round = await interleaved(
                ("health Check (no-op, same server)", noop),
                (f"Recommend top-20 (city+budget) @{OPEN_RATE:g}/s", rec),
                concurrency,
                seconds,
                open_rate=OPEN_RATE,
            )
            base_sat, m_sat, _ = await interleaved(
                (f"health Check, {concurrency} in flight", noop),
                (f"Recommend top-20, {concurrency} in flight", rec),
                concurrency,
                seconds,
            )
            m_open = await closed_loop(
                "Recommend top-20 (no city/budget)", rec_open, concurrency, seconds
            )
        index_mb = _metric(metrics_port, "crm_recommendation_index_bytes") / 2**20
        rss_mb = _rss_mb(proc.popen.pid)
    finally:
        proc.stop()
    rows: list[dict[str, Any]] = []
    for m, ref, target in (
        (base, base, None),
        (m_rec, base, TARGET_RATIO),
        (base_sat, base_sat, None),
        (m_sat, base_sat, None),
        (m_open, base_sat, None),
    ):
        ratio = m.p99_ms / ref.p99_ms if ref.p99_ms else 0.0
        row: dict[str, Any] = {
            "measure": m.name,
            "rate": m.rate,
            "unit": "RPC/s",
            "p50_ms": m.p50_ms,
            "p99_ms": m.p99_ms,
            "p50_ratio_to_noop": m.p50_ms / ref.p50_ms if ref.p50_ms else 0.0,
            "p99_ratio_to_noop": ratio,
            "target": target,
            "ok": None if target is None else ratio <= target,
            "ops": m.ops,
            "seconds": m.seconds,
        }
        if m is m_rec:
            row["per_round_p50_ratio"] = [round(a, 2) for a, _ in per_round]
            row["per_round_p99_ratio"] = [round(b, 2) for _, b in per_round]
        rows.append(row)
    if base.p50_ms and base.p99_ms and per_round:
        p50s = sorted(a for a, _ in per_round)
        p99s = sorted(b for _, b in per_round)
        print(
            f"bench: Recommend / no-op interleaved over {len(per_round)} rounds: "
            f"p50 {m_rec.p50_ms / base.p50_ms:.2f}x, p99 {m_rec.p99_ms / base.p99_ms:.2f}x; "
            f"per round p50 {p50s[0]:.2f}..{p50s[-1]:.2f}x (median {p50s[len(p50s) // 2]:.2f}), "
            f"p99 {p99s[0]:.2f}..{p99s[-1]:.2f}x (median {p99s[len(p99s) // 2]:.2f})"
        )
    rows.append(
        {
            "measure": "index",
            "cars": N_CARS,
            "interactions": N_CUSTOMERS * PER_CUSTOMER,
            "index_mb": index_mb,
            "process_rss_mb": rss_mb,
            "start_to_serving_s": index_s,
            **timings,
        }
    )
    return rows


def _print(rows: list[dict[str, Any]]) -> None:
    print(
        f"\n{'measure':<38}{'RPC/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'p50/no-op':>11}"
        f"{'p99/no-op':>11}{'target':>10}"
    )
    for r in rows:
        if "p99_ms" not in r:
            continue
        target = (
            "" if r["target"] is None else f"<={r['target']:g} " + ("ok" if r["ok"] else "MISS")
        )
        print(
            f"{r['measure']:<38}{r['rate']:>9.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
            f"{r['p50_ratio_to_noop']:>10.2f}x{r['p99_ratio_to_noop']:>10.2f}x{target:>10}"
        )

    idx = rows[-1]
    print(
        f"\nindex: {idx['index_mb']:.0f} MB (estimate), process RSS {idx['process_rss_mb']:.0f} MB;"
        f" start -> SERVING {idx['start_to_serving_s']:.1f}s"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0, help="measured window per measure")
    ap.add_argument("--concurrency", type=int, default=16, help="calls in flight")
    ap.add_argument(
        "--reuse", action="store_true", help="keep an earlier run's data when it is all there"
    )
    args = ap.parse_args()
    rows = asyncio.run(run(args.seconds, args.concurrency, args.reuse))
    _print(rows)
    OUT.mkdir(exist_ok=True)
    (OUT / "recommendation.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
