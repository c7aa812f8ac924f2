"""RawSQL against a real MariaDB: rows, JSON rows, errors as SQLAlchemy's (so
TransactionRunner retries and maps them), engine listeners still see the statements."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from crm_common.db import (
    RawSQL,
    TransactionRunner,
    from_json_time,
    make_engine,
    mysql_errno,
    placeholders,
    to_db_time,
)
from crm_common.errors import Aborted
from sqlalchemy import Engine, event, text
from sqlalchemy.exc import IntegrityError, OperationalError


@pytest.fixture
def engine(mysql_database: str) -> Iterator[Engine]:
    engine = make_engine(mysql_database, 4, lock_wait_timeout_s=1, lean=True)
    with engine.begin() as c:
        c.execute(
            text(
                "CREATE TABLE item (id BIGINT PRIMARY KEY AUTO_INCREMENT, "
                "name VARCHAR(20) NOT NULL UNIQUE, at DATETIME(6) NOT NULL, tags JSON)"
            )
        )
    yield engine
    engine.dispose()


def test_placeholders() -> None:
    assert placeholders(2, 3) == "(%s, %s, %s), (%s, %s, %s)"
    assert placeholders(3, 1) == "(%s), (%s), (%s)"


def test_times_round_trip_as_naive_utc() -> None:
    at = datetime(2025, 11, 23, 9, 30, 1, 250, tzinfo=timezone(timedelta(hours=8)))
    assert to_db_time(at) == datetime(2025, 11, 23, 1, 30, 1, 250)
    assert from_json_time("2025-11-23 01:30:01.000250") == at.astimezone(UTC)
    assert from_json_time("2025-11-23 01:30:01") == datetime(2025, 11, 23, 1, 30, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="naive"):
        to_db_time(datetime(2025, 1, 1))  # naive: refused


def test_rows_execute_and_json_rows(engine: Engine) -> None:
    at = datetime(2025, 11, 23, 9, 0, 0, 123456, tzinfo=UTC)
    with engine.begin() as c:
        raw = RawSQL(c)
        added = raw.execute(
            f"INSERT INTO item (name, at, tags) VALUES {placeholders(2, 3)}",
            ["a", to_db_time(at), '["x", "y"]', "b'\"\\", to_db_time(at), None],
        )
        assert added == 2
        ids = raw.rows("INSERT INTO item (name, at) VALUES (%s, %s) RETURNING id", ["c", at])
        assert len(ids) == 1
        assert isinstance(ids[0][0], int)
    with engine.begin() as c:
        raw = RawSQL(c)
        assert [r[0] for r in raw.rows("SELECT name FROM item ORDER BY id")] == [
            "a",
            "b'\"\\",
            "c",
        ]
        rows = raw.json_rows(
            "SELECT JSON_ARRAY(id, name, at, JSON_QUERY(tags, '$')) FROM item ORDER BY id"
        )
    assert [r[1] for r in rows] == ["a", "b'\"\\", "c"]
    assert rows[0][3] == ["x", "y"]
    assert rows[1][3] is None
    assert from_json_time(rows[0][2]) == at


def test_parameters_are_written_as_the_driver_writes_them(engine: Engine) -> None:
    values: list[Any] = [
        0, -7, 2**62, True, False, None, 1.5, Decimal("2.50"), "x", "it's \\ \"q\"\n",
        "\u5317\u4eac", b"\x00\xffab", datetime(2025, 11, 23, 9, 0),
        datetime(2025, 11, 23, 9, 0, 0, 12), datetime(2025, 11, 23, 9, 0, tzinfo=UTC),
        date(2025, 11, 23),
    ]  # fmt: skip
    sql = "SELECT " + ", ".join(["%s"] * len(values))
    with engine.begin() as c:
        raw = RawSQL(c)
        cursor = c.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        assert raw._render(sql, values) == cursor.mogrify(sql, values)
        (row,) = raw.rows(sql, values)
    assert row[0] == 0
    assert row[9] == 'it\'s \\ "q"\n'
    assert row[11] == b"\x00\xffab"


def test_a_duplicate_key_is_sqlalchemys_integrity_error(engine: Engine) -> None:
    with engine.begin() as c:
        RawSQL(c).execute("INSERT INTO item (name, at) VALUES ('a', NOW(6))")
    with pytest.raises(IntegrityError) as caught, engine.begin() as c:
        RawSQL(c).execute("INSERT INTO item (name, at) VALUES ('a', NOW(6))")
    assert mysql_errno(caught.value) == 1062


def test_a_lock_wait_timeout_is_retried_then_aborted(engine: Engine) -> None:
    with engine.begin() as c:
        RawSQL(c).execute("INSERT INTO item (name, at) VALUES ('a', NOW(6))")
    runner = TransactionRunner(engine, attempts=2)
    attempts: list[int] = []

    def update(c: Any) -> int:
        attempts.append(1)
        return RawSQL(c).execute("UPDATE item SET name = 'b' WHERE name = 'a'")

    holder = engine.connect()
    holder.begin()
    holder.execute(text("SELECT id FROM item WHERE name = 'a' FOR UPDATE"))
    try:
        with pytest.raises(Aborted):
            runner.run_core(update)  # 1205 lock wait timeout: retried once, then ABORTED
    finally:
        holder.rollback()
        holder.close()
    assert len(attempts) == 2
    assert runner.run_core(update) == 1


def test_engine_listeners_see_raw_statements(engine: Engine) -> None:
    seen: list[str] = []
    lock = threading.Lock()

    def after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        with lock:
            seen.append(statement)

    event.listen(engine, "after_cursor_execute", after)
    try:
        with engine.begin() as c:
            RawSQL(c).execute("INSERT INTO item (name, at) VALUES ('z', NOW(6))")
    finally:
        event.remove(engine, "after_cursor_execute", after)
    assert seen == ["INSERT INTO item (name, at) VALUES ('z', NOW(6))"]


def test_a_statement_error_is_not_retried(engine: Engine) -> None:
    runner = TransactionRunner(engine)
    with pytest.raises(OperationalError) as caught:  # 1054 unknown column: not retryable
        runner.run_core(lambda c: RawSQL(c).rows("SELECT nope FROM item"))
    assert mysql_errno(caught.value) == 1054
