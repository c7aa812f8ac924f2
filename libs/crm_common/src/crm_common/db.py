"""MySQL/MariaDB plumbing shared by every service's store (through PyMySQL).

``make_engine`` builds a bounded pool (no overflow: each service sizes its
BlockingExecutor like the pool). Every transaction runs at READ COMMITTED: consistent
reads see the latest committed rows (needed after waiting for a row lock) and InnoDB
takes no gap locks, so concurrent writers do not block on ranges. ``TransactionRunner``
retries deadlocks and lock wait timeouts a few times (then ABORTED); a database that
cannot be reached surfaces as UNAVAILABLE.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Connection, Dialect, Engine, TypeDecorator, create_engine, text
from sqlalchemy.dialects import mysql
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from crm_common.errors import Aborted, Unavailable

__all__ = [
    "ER_DUP_ENTRY",
    "ER_LOCK_DEADLOCK",
    "ER_LOCK_WAIT_TIMEOUT",
    "LOCK_WAIT_TIMEOUT_S",
    "NAMING_CONVENTION",
    "TABLE_ARGS",
    "RawSQL",
    "TransactionRunner",
    "UtcDateTime",
    "from_json_time",
    "make_engine",
    "mysql_errno",
    "placeholders",
    "to_db_time",
]

log = logging.getLogger("crm.store")

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
"""Constraint and index names of every service's MetaData (stable migration diffs)."""

TABLE_ARGS: dict[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
}
"""``__table_args__`` of every table: InnoDB, utf8mb4, binary collation."""


class UtcDateTime(TypeDecorator[datetime]):
    """``DATETIME(6)`` with naive UTC in the database and aware UTC in Python."""

    impl = mysql.DATETIME(fsp=6)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def to_db_time(value: datetime) -> datetime:
    """An aware datetime as the naive UTC one the database keeps (``UtcDateTime``'s bind
    conversion, for :class:`RawSQL` parameters)."""
    if value.tzinfo is None:
        raise ValueError("naive datetime given to a UTC column")
    return value.astimezone(UTC).replace(tzinfo=None)


def from_json_time(value: str) -> datetime:
    """A ``DATETIME`` as :meth:`RawSQL.json_rows` gives it (naive UTC text) as an aware
    datetime."""
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


R = TypeVar("R")

LOCK_WAIT_TIMEOUT_S = 5
"""innodb_lock_wait_timeout of our sessions: a blocked row lock fails fast and is retried."""

ER_LOCK_WAIT_TIMEOUT = 1205
ER_LOCK_DEADLOCK = 1213
ER_DUP_ENTRY = 1062
_RETRYABLE = frozenset({ER_LOCK_WAIT_TIMEOUT, ER_LOCK_DEADLOCK})
# Client-side errors of PyMySQL/MariaDB meaning "no server": can't connect, gone away, lost.
_UNREACHABLE = frozenset({2003, 2006, 2013, 2055})


def make_engine(
    url: str,
    pool_size: int,
    lock_wait_timeout_s: int | None = LOCK_WAIT_TIMEOUT_S,
    *,
    lean: bool = False,
) -> Engine:
    """An engine with a bounded pool (no overflow: the executor is sized like the pool).

    ``lock_wait_timeout_s`` sets the sessions' innodb_lock_wait_timeout (a blocked row lock
    fails fast and is retried by TransactionRunner); None keeps the server default.

    ``lean`` drops two round trips per transaction: the pre-ping at checkout and the
    ROLLBACK the pool sends when a connection is returned. Only for callers whose every
    use ends its transaction itself (TransactionRunner, ``ping``). A connection the server
    dropped is then noticed when used: SQLAlchemy invalidates the whole pool on that
    error, so after a database restart one transaction fails (UNAVAILABLE, retryable)
    instead of none.
    """
    connect_args: dict[str, object] = {"connect_timeout": 5, "charset": "utf8mb4"}
    if lock_wait_timeout_s is not None:
        connect_args["init_command"] = (
            f"SET SESSION innodb_lock_wait_timeout = {int(lock_wait_timeout_s)}"
        )
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,
        pool_pre_ping=not lean,
        pool_reset_on_return=None if lean else "rollback",
        pool_recycle=1800,
        pool_timeout=30,
        isolation_level="READ COMMITTED",
        connect_args=connect_args,
    )


def mysql_errno(exc: DBAPIError) -> int | None:
    """The MySQL error number behind a SQLAlchemy DBAPI error, if any."""
    args = getattr(exc.orig, "args", ())
    if args and isinstance(args[0], int):
        return args[0]
    return None


