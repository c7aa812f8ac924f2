"""Engine construction and transaction helpers (MySQL/MariaDB through PyMySQL).

Every transaction runs at READ COMMITTED: InnoDB then takes no gap locks, so the pump's
``FOR UPDATE SKIP LOCKED`` scans, the workers' single-row updates and Schedule's inserts
do not block each other on ranges. Deadlocks and lock wait timeouts are retried a few
times; a database that cannot be reached surfaces as UNAVAILABLE.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from crm_common.errors import Aborted, Unavailable
from sqlalchemy import Engine, create_engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

__all__ = ["ER_DUP_ENTRY", "TransactionRunner", "make_engine", "mysql_errno"]

log = logging.getLogger("crm.scheduler.store")

R = TypeVar("R")

LOCK_WAIT_TIMEOUT_S = 5
ER_LOCK_WAIT_TIMEOUT = 1205
ER_LOCK_DEADLOCK = 1213
ER_DUP_ENTRY = 1062
_RETRYABLE = frozenset({ER_LOCK_WAIT_TIMEOUT, ER_LOCK_DEADLOCK})
_UNREACHABLE = frozenset({2003, 2006, 2013, 2055})


def make_engine(url: str, pool_size: int) -> Engine:
    """An engine with a bounded pool (no overflow: the executor is sized like the pool)."""
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,
        pool_pre_ping=True,
        pool_recycle=1800,
        pool_timeout=30,
        isolation_level="READ COMMITTED",
        connect_args={
            "connect_timeout": 5,
            "charset": "utf8mb4",
            "init_command": f"SET SESSION innodb_lock_wait_timeout = {LOCK_WAIT_TIMEOUT_S}",
        },
    )


def mysql_errno(exc: DBAPIError) -> int | None:
    """The MySQL error number behind a SQLAlchemy DBAPI error, if any."""
    args = getattr(exc.orig, "args", ())
    if args and isinstance(args[0], int):
        return args[0]
    return None


class TransactionRunner:
    """Runs a function in one ORM transaction, retrying deadlocks and lock wait timeouts."""

    def __init__(self, engine: Engine, attempts: int = 4) -> None:
        self.engine = engine
        self._attempts = attempts

    def run(self, fn: Callable[[Session], R]) -> R:
        for attempt in range(1, self._attempts + 1):
            try:
                with Session(self.engine, expire_on_commit=False) as session, session.begin():
                    return fn(session)
            except OperationalError as exc:
                errno = mysql_errno(exc)
                if errno in _RETRYABLE:
                    if attempt < self._attempts:
                        log.info("transaction retried after MySQL error %s", errno)
                        time.sleep(random.uniform(0.005, 0.05) * attempt)
                        continue
                    raise Aborted(
                        "the change conflicted with concurrent changes; retry", reason="CONFLICT"
                    ) from exc
                if errno in _UNREACHABLE or errno is None:
                    raise Unavailable(
                        "the database is unavailable", reason="DB_UNAVAILABLE"
                    ) from exc
                raise
        raise AssertionError("unreachable")  # pragma: no cover
