"""`make demo`: the whole platform as local processes, and a compressed call-center day.

1. the local stack is up (MariaDB, Redis, etcd, Tansu; started when not running);
2. the platform runs as supervised processes (``crm_tools.local_platform.LocalPlatform``), each
   on a free port, logs under .demo/: recommendation (a small car inventory is loaded
   through UpsertCars), the bilog schema registry, intake service and file sink, the
   scheduler API, pump and worker, and assignment wired to all of them;
3. the day (``crm_tools.day``): 09:00-18:00 in a minute or so. Clues arrive for the sales
   and after-sales lines, agents take offers, call, complete or ask for call-backs, a
   sleepy agent lets offers ring out (the scheduler's timeout jobs recycle them), lunch
   breaks, a live routing change at 11:00, the FINANCE line opened at 13:00 by one config
   document; with ``--chaos`` services are killed with SIGKILL and restarted mid-day;
4. the report (``crm_tools.day_report``): the assignment database, the scheduler's jobs
   and the BI files are read back and checked against each other; a summary is printed
   and an HTML page with charts is written (its path is printed);
5. everything started here is stopped gracefully, in reverse order, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import signal
import sys
import time

import grpc
from crm.assignment.v1 import assignment_pb2 as pb
from crm.assignment.v1 import assignment_pb2_grpc as pb_grpc
from crm.recommendation.v1 import recommendation_pb2 as rpb
from crm.recommendation.v1 import recommendation_pb2_grpc as rpb_grpc

from crm_tools.day import BRANDS, CITIES, FINANCE_CONFIG, INITIAL_CONFIG, play
from crm_tools.day_report import collect, text_report, write_html
from crm_tools.local_platform import ROOT, LocalPlatform

STATUS = {v: k.removeprefix("STATUS_") for k, v in pb.Status.items()}
INVENTORY_SIZE = 300
# compressed timings of the assignment service for a day played in about a minute
ASSIGNMENT_ENV = {
    "RECYCLE_POLL_S": "0.25",
    "DISPATCH_POLL_S": "0.25",
    "REQUIRE_LINE_CONFIG": "true",
}


async def open_finance_with_crmctl(platform: LocalPlatform) -> str:
    """Open the FINANCE line the way ops would locally: one CRMConfig document applied
    with ``crmctl config apply`` (in a cluster: ``kubectl apply`` of the same document)."""
    doc = {
        "apiVersion": "crm.platform.io/v1alpha1",
        "kind": "CRMConfig",
        "metadata": {"name": "assignment-finance"},
        "spec": {"service": "assignment", "key": "FINANCE", "data": FINANCE_CONFIG},
    }
    path = platform.out / f"{platform.name}-finance.yaml"
    path.write_text(json.dumps(doc, indent=2))  # JSON is YAML
    await crmctl(platform, "config", "apply", "-f", str(path))
    return f"`crmctl config apply -f {path.name}`"


async def change_with_crmctl(platform: LocalPlatform, key: str, fields: dict[str, object]) -> int:
    """Patch fields of a live config key the way ops would: ``crmctl config set SERVICE KEY
    --set PATH=VALUE ...`` (validated like the operator does, kept in ``config history``
    with its author). Returns the revision written."""
    service, _, name = key.partition("/")
    sets = [arg for path, v in fields.items() for arg in ("--set", f"{path}={json.dumps(v)}")]
    text = await crmctl(platform, "config", "set", service, name, *sets)
    m = re.search(r"written at revision (\d+)", text)
    if m is None:
        raise RuntimeError(f"crmctl config set {key}: no revision in {text!r}")
    return int(m.group(1))


async def crmctl(platform: LocalPlatform, *args: str) -> str:
    """Run ``crmctl <args>`` against the local platform; print and return its output."""
    cmd = [
        sys.executable, "-m", "crm_ctl",
        "--etcd", platform.etcd, "--config-prefix", platform.prefix, "--user", "ops-demo",
        "--assignment", platform.target("assignment"),
        "--scheduler", platform.target("scheduler"),
        *args,
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    text = out.decode(errors="replace").rstrip()
    if proc.returncode != 0:
        raise RuntimeError(f"crmctl {' '.join(args)} failed ({proc.returncode}): {text}")
    for line in text.splitlines():
        print(f"    crmctl| {line}", flush=True)
    return text


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


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


async def load_inventory(target: str, cars: list[rpb.Car]) -> int:
    async with grpc.aio.insecure_channel(target) as ch:
        stub = rpb_grpc.RecommendationServiceStub(ch)
        created = 0
        for i in range(0, len(cars), 100):
            resp = await stub.UpsertCars(rpb.UpsertCarsRequest(cars=cars[i : i + 100]))
            created += resp.created_count + resp.updated_count
    return created


async def show_task(stub: pb_grpc.AssignmentServiceAsyncStub, task_id: int) -> None:
    detail = await stub.GetTask(pb.GetTaskRequest(id=task_id))
    print(f"history of task {task_id} (customer {detail.customer.phone.masked}):")
    for e in detail.history:
        who = f" agent {e.agent_id}" if e.agent_id else ""
        print(
            f"  {e.kind:<18} {STATUS.get(e.from_status, '-'):>12} -> "
            f"{STATUS.get(e.to_status, '-'):<12}{who}"
        )
    await show_recommendations(stub, task_id)


async def amain(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, main_task.cancel)
    platform = LocalPlatform(
        name=args.name,
        out=ROOT / ".demo",
        say=say,
        config=dict(INITIAL_CONFIG),
        assignment_env=ASSIGNMENT_ENV,
    )
    try:
        await platform.start()
        inventory = make_inventory(args.seed)
        loaded = await load_inventory(platform.target("recommendation"), inventory)
        say(f"{loaded} cars loaded into the inventory (UpsertCars)")
        if "console" in platform.processes:
            say(
                f"agent console: http://{platform.target('console')}/ (sign in as agent 101, "
                f"102, ...; config review at #/config)"
            )
        else:
            say("agent console not built (`make web`): not started")
        log = await play(
            platform,
            inventory,
            seed=args.seed,
            hour_s=args.hour_s,
            chaos=args.chaos,
            say=say,
            open_finance=lambda: open_finance_with_crmctl(platform),
            change_config=lambda key, fields: change_with_crmctl(platform, key, fields),
        )
        facts = await collect(platform, log, say)
        print(text_report(facts, log))
        if facts.sample_task:
            async with grpc.aio.insecure_channel(platform.target("assignment")) as ch:
                await show_task(pb_grpc.AssignmentServiceStub(ch), facts.sample_task)
        say("which assignment instances applied the FINANCE config (crmctl config rollout):")
        await crmctl(platform, "config", "rollout", "assignment", "FINANCE")
        say("who changed the sales routing, and what (crmctl config history):")
        history = await crmctl(platform, "config", "history", "assignment", "SALE")
        page = write_html(
            ROOT / ".demo" / f"{args.name}-report.html",
            facts,
            log,
            "CRM 2.0 — a call-center day",
            config_history={"assignment/SALE": history},
        )
        print(f"HTML report: {page} (open it in a browser)")
        if args.stay:
            where = (
                f"console http://{platform.target('console')}/, "
                if "console" in platform.processes
                else ""
            )
            say(
                f"the platform stays up ({where}assignment {platform.target('assignment')}); "
                "Ctrl-C stops it"
            )
            await asyncio.Event().wait()
        return 0 if facts.ok else 1
    except asyncio.CancelledError:
        say("interrupted: stopping")
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C: stop anyway
            loop.add_signal_handler(sig, lambda: say("stopping the processes, please wait"))
        await platform.stop()
        say("etcd/Tansu stay up for reuse (`make stack-down` stops them)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seed", type=int, default=7, help="random seed of the day")
    ap.add_argument(
        "--hour-s", type=float, default=5.0, help="real seconds per simulated hour (default 5)"
    )
    ap.add_argument(
        "--chaos",
        action="store_true",
        help="SIGKILL the scheduler worker, BI intake and assignment mid-day, restart them",
    )
    ap.add_argument("--name", default="crm_demo", help="database name and etcd prefix")
    ap.add_argument(
        "--stay",
        action="store_true",
        help="keep the platform running after the day (to explore the console) until Ctrl-C",
    )
    args = ap.parse_args()
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
