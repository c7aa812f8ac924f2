"""``python -m crm_scheduler [serve|pump|worker|migrate]``: the one entry point.

- ``serve`` (default): the gRPC API (Schedule, Cancel, Get, List, Rerun) until SIGTERM
  (``--migrate`` first upgrades the database schema, handy for local runs);
- ``pump``: moves due jobs from MySQL to the Celery queue on Redis and re-sends jobs
  whose lease expired (run one or more; they share the work through row locks);
- ``worker``: a Celery worker that claims due jobs and calls their targets (run many);
- ``migrate``: upgrade the database schema to the newest revision and exit.

Settings come from ``CRM_SCHEDULER_*`` environment variables (see ``settings.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from crm_common.cli import Command, ServiceCli

from crm_scheduler.settings import SchedulerSettings


def _migrate(settings: SchedulerSettings) -> None:
    from crm_scheduler.store.migrate import upgrade

    upgrade(settings.database_url)


async def _run_api(settings: SchedulerSettings) -> None:
    from crm_scheduler.app import build_app

    await build_app(settings).run_until_signal()  # built inside the loop it runs in


def _serve(settings: SchedulerSettings, _: argparse.Namespace) -> None:
    asyncio.run(_run_api(settings))


def _pump(settings: SchedulerSettings, _: argparse.Namespace) -> None:
    from crm_scheduler.pump.process import run_pump

    asyncio.run(run_pump(settings))


def _worker(settings: SchedulerSettings, _: argparse.Namespace) -> int:
    from crm_scheduler.worker.process import run_worker

    return run_worker(settings)


CLI = ServiceCli(
    "scheduler",
    __doc__,
    SchedulerSettings,
    {
        "serve": Command("run the gRPC API server (default)", _serve, migrate_option=True),
        "pump": Command(
            "move due jobs to the worker queue; reap expired leases",
            _pump,
            log_name="scheduler-pump",
        ),
        "worker": Command(
            "run a Celery worker that executes due jobs", _worker, log_name="scheduler-worker"
        ),
    },
    migrate=_migrate,
)


def main(argv: Sequence[str] | None = None) -> int:
    return CLI.main(argv)


if __name__ == "__main__":
    sys.exit(main())
