"""The command line of a service, ``python -m crm_<svc> [COMMAND]``, built once.

Each service's ``__main__`` describes its commands (:class:`Command`) and calls
:meth:`ServiceCli.main`; this module parses the arguments, reads the settings from the
environment, configures JSON logging and runs the command:

- the first command is the default (usually ``serve``);
- ``migrate`` (when the service has a database) upgrades the schema and exits; a command
  with ``migrate_option`` takes ``--migrate`` to upgrade first (handy for local runs);
- a command's return value is the exit status (None: 0).

:meth:`ServiceCli.grpc_service` is the common case: ``serve`` (the gRPC server until
SIGTERM/SIGINT) and ``migrate``, each importing only what it needs.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

__all__ = ["Command", "ServiceCli"]

S = TypeVar("S")


class _DatabaseSettings(Protocol):
    @property
    def database_url(self) -> str: ...


D = TypeVar("D", bound=_DatabaseSettings)

log = logging.getLogger("crm_common.cli")


@dataclass(frozen=True)
class Command(Generic[S]):
    """One sub-command: ``run(settings, args)`` returns the exit status (None: 0)."""

    help: str
    run: Callable[[S, argparse.Namespace], int | None]
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    """Adds the command's own options."""
    migrate_option: bool = False
    """Takes ``--migrate``: upgrade the database schema before running."""
    log_name: str | None = None
    """The ``service`` field of its log lines (default: the service's name)."""


@dataclass(frozen=True)
class ServiceCli(Generic[S]):
    """``python -m crm_<service>``: ``commands`` (the first is the default), settings
    from ``settings()``; ``migrate(settings)`` (None: no database) adds ``migrate``."""

    service: str
    doc: str
    settings: Callable[[], S]
    commands: Mapping[str, Command[S]]
    migrate: Callable[[S], None] | None = None
    migrate_help: str = "upgrade the database schema to the newest revision"

    @staticmethod
    def grpc_service(
        service: str, doc: str, settings: Callable[[], D], build_app: str, upgrade: str
    ) -> ServiceCli[D]:
        """``serve`` runs ``build_app(settings).run_until_signal()`` and ``migrate`` runs
        ``upgrade(settings.database_url)``; both given as ``"module:function"``, imported
        when the command runs."""

        async def run(settings: D) -> None:
            # built inside the running loop: grpc.aio channels bind to the loop they are
            # created in (an app built before asyncio.run() fails its client calls)
            await _load(build_app)(settings).run_until_signal()

        def serve(settings: D, _: argparse.Namespace) -> None:
            asyncio.run(run(settings))

        def migrate(settings: D) -> None:
            _load(upgrade)(settings.database_url)

        command = Command[D]("run the gRPC server (default)", serve, migrate_option=True)
        return ServiceCli[D](service, doc, settings, {"serve": command}, migrate=migrate)

    def names(self) -> list[str]:
        """The sub-commands, default first (``migrate`` last when there is one)."""
        extra = ["migrate"] if self.migrate is not None and "migrate" not in self.commands else []
        return [*self.commands, *extra]

    def parser(self) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(
            prog=f"crm-{self.service}", description=self.doc.strip().splitlines()[0]
        )
        sub = parser.add_subparsers(dest="command")
        for name, command in self.commands.items():
            one = sub.add_parser(name, help=command.help)
            if command.migrate_option:
                one.add_argument(
                    "--migrate", action="store_true", help="upgrade the database schema first"
                )
            if command.arguments is not None:
                command.arguments(one)
        if self.migrate is not None and "migrate" not in self.commands:
            sub.add_parser("migrate", help=self.migrate_help)
        return parser

    def main(self, argv: Sequence[str] | None = None) -> int:
        from crm_common.logs import configure_logging

        args = self.parser().parse_args(argv)
        name = args.command or next(iter(self.commands))
        settings = self.settings()
        command = self.commands.get(name)
        log_name = (command.log_name if command else None) or self.service
        configure_logging(log_name, getattr(settings, "log_level", "INFO"))
        if command is None or getattr(args, "migrate", False):  # "migrate", or --migrate
            assert self.migrate is not None
            log.info("migrating the database schema to head")
            self.migrate(settings)
            log.info("database schema is up to date")
            if command is None:
                return 0
        return command.run(settings, args) or 0


def _load(target: str) -> Any:
    """The object named ``"module:attribute"``."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)
