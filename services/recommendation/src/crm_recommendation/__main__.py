"""``python -m crm_recommendation [serve|migrate]``: the one entry point of the service.

- ``serve`` (default): run the gRPC server until SIGTERM/SIGINT (``--migrate`` first
  upgrades the database schema, handy for local runs).
- ``migrate``: upgrade the database schema to the newest revision and exit.

Settings come from ``CRM_RECOMMENDATION_*`` environment variables (see ``settings.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from crm_common.logs import configure_logging

from crm_recommendation.settings import RecommendationSettings

log = logging.getLogger("crm.recommendation")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crm-recommendation", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the gRPC server (default)")
    serve.add_argument(
        "--migrate", action="store_true", help="upgrade the database schema before serving"
    )
    sub.add_parser("migrate", help="upgrade the database schema to the newest revision")
    return parser


def migrate(settings: RecommendationSettings) -> None:
    from crm_recommendation.store.migrate import upgrade

    log.info("migrating the database schema to head")
    upgrade(settings.database_url)
    log.info("database schema is up to date")


async def serve(settings: RecommendationSettings) -> None:
    from crm_recommendation.app import build_app

    await build_app(settings).run_until_signal()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = RecommendationSettings()
    configure_logging("recommendation", settings.log_level)
    command = args.command or "serve"
    if command == "migrate" or getattr(args, "migrate", False):
        migrate(settings)
        if command == "migrate":
            return 0
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
