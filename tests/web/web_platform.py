"""The real local platform for the browser tests, as processes on free ports.

- the recommendation service (fresh database, a small inventory loaded with UpsertCars),
- the assignment service (fresh database, routing config in etcd, recommendations on),
- optionally the ConfigAdmin service (``python -m crm_ctl serve-config-admin``),
- the dev grpc-web gateway (``python -m crm_web serve``) serving the console built from
  the current sources (``npm run build`` in web/).

Browser scenarios are node scripts beside this file (``*.mjs``) driving Debian's chromium
through playwright-core (installed in web/node_modules by ``make setup``). A scenario
prints one JSON object per line on stdout (``{"event": ...}``) and can wait for a line on
stdin, so a test can act on the platform (e.g. send a clue) at the right moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from crm.recommendation.v1 import recommendation_pb2 as rpb
from crm.recommendation.v1 import recommendation_pb2_grpc as rpb_grpc
from crm_common.config_watch import put_json
from crm_devstack import Stack, create_database, drop_database, free_port
from crm_tools.procs import ServiceProc, start_service, wait_http, wait_serving

ROOT = Path(__file__).resolve().parents[2]
WEB = ROOT / "web"
HERE = Path(__file__).resolve().parent
ARTIFACTS = HERE / "artifacts"  # screenshots and logs (git-ignored)
CHROMIUM = Path("/usr/bin/chromium")
ASSIGNMENT_INSTANCE = "assignment-web-test-0"
"""The assignment process's instance name: the name it acknowledges config under."""


