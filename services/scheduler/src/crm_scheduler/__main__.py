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
import logging
import sys
from collections.abc import Sequence

from crm_common.logs import configure_logging

from crm_scheduler.settings import SchedulerSettings

log = logging.getLogger("crm.scheduler")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crm-scheduler", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the gRPC API server (default)")
    serve.add_argument(
        "--migrate", action="store_true", help="upgrade the database schema before serving"
    )
    sub.add_parser("pump", help="move due jobs to the worker queue; reap expired leases")
    sub.add_parser("worker", help="run a Celery worker that executes due jobs")
    sub.add_parser("migrate", help="upgrade the database schema to the newest revision")
    return parser


def migrate(settings: SchedulerSettings) -> None:
    from crm_scheduler.store.migrate import upgrade

    log.info("migrating the database schema to head")
    upgrade(settings.database_url)
    log.info("database schema is up to date")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = SchedulerSettings()
    command = args.command or "serve"
    configure_logging(
        f"scheduler-{command}" if command != "serve" else "scheduler", settings.log_level
    )
    if command == "migrate" or getattr(args, "migrate", False):
        migrate(settings)
        if command == "migrate":
            return 0
    if command == "pump":
        from crm_scheduler.pump.process import run_pump

        asyncio.run(run_pump(settings))
        return 0
    if command == "worker":
        from crm_scheduler.worker.process import run_worker

        return run_worker(settings)
    from crm_scheduler.app import build_app

    asyncio.run(build_app(settings).run_until_signal())
    return 0


if __name__ == "__main__":
    sys.exit(main())
