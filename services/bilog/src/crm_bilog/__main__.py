"""``python -m crm_bilog [serve|migrate|registry|sink|replay|kpi]``: the one entry point.

- ``serve`` (default): the gRPC intake service until SIGTERM/SIGINT.
- ``migrate``: upgrade the dev registry's database schema and exit.
- ``registry``: the dev schema registry (Confluent REST subset) until SIGTERM/SIGINT
  (``--migrate`` first upgrades its database).
- ``sink``: the file sink (consumer group; gRPC health, Prometheus metrics) until
  SIGTERM/SIGINT.
- ``replay``: re-submit bad rows of the failed-events topic after a fix.
- ``kpi``: the realtime KPI consumer (Prometheus metrics per business line, gRPC health)
  until SIGTERM/SIGINT.

Settings come from ``CRM_BILOG_*`` environment variables (see ``settings.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Sequence

from crm_common.cli import Command, ServiceCli

from crm_bilog.settings import BilogSettings


def migrate(settings: BilogSettings) -> None:
    from crm_bilog.store.migrate import upgrade

    upgrade(settings.database_url)


async def serve(settings: BilogSettings) -> None:
    from crm_bilog.app import build_app

    await build_app(settings).run_until_signal()


async def run_registry(settings: BilogSettings) -> None:
    from crm_common.aio import BlockingExecutor

    from crm_bilog.registry.server import RegistryServer
    from crm_bilog.store import RegistryStore, make_engine

    engine = make_engine(settings.database_url, settings.db_pool_size)
    executor = BlockingExecutor(settings.db_pool_size, name="crm-bilog-registry-db")
    server = RegistryServer(
        RegistryStore(engine), executor, settings.registry_host, settings.registry_port
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        await stop.wait()
    finally:
        await server.stop()
        await executor.aclose()
        engine.dispose()


async def run_kpi(settings: BilogSettings) -> None:
    from crm_bilog.kpi.app import build_kpi_app

    await build_kpi_app(settings).run_until_signal()


def run_sink(settings: BilogSettings) -> None:
    from crm_bilog.sink.process import run_sink as run

    run(settings)


def _replay_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from-beginning", action="store_true", help="ignore committed offsets")
    parser.add_argument("--schema", help="only bad rows of this schema (full name)")
    parser.add_argument("--dry-run", action="store_true", help="validate only; produce nothing")


def _replay(settings: BilogSettings, args: argparse.Namespace) -> int:
    from crm_bilog.replay import replay

    report = asyncio.run(
        replay(
            settings,
            from_beginning=args.from_beginning,
            only_schema=args.schema,
            dry_run=args.dry_run,
        )
    )
    print(json.dumps(report.__dict__, indent=2))
    return 0 if report.still_failing == 0 else 2


CLI = ServiceCli(
    "bilog",
    __doc__,
    BilogSettings,
    {
        "serve": Command(
            "run the gRPC intake service (default)", lambda s, _: asyncio.run(serve(s))
        ),
        "registry": Command(
            "run the dev schema registry",
            lambda s, _: asyncio.run(run_registry(s)),
            migrate_option=True,
        ),
        "sink": Command("run the Avro file sink", lambda s, _: run_sink(s)),
        "replay": Command("re-submit bad rows after a fix", _replay, _replay_arguments),
        "kpi": Command(
            "run the realtime KPI consumer (Prometheus metrics)",
            lambda s, _: asyncio.run(run_kpi(s)),
        ),
    },
    migrate=migrate,
    migrate_help="upgrade the dev registry's database schema",
)


def main(argv: Sequence[str] | None = None) -> int:
    return CLI.main(argv)


if __name__ == "__main__":
    sys.exit(main())