def browser_missing() -> str | None:
    """Why the browser tests cannot run here (None when they can)."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} missing (make setup installs Debian's chromium)"
    if not (WEB / "node_modules" / "playwright-core").is_dir():
        return "web/node_modules missing (make setup runs npm ci in web/)"
    if shutil.which("node") is None:
        return "node missing"
    return None


def build_console() -> Path:
    """Build web/dist from the current sources (type-check included)."""
    res = subprocess.run(
        ["npm", "run", "build"], cwd=WEB, capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        raise RuntimeError(f"npm run build failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return WEB / "dist"


def make_cars(n: int = 40) -> list[rpb.Car]:
    brands = [("BMW", "3 Series"), ("Audi", "A4L"), ("Toyota", "Camry"), ("Honda", "Accord")]
    cars = []
    for i in range(1, n + 1):
        brand, series = brands[i % len(brands)]
        cars.append(
            rpb.Car(
                id=i,
                brand=brand,
                series=series,
                model_year=2016 + i % 8,
                mileage_km=10_000 * (1 + i % 9),
                price_yuan=80_000 + 5_000 * i,
                city="beijing" if i % 3 else "shanghai",
                body_type=rpb.BODY_TYPE_SEDAN,
                status=rpb.CAR_STATUS_ON_SALE,
            )
        )
    return cars


@dataclass
class Platform:
    stack: Stack
    prefix: str
    assignment: ServiceProc
    gateway: ServiceProc
    config_admin: ServiceProc | None = None
    procs: list[ServiceProc] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.port}/"


@contextlib.asynccontextmanager
async def platform(
    stack: Stack,
    line_configs: dict[str, dict[str, Any]],
    *,
    config_admin: bool = False,
    assignment_env: dict[str, str] | None = None,
) -> AsyncIterator[Platform]:
    """Start the processes; stop them (SIGTERM, reverse order) and drop the databases."""
    run = uuid.uuid4().hex[:8]
    logs = ARTIFACTS / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    prefix = f"/crm-web-t/{run}/config"
    dbs = [f"crm_web_{run}", f"crm_web_{run}_reco"]
    procs: list[ServiceProc] = []
    try:
        for line, value in line_configs.items():  # routing config per business line
            await put_json(stack.etcd_endpoint, f"{prefix}/assignment/{line}", value)
        common = {"ETCD_ENDPOINTS": stack.etcd_endpoint, "CONFIG_PREFIX": prefix}
        reco_port = free_port()
        reco_env = {
            f"CRM_RECOMMENDATION_{k}": v
            for k, v in {
                **common,
                "HOST": "127.0.0.1",
                "PORT": str(reco_port),
                "METRICS_PORT": "-1",
                "DATABASE_URL": create_database(dbs[1]),
                "REFRESH_INTERVAL_S": "0.5",
            }.items()
        }
        reco = start_service(
            "recommendation",
            "crm_recommendation",
            reco_port,
            reco_env,
            logs / f"{run}-recommendation.log",
            ["serve", "--migrate"],
        )
        procs.append(reco)
        port = free_port()
        env = {
            "CRM_ASSIGNMENT_HOST": "127.0.0.1",
            "CRM_ASSIGNMENT_PORT": str(port),
            "CRM_ASSIGNMENT_METRICS_PORT": "-1",
            "CRM_ASSIGNMENT_DATABASE_URL": create_database(dbs[0]),
            "CRM_ASSIGNMENT_ETCD_ENDPOINTS": stack.etcd_endpoint,
            "CRM_ASSIGNMENT_CONFIG_PREFIX": prefix,
            "CRM_ASSIGNMENT_RECOMMENDATION_TARGET": f"127.0.0.1:{reco_port}",
            "CRM_ASSIGNMENT_RECOMMENDATION_TIMEOUT_S": "2",
            "CRM_ASSIGNMENT_DISPATCH_POLL_S": "0.3",
            "CRM_ASSIGNMENT_AUTH_TOKEN_SECRET": f"web-test-secret-{run}",
            "CRM_ASSIGNMENT_INSTANCE_NAME": ASSIGNMENT_INSTANCE,
            **(assignment_env or {}),
        }
        asg = start_service(
            "assignment",
            "crm_assignment",
            port,
            env,
            logs / f"{run}-assignment.log",
            ["serve", "--migrate"],
        )
        procs.append(asg)
        await wait_serving(reco, 90)
        async with grpc.aio.insecure_channel(reco.target) as ch:
            await rpb_grpc.RecommendationServiceStub(ch).UpsertCars(
                rpb.UpsertCarsRequest(cars=make_cars())
            )
        await wait_serving(asg, 90)
        admin: ServiceProc | None = None
        if config_admin:
            admin_port = free_port()
            admin = start_service(
                "config-admin",
                "crm_ctl",
                admin_port,
                {
                    "CRM_CONFIG_ADMIN_ETCD_ENDPOINTS": stack.etcd_endpoint,
                    "CRM_CONFIG_ADMIN_CONFIG_PREFIX": prefix,
                    "CRM_CONFIG_ADMIN_METRICS_PORT": "-1",
                },
                logs / f"{run}-config-admin.log",
                ["serve-config-admin", "--host", "127.0.0.1", "--port", str(admin_port)],
            )
            procs.append(admin)
            await wait_serving(admin, 60)
        gw_port = free_port()
        gw_args = ["serve", "--port", str(gw_port), "--assignment", asg.target]
        if admin is not None:
            gw_args += ["--config-admin", admin.target]
        gateway = start_service(
            "gateway", "crm_web", gw_port, {}, logs / f"{run}-gateway.log", gw_args
        )
        procs.append(gateway)
        await wait_http(gateway, "/healthz", 30)
        yield Platform(stack, prefix, asg, gateway, admin, procs)
    finally:
        for proc in reversed(procs):
            await asyncio.to_thread(proc.stop)
        for db in dbs:
            drop_database(db)


class Scenario:
    """A node scenario script run against the platform: JSON events out, lines in."""

    def __init__(self, script: str, env: dict[str, str]) -> None:
        self.script = HERE / script
        self.env = env
        self.events: list[dict[str, Any]] = []
        self.stderr = b""
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Scenario:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.proc = await asyncio.create_subprocess_exec(
            "node",
            str(self.script),
            cwd=HERE,
            env={**os.environ, "CRM_WEB_DIR": str(WEB), "ARTIFACTS": str(ARTIFACTS), **self.env},
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    async def event(self, name: str, timeout: float = 60) -> dict[str, Any]:
        """The next event named ``name`` (a ``failed`` event or an exit raises)."""
        assert self.proc is not None
        assert self.proc.stdout is not None
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
            if not line:
                await self.proc.wait()
                self.stderr = await self.proc.stderr.read() if self.proc.stderr else b""
                raise AssertionError(
                    f"scenario ended (exit {self.proc.returncode}) before {name!r}: "
                    f"{self.events[-3:]}\n{self.stderr.decode(errors='replace')[-3000:]}"
                )
            try:
                ev = json.loads(line)
            except ValueError:
                continue  # not ours
            self.events.append(ev)
            if ev.get("event") == "failed":
                raise AssertionError(f"scenario step failed: {ev}")
            if ev.get("event") == name:
                return ev

    async def send(self, line: str) -> None:
        assert self.proc is not None
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    async def finish(self, timeout: float = 60) -> int:
        assert self.proc is not None
        await self.event("done", timeout)
        return await asyncio.wait_for(self.proc.wait(), timeout)
