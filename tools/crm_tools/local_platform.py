"""The whole platform as local processes, supervised: what `make demo` and the end-to-end
test run.

:class:`LocalPlatform` brings up the local stack (MariaDB, Redis, etcd, Tansu; started
when not running), gives every service a fresh database, seeds the live config in etcd,
then starts, in dependency order and with a readiness wait for each:

=================  ===========================================  ==========================
process            command                                      ready when
=================  ===========================================  ==========================
recommendation     ``python -m crm_recommendation serve``       gRPC health SERVING
bilog-registry     ``python -m crm_bilog registry``             ``GET /subjects`` is 200
bilog              ``python -m crm_bilog serve``                gRPC health SERVING
bilog-sink         ``python -m crm_bilog sink``                 assigned + health SERVING
bilog-kpi          ``python -m crm_bilog kpi``                  gRPC health SERVING
scheduler          ``python -m crm_scheduler serve``            gRPC health SERVING
scheduler-pump     ``python -m crm_scheduler pump``             gRPC health SERVING
scheduler-worker   ``python -m crm_scheduler worker``           gRPC health SERVING
assignment         ``python -m crm_assignment serve``           gRPC health SERVING
config-admin       ``python -m crm_ctl serve-config-admin``     gRPC health SERVING
console            ``python -m crm_web serve`` (grpc-web)       ``GET /healthz`` is 200
=================  ===========================================  ==========================

The console (the agent console and config review in the browser) is started when
``web/dist`` is built (``make web``; ``make demo`` does it).

Each listens on a free port on 127.0.0.1 and logs to ``<out>/<name>-<process>.log``. A
supervisor notices a process that exits on its own, records it as an incident and starts
it again (same command, port and environment), at most ``max_restarts`` times per
process. :meth:`LocalPlatform.kill` SIGKILLs a process and :meth:`LocalPlatform.restart`
brings it back — the end-to-end test uses them to check that nothing acknowledged is
lost. :meth:`LocalPlatform.stop` stops everything gracefully (SIGTERM, drain) in reverse
start order.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from crm_common.config_watch import delete_prefix
from crm_ctl.config import ConfigAdmin
from crm_devstack import Stack, create_database, drop_database, free_port, up

from crm_tools.procs import ServiceProc, start_service, wait_http, wait_log, wait_serving

__all__ = ["Incident", "LocalPlatform", "Process"]

Ready = Callable[[ServiceProc], Awaitable[None]]
ASSIGNMENT_SERVICE = "crm.assignment.v1.AssignmentService"
ROOT = Path(__file__).resolve().parents[2]


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class Process:
    """One supervised process: how to start it and how to know it is ready."""

    name: str
    module: str
    args: list[str]
    port: int
    env: dict[str, str]
    ready: Ready
    ready_what: str
    proc: ServiceProc | None = None
    restarts: int = 0
    expected_down: bool = False  # killed or stopped on purpose: not an incident


@dataclass(frozen=True)
class Incident:
    """A process that exited without being asked to."""

    at: float
    process: str
    exit_code: int | None
    restarted: bool


@dataclass
class LocalPlatform:
    """The platform's processes on one machine (see the module docstring)."""

    name: str
    out: Path
    say: Callable[[str], None] = _say
    max_restarts: int = 3
    config: dict[str, dict[str, object]] = field(default_factory=dict)
    """Initial live config: ``{"assignment/SALE": {...}, ...}`` under :attr:`prefix`
    (written through ``crm_ctl``'s ConfigAdmin: validated, kept in ``config history``)."""
    config_author: str = "local-platform"
    """Author of the initial config in the config history."""
    assignment_env: dict[str, str] = field(default_factory=dict)
    """Extra CRM_ASSIGNMENT_* settings (e.g. compressed timings)."""
    stack: Stack | None = None
    processes: dict[str, Process] = field(default_factory=dict)
    incidents: list[Incident] = field(default_factory=list)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    _order: list[str] = field(default_factory=list)
    _supervisor: asyncio.Task[None] | None = None
    _logs: list[Path] = field(default_factory=list)
    web_dist: Path = ROOT / "web" / "dist"
    """The built console; without index.html there the console is not started."""
    kpi_metrics_url: str = ""
    """Prometheus endpoint of the realtime KPIs (``crm_bilog kpi``)."""

    # -- names --------------------------------------------------------------------------
    @property
    def prefix(self) -> str:
        """etcd prefix of this platform's live config."""
        return f"/crm/{self.name}/config"

    @property
    def sink_dir(self) -> Path:
        """Where the bilog sink writes its time-partitioned Avro files."""
        return self.out / self.name / "bi-files"

    @property
    def databases(self) -> dict[str, str]:
        """The fresh databases of this platform, by service."""
        n = self.name
        return {
            "assignment": n,
            "recommendation": f"{n}_reco",
            "registry": f"{n}_bireg",
            "scheduler": f"{n}_sched",
        }

    @property
    def etcd(self) -> str:
        assert self.stack is not None, "start() first"
        return self.stack.etcd_endpoint

    def target(self, process: str) -> str:
        """host:port of a started process's gRPC (or health) port."""
        return f"127.0.0.1:{self.processes[process].port}"

    def log_path(self, process: str) -> Path:
        return self.out / f"{self.name}-{process}.log"

    # -- start / stop -------------------------------------------------------------------
    async def start(self) -> None:
        """Stack, databases, config, then every process in order (each waited ready)."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.say("starting the local stack (MariaDB, Redis, etcd, Tansu) if needed")
        self.stack = await asyncio.to_thread(up)
        urls = {}
        for role, db in self.databases.items():
            await asyncio.to_thread(drop_database, db)
            urls[role] = await asyncio.to_thread(create_database, db)
        self.say(
            f"fresh databases {', '.join(self.databases.values())}; "
            "each service migrates its own at start"
        )
        await delete_prefix(self.etcd, self.prefix + "/")  # an earlier run's config
        admin = ConfigAdmin.connect(self.etcd, self.prefix)
        try:  # validated and kept in the config history, like an operator's write
            for key, value in self.config.items():
                service, _, name = key.partition("/")
                await admin.set(service, name, value, author=self.config_author, field=key)
        finally:
            await admin.close()
        shutil.rmtree(self.sink_dir, ignore_errors=True)
        self.sink_dir.mkdir(parents=True)
        self._plan(urls)
        # independent processes start together; each group waits for the previous one
        groups = [
            ["recommendation", "bilog-registry", "scheduler"],
            ["bilog", "scheduler-pump", "scheduler-worker"],
            ["bilog-sink", "bilog-kpi", "assignment", "config-admin"],
        ]
        if "console" in self.processes:
            groups.append(["console"])
        for group in groups:
            for name in group:
                self._launch(self.processes[name])
            await asyncio.gather(*(self._wait_ready(self.processes[n]) for n in group))
        self._supervisor = asyncio.create_task(self._supervise())
        self.say(
            "platform up: "
            + ", ".join(f"{p.name}@{p.port}" if p.port else p.name for p in self._started())
        )

    async def stop(self) -> None:
        """Stop every process gracefully (SIGTERM, then SIGKILL after 20 s), in reverse
        start order; report error lines found in their logs."""
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        for p in reversed(self._started()):
            assert p.proc is not None
            p.expected_down = True
            code = await asyncio.to_thread(p.proc.stop)
            self.say(f"{p.name} stopped (exit code {code})")
        for path in self._logs:
            with contextlib.suppress(OSError):
                lines = path.read_text(errors="replace").splitlines()
                errors = [ln for ln in lines if '"level": "ERROR"' in ln]
                if errors:
                    print(f"{path.name}: {len(errors)} error log lines, first: {errors[0][:300]}")

    async def kill(self, process: str) -> None:
        """SIGKILL ``process`` (no drain, no goodbye); the supervisor leaves it down."""
        p = self.processes[process]
        assert p.proc is not None
        p.expected_down = True
        p.proc.popen.send_signal(signal.SIGKILL)
        await asyncio.to_thread(p.proc.popen.wait)
        self.say(f"{process} killed with SIGKILL (pid {p.proc.popen.pid})")

    async def restart(self, process: str) -> None:
        """Start ``process`` again (same command, port, environment) and wait ready."""
        p = self.processes[process]
        if p.proc is not None and p.proc.popen.poll() is None:
            p.expected_down = True
            await asyncio.to_thread(p.proc.stop)
        self._launch(p)
        await self._wait_ready(p)

    async def __aenter__(self) -> LocalPlatform:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def drop_databases(self) -> None:
        for db in self.databases.values():
            drop_database(db)

    # -- internals ----------------------------------------------------------------------
    def _started(self) -> list[Process]:
        return [self.processes[n] for n in self._order if self.processes[n].proc is not None]

    def _launch(self, p: Process) -> None:
        path = self.log_path(p.name)
        if path not in self._logs:
            path.write_bytes(b"")
            self._logs.append(path)
        p.expected_down = False
        p.proc = start_service(p.name, p.module, p.port, p.env, path, p.args)
        if p.name not in self._order:
            self._order.append(p.name)
        where = f"127.0.0.1:{p.port}" if p.port else "no port"
        self.say(f"started {p.name:<16} {where:<16} pid {p.proc.popen.pid}  log {path}")

    async def _wait_ready(self, p: Process) -> None:
        assert p.proc is not None
        await p.ready(p.proc)
        self.say(f"{p.name} is ready ({p.ready_what})")

    async def _supervise(self) -> None:
        """Restart a process that exited on its own (at most ``max_restarts`` times)."""
        while True:
            await asyncio.sleep(0.5)
            for p in list(self._started()):
                assert p.proc is not None
                code = p.proc.popen.poll()
                if code is None or p.expected_down:
                    continue
                again = p.restarts < self.max_restarts
                self.incidents.append(Incident(time.time(), p.name, code, again))
                p.expected_down = True
                if not again:
                    self.say(f"SUPERVISOR: {p.name} exited ({code}); restart budget spent")
                    continue
                p.restarts += 1
                self.say(f"SUPERVISOR: {p.name} exited ({code}); starting it again")
                self._launch(p)
                try:
                    await self._wait_ready(p)
                except RuntimeError as exc:
                    self.say(f"SUPERVISOR: {p.name} did not come back: {exc}")

    def _plan(self, urls: dict[str, str]) -> None:
        assert self.stack is not None
        stack = self.stack
        common = {"ETCD_ENDPOINTS": stack.etcd_endpoint, "CONFIG_PREFIX": self.prefix}

        def env(prefix: str, values: dict[str, str]) -> dict[str, str]:
            return {f"CRM_{prefix}_{k}": v for k, v in {**common, **values}.items()}

        def add(
            name: str,
            module: str,
            args: list[str],
            port: int,
            e: dict[str, str],
            ready: Ready = wait_serving,
            what: str = "gRPC health SERVING",
        ) -> None:
            self.processes[name] = Process(name, module, args, port, e, ready, what)

        ports = {
            n: free_port()
            for n in (
                "recommendation",
                "bilog-registry",
                "bilog",
                "scheduler",
                "scheduler-pump",
                "scheduler-worker",
                "assignment",
                "bilog-kpi",
                "kpi-metrics",
                "bilog-sink",
                "config-admin",
                "console",
            )
        }
        self.kpi_metrics_url = f"http://127.0.0.1:{ports['kpi-metrics']}/metrics"
        add(
            "recommendation",
            "crm_recommendation",
            ["serve", "--migrate"],
            ports["recommendation"],
            env(
                "RECOMMENDATION",
                {
                    "HOST": "127.0.0.1",
                    "PORT": str(ports["recommendation"]),
                    "METRICS_PORT": "-1",
                    "DATABASE_URL": urls["recommendation"],
                    "REFRESH_INTERVAL_S": "0.5",
                },
            ),
            wait_serving,
        )
        registry_url = f"http://127.0.0.1:{ports['bilog-registry']}"
        bilog_common = {
            "HOST": "127.0.0.1",
            "KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
            "TOPIC_PREFIX": f"{self.name}{self.run_id}.",
            "SCHEMA_REGISTRY_URL": registry_url,
            "METRICS_PORT": "-1",
            "READINESS_INTERVAL_S": "0.2",
        }

        async def registry_ready(proc: ServiceProc) -> None:
            await wait_http(proc, "/subjects")

        add(
            "bilog-registry",
            "crm_bilog",
            ["registry", "--migrate"],
            ports["bilog-registry"],
            env(
                "BILOG",
                {
                    **bilog_common,
                    "REGISTRY_HOST": "127.0.0.1",
                    "REGISTRY_PORT": str(ports["bilog-registry"]),
                    "DATABASE_URL": urls["registry"],
                },
            ),
            registry_ready,
            "GET /subjects answers 200",
        )
        add(
            "bilog",
            "crm_bilog",
            ["serve"],
            ports["bilog"],
            env("BILOG", {**bilog_common, "PORT": str(ports["bilog"])}),
            wait_serving,
        )

        async def sink_ready(proc: ServiceProc) -> None:
            await wait_log(proc, "partitions assigned", timeout=60)
            await wait_serving(proc)

        add(
            "bilog-sink",
            "crm_bilog",
            ["sink"],
            ports["bilog-sink"],
            env(
                "BILOG",
                {
                    **bilog_common,
                    "SINK_PORT": str(ports["bilog-sink"]),
                    "SINK_METRICS_PORT": "-1",
                    "SINK_DIR": str(self.sink_dir),
                    "SINK_GROUP_ID": f"{self.name}-sink-{self.run_id}",
                    "SINK_SESSION_TIMEOUT_MS": "6000",
                    "SINK_IDLE_FLUSH_S": "1",
                    "SINK_ROTATE_INTERVAL_S": "3",
                },
            ),
            sink_ready,
            "its Kafka partitions are assigned and its gRPC health SERVING",
        )
        add(
            "bilog-kpi",
            "crm_bilog",
            ["kpi"],
            ports["bilog-kpi"],
            env(
                "BILOG",
                {
                    **bilog_common,
                    "KPI_PORT": str(ports["bilog-kpi"]),
                    "KPI_METRICS_PORT": str(ports["kpi-metrics"]),
                    "KPI_GROUP_ID": f"{self.name}-kpi-{self.run_id}",
                    "KPI_SESSION_TIMEOUT_MS": "6000",
                },
            ),
        )
        sched = {
            "HOST": "127.0.0.1",
            "PORT": str(ports["scheduler"]),
            "METRICS_PORT": "-1",
            "DATABASE_URL": urls["scheduler"],
            "REDIS_URL": stack.redis_url,
            "QUEUE_NAME": f"{self.name}-{self.run_id}",
            "ALLOWED_TARGET_SERVICES": ASSIGNMENT_SERVICE,
            "PUMP_POLL_S": "0.2",
            "PUMP_HEALTH_PORT": str(ports["scheduler-pump"]),
            "PUMP_METRICS_PORT": "-1",
            "WORKER_HEALTH_PORT": str(ports["scheduler-worker"]),
            "WORKER_METRICS_PORT": "-1",
            "WORKER_CONCURRENCY": "4",
        }
        add(
            "scheduler",
            "crm_scheduler",
            ["serve", "--migrate"],
            ports["scheduler"],
            env("SCHEDULER", sched),
            wait_serving,
        )
        add(
            "scheduler-pump",
            "crm_scheduler",
            ["pump"],
            ports["scheduler-pump"],
            env("SCHEDULER", sched),
            wait_serving,
        )
        add(
            "scheduler-worker",
            "crm_scheduler",
            ["worker"],
            ports["scheduler-worker"],
            env("SCHEDULER", sched),
            wait_serving,
        )
        add(
            "assignment",
            "crm_assignment",
            ["serve", "--migrate"],
            ports["assignment"],
            env(
                "ASSIGNMENT",
                {
                    "HOST": "127.0.0.1",
                    "PORT": str(ports["assignment"]),
                    "METRICS_PORT": "-1",
                    "DATABASE_URL": urls["assignment"],
                    "RECOMMENDATION_TARGET": f"127.0.0.1:{ports['recommendation']}",
                    "RECOMMENDATION_TIMEOUT_S": "2",
                    "BILOG_TARGET": f"127.0.0.1:{ports['bilog']}",
                    "SCHEDULER_TARGET": f"127.0.0.1:{ports['scheduler']}",
                    "SELF_TARGET": f"127.0.0.1:{ports['assignment']}",
                    # one secret for the run: console tokens survive a restart
                    "AUTH_TOKEN_SECRET": uuid.uuid4().hex + uuid.uuid4().hex,
                    "RECYCLE_SAFETY_SWEEP_S": "10",
                    **self.assignment_env,
                },
            ),
            wait_serving,
        )
        add(
            "config-admin",
            "crm_ctl",
            ["serve-config-admin", "--host", "127.0.0.1", "--port", str(ports["config-admin"])],
            ports["config-admin"],
            env("CONFIG_ADMIN", {"METRICS_PORT": "-1"}),
        )
        if (self.web_dist / "index.html").exists():

            async def console_ready(proc: ServiceProc) -> None:
                await wait_http(proc, "/healthz")

            add(
                "console",
                "crm_web",
                [
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(ports["console"]),
                    "--static",
                    str(self.web_dist),
                    "--assignment",
                    f"127.0.0.1:{ports['assignment']}",
                    "--recommendation",
                    f"127.0.0.1:{ports['recommendation']}",
                    "--config-admin",
                    f"127.0.0.1:{ports['config-admin']}",
                ],
                ports["console"],
                {},
                console_ready,
                "GET /healthz answers 200",
            )
