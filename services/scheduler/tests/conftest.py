"""Fixtures of the scheduler tests: a migrated database, a store, the API in-process,
a redis-server of the module's own, a recording target and scheduler processes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from crm_devstack.stack import Stack, create_database, drop_database
from crm_scheduler.store import SchedulerStore, make_engine
from crm_scheduler.store.migrate import upgrade
from scheduler_testlib import ApiService, Procs, RedisServer, TargetServer, api_settings


@pytest.fixture
def migrated_db(mysql_database: str) -> str:
    """URL of a fresh database with the schema at head."""
    upgrade(mysql_database)
    return mysql_database


@pytest.fixture(scope="module")
def module_db(stack: Stack) -> Iterator[str]:
    """A migrated database shared by a module (tests use distinct names and keys)."""
    name = f"crm_t_{uuid.uuid4().hex[:12]}"
    url = create_database(name)
    try:
        upgrade(url)
        yield url
    finally:
        drop_database(name)


@pytest.fixture
def store(migrated_db: str) -> Iterator[SchedulerStore]:
    engine = make_engine(migrated_db, pool_size=10)
    yield SchedulerStore(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def module_store(module_db: str) -> Iterator[SchedulerStore]:
    engine = make_engine(module_db, pool_size=10)
    yield SchedulerStore(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def api(module_db: str) -> Iterator[ApiService]:
    """The API in-process on port 0 over the module's database."""
    svc = ApiService(api_settings(module_db))
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of this module's own (flushed and restarted by tests)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def target() -> Iterator[TargetServer]:
    server = TargetServer().start()
    yield server
    server.stop()


@pytest.fixture
def procs(module_db: str, redis_server: RedisServer, tmp_path: Path) -> Iterator[Procs]:
    """Starts scheduler processes for one test; all are stopped (or killed) after it."""
    p = Procs(module_db, redis_server.url, tmp_path / "logs")
    yield p
    p.close()
