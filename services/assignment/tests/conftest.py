"""Fixtures of the assignment tests: a migrated database and the service on port 0; the
dev schema registry (bilog's test helper) for the tests that read BI topics."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from assignment_testlib import ManualClock, Service, settings_for
from bilog_testlib import RegistryThread, scratch_registry
from crm_assignment.store import AssignmentStore, make_engine
from crm_assignment.store.migrate import upgrade
from crm_devstack.stack import Stack, create_database, drop_database
from sqlalchemy import Engine


@pytest.fixture
def migrated_db(mysql_database: str) -> str:
    """URL of a fresh database with the schema at head."""
    upgrade(mysql_database)
    return mysql_database


@pytest.fixture
def engine(migrated_db: str) -> Iterator[Engine]:
    engine = make_engine(migrated_db, pool_size=30)
    yield engine
    engine.dispose()


@pytest.fixture
def store(engine: Engine) -> AssignmentStore:
    return AssignmentStore(engine)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def service(
    migrated_db: str, etcd_endpoint: str, config_prefix: str, clock: ManualClock
) -> Iterator[Service]:
    """The service in-process on port 0 (fresh database, own etcd prefix, manual clock)."""
    svc = Service(settings_for(migrated_db, etcd_endpoint, config_prefix), clock)
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def shared_service(stack: Stack) -> Iterator[Service]:
    """One service (and database) for a whole module: for tests that only need answers
    to requests, not a clean state (validation, fuzzing)."""
    name = f"crm_t_{uuid.uuid4().hex[:12]}"
    url = create_database(name)
    try:
        upgrade(url)
        prefix = f"/crm-test/{uuid.uuid4().hex[:12]}/config"
        svc = Service(settings_for(url, stack.etcd_endpoint, prefix), ManualClock())
        try:
            yield svc
        finally:
            svc.close()
    finally:
        drop_database(name)


@pytest.fixture
def strict(migrated_db: str, etcd_endpoint: str, config_prefix: str) -> Iterator[Service]:
    """The service with ``require_line_config``: a line is open only while configured."""
    svc = Service(
        settings_for(migrated_db, etcd_endpoint, config_prefix, require_line_config=True),
        ManualClock(),
    )
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def registry(stack: Stack) -> Iterator[RegistryThread]:
    """bilog's dev schema registry on a database of its own, for a whole module."""
    with scratch_registry() as reg:
        yield reg