class TransactionRunner:
    """Runs a function in one transaction, retrying deadlocks and lock wait timeouts."""

    def __init__(self, engine: Engine, attempts: int = 4) -> None:
        self.engine = engine
        self._attempts = attempts

    def run(self, fn: Callable[[Session], R]) -> R:
        """``fn(session)`` in one ORM transaction (committed when it returns)."""

        def attempt() -> R:
            with Session(self.engine, expire_on_commit=False) as session, session.begin():
                return fn(session)

        return self._retrying(attempt)

    def run_core(self, fn: Callable[[Connection], R]) -> R:
        """``fn(connection)`` in one Core transaction (no ORM unit of work: hot paths)."""

        def attempt() -> R:
            with self.engine.begin() as conn:
                return fn(conn)

        return self._retrying(attempt)

    def _retrying(self, attempt: Callable[[], R]) -> R:
        for n in range(1, self._attempts + 1):
            try:
                return attempt()
            except OperationalError as exc:
                errno = mysql_errno(exc)
                if errno in _RETRYABLE:
                    if n < self._attempts:
                        log.info("transaction retried after MySQL error %s", errno)
                        time.sleep(random.uniform(0.005, 0.05) * n)
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

    def ping(self) -> None:
        """``SELECT 1`` (readiness)."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))


def placeholders(rows: int, columns: int) -> str:
    """``(%s, ...), (%s, ...)``: the VALUES list of a multi-row INSERT (or an IN list
    with ``columns=1`` and ``rows`` values, without the outer parentheses)."""
    row = "(" + ", ".join(["%s"] * columns) + ")"
    return ", ".join([row] * rows)


class RawSQL:
    """Plain DB-API statements in the transaction of a Core ``Connection`` (the one
    ``TransactionRunner.run_core`` gives): for hot paths where SQLAlchemy's work per
    statement (building, cache lookups, compiled parameter and result processing) costs
    more than the statement itself.

    SQL is written for the driver (PyMySQL ``%s`` placeholders) and parameters and rows
    are plain driver values: naive UTC datetimes (:func:`to_db_time`), enum names, JSON
    text. Driver errors are raised as SQLAlchemy's (``sqlalchemy.exc.OperationalError``
    carrying the MySQL errno, ``IntegrityError``, ...) and a connection the server dropped
    is invalidated, exactly as for Core statements: ``TransactionRunner`` retries and maps
    them the same way. The engine's ``before_cursor_execute`` / ``after_cursor_execute``
    listeners see every statement as they do Core's (their ``context`` is None).
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._dbapi = conn.connection.dbapi_connection
        self._cursor: Any = self._dbapi.cursor() if self._dbapi is not None else None
        self._error: type[Exception] = conn.dialect.loaded_dbapi.Error

    def rows(self, sql: str, params: Sequence[Any] = ()) -> Sequence[tuple[Any, ...]]:
        """Run a statement returning rows; all its rows, as tuples."""
        self._execute(sql, params)
        return self._cursor.fetchall()  # type: ignore[no-any-return]

    def json_rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Run a statement whose rows are one JSON value each (``SELECT JSON_ARRAY(a, b,
        ...)``, ``RETURNING JSON_ARRAY(...)``); the values, decoded.

        One column instead of many: PyMySQL (pure Python) then parses one column
        descriptor and one value per row instead of one of each per column, several times
        cheaper for wide rows. In JSON, datetimes are text (:func:`from_json_time`), and a
        JSON column must be selected as ``JSON_QUERY(col, '$')`` to stay JSON.
        """
        return [json.loads(r[0]) for r in self.rows(sql, params)]

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run a statement; the number of rows it changed."""
        return self._execute(sql, params)

    def _execute(self, sql: str, params: Sequence[Any]) -> int:
        conn = self._conn
        for before in conn.dispatch.before_cursor_execute:
            sql, params = before(conn, self._cursor, sql, params, None, False)
        try:
            count = int(self._cursor.execute(self._render(sql, params)))
        except self._error as exc:
            raise self._translated(exc, sql, params) from exc
        conn.dispatch.after_cursor_execute(conn, self._cursor, sql, params, None, False)
        return count

    def _render(self, sql: str, params: Sequence[Any]) -> str:
        """``sql`` with its ``%s`` replaced by the parameters as SQL literals: what the
        driver's ``cursor.execute(sql, params)`` sends, with the common types (int,
        None, naive datetime) written here instead of through its escaping functions;
        strings and every other type still go through the driver's ``escape``."""
        escape = self._dbapi.escape  # type: ignore[union-attr]
        literals: list[str] = []
        for value in params:
            kind = type(value)
            if kind is int:
                literals.append(str(value))
            elif value is None:
                literals.append("NULL")
            elif kind is datetime and value.tzinfo is None:
                literals.append(f"'{value.isoformat(' ')}'")
            else:
                literals.append(escape(value))
        return sql % tuple(literals)

    def _translated(self, exc: Exception, sql: str, params: Sequence[Any]) -> Exception:
        dialect = self._conn.dialect
        dropped = dialect.is_disconnect(exc, self._dbapi, self._cursor)  # type: ignore[arg-type]
        if dropped:
            self._conn.invalidate(exc)
        return DBAPIError.instance(
            sql, params, exc, self._error, connection_invalidated=dropped, dialect=dialect
        )
