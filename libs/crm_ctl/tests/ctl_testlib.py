"""Test helpers: a service app served from a thread of its own, the CLI run in-process."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from crm_common.app import ServiceApp
from crm_ctl.cli import main
from crm_devstack.apps import AppThread

T = TypeVar("T")


class ThreadedApp(AppThread[ServiceApp]):
    """A ServiceApp started on its own event loop in a background thread, so that sync
    tests (and the CLI, which runs its own event loop) can call it over real sockets."""

    def __init__(self, build: Callable[[], ServiceApp]) -> None:
        super().__init__(build, stop_grace=1)


@dataclass
class Run:
    """One crmctl run: exit code, stdout, stderr."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def crmctl(*argv: str, stdin: str | None = None) -> Run:
    """Run crmctl in-process (``-`` files read ``stdin``)."""
    out, err = io.StringIO(), io.StringIO()
    if stdin is None:
        code = main(list(argv), stdout=out, stderr=err)
    else:
        import sys

        saved = sys.stdin
        sys.stdin = io.StringIO(stdin)
        try:
            code = main(list(argv), stdout=out, stderr=err)
        finally:
            sys.stdin = saved
    return Run(code, out.getvalue(), err.getvalue())


def table_rows(text: str) -> list[list[str]]:
    """The rows of a crmctl table (header excluded), split on runs of 2+ spaces."""
    import re

    lines = [ln for ln in text.splitlines() if ln.strip()]
    return [re.split(r"\s{2,}", ln.strip()) for ln in lines[1:]]


def args(etcd: str, prefix: str, user: str = "alice") -> Sequence[str]:
    return ("--etcd", etcd, "--config-prefix", prefix, "--user", user)
