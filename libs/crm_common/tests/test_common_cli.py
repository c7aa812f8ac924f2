"""crm_common.cli: the command line every service's ``__main__`` builds."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from crm_common.cli import Command, ServiceCli


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """main() configures the root logger: put it back as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


@dataclass
class Settings:
    database_url: str = "mysql+pymysql://x/y"
    log_level: str = "INFO"


def make(calls: list[str]) -> ServiceCli[Settings]:
    def serve(settings: Settings, _: argparse.Namespace) -> None:
        calls.append("serve")
        logging.getLogger("t").info("serving")

    def count(settings: Settings, args: argparse.Namespace) -> int:
        calls.append(f"count {args.n}")
        return 3

    return ServiceCli(
        "thing",
        "python -m thing: the thing.\n\nMore.",
        Settings,
        {
            "serve": Command("serve (default)", serve, migrate_option=True),
            "count": Command(
                "count",
                count,
                lambda p: p.add_argument("--n", type=int, default=1),
                log_name="thing-count",
            ),
        },
        migrate=lambda s: calls.append(f"migrate {s.database_url}"),
    )


def test_the_first_command_is_the_default() -> None:
    calls: list[str] = []
    assert make(calls).main([]) == 0
    assert calls == ["serve"]


def test_migrate_alone_and_before_serving() -> None:
    calls: list[str] = []
    assert make(calls).main(["migrate"]) == 0
    assert calls == ["migrate mysql+pymysql://x/y"]
    calls.clear()
    assert make(calls).main(["serve", "--migrate"]) == 0
    assert calls == ["migrate mysql+pymysql://x/y", "serve"]


def test_own_arguments_exit_status_and_log_name(capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[str] = []
    assert make(calls).main(["count", "--n", "7"]) == 3
    assert calls == ["count 7"]
    with pytest.raises(SystemExit):  # --migrate belongs to serve only
        make(calls).main(["count", "--migrate"])
    assert "unrecognized arguments" in capsys.readouterr().err


def test_logs_are_json_with_the_command_log_name(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", out)
    calls: list[str] = []
    make(calls).main(["serve"])
    line = json.loads(out.getvalue().splitlines()[-1])
    assert (line["service"], line["msg"]) == ("thing", "serving")


def test_grpc_service_builds_serve_and_migrate() -> None:
    cli = ServiceCli.grpc_service(
        "x", "x: doc", Settings, build_app="json:dumps", upgrade="json:loads"
    )
    assert list(cli.commands) == ["serve"]
    assert cli.parser().parse_args(["migrate"]).command == "migrate"
    assert cli.parser().parse_args(["serve", "--migrate"]).migrate


class _App:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()  # RuntimeError when built outside a loop

    async def run_until_signal(self) -> None:
        assert asyncio.get_running_loop() is self.loop
        BUILT.append(self.loop)


BUILT: list[asyncio.AbstractEventLoop] = []


def build_app(settings: Settings) -> _App:
    return _App()


def test_grpc_service_builds_the_app_inside_the_loop_it_runs_in() -> None:
    # grpc.aio channels bind to the loop they are made in: an app built before
    # asyncio.run() failed every client call ("attached to a different loop")
    cli = ServiceCli.grpc_service(
        "x", "x: doc", Settings, build_app=f"{__name__}:build_app", upgrade="json:loads"
    )
    assert cli.main(["serve"]) == 0
    assert len(BUILT) == 1
