"""``python -m crm_recommendation [serve|migrate]``: the one entry point of the service.

- ``serve`` (default): run the gRPC server until SIGTERM/SIGINT (``--migrate`` first
  upgrades the database schema, handy for local runs).
- ``migrate``: upgrade the database schema to the newest revision and exit.

Settings come from ``CRM_RECOMMENDATION_*`` environment variables (see ``settings.py``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from crm_common.cli import ServiceCli

from crm_recommendation.settings import RecommendationSettings

CLI = ServiceCli.grpc_service(
    "recommendation",
    __doc__,
    RecommendationSettings,
    build_app="crm_recommendation.app:build_app",
    upgrade="crm_recommendation.store.migrate:upgrade",
)


def main(argv: Sequence[str] | None = None) -> int:
    return CLI.main(argv)


if __name__ == "__main__":
    sys.exit(main())
