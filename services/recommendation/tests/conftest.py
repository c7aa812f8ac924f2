"""Fixtures of the recommendation tests: a migrated database and the service on port 0."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from crm_devstack.stack import Stack, create_database, drop_database
from crm_recommendation.store.migrate import upgrade
from recommendation_testlib import Service, settings_for


@pytest.fixture
def migrated_db(mysql_database: str) -> str:
    """URL of a fresh database with the schema at head."""
    upgrade(mysql_database)
    return mysql_database


@pytest.fixture
def service(migrated_db: str, etcd_endpoint: str, config_prefix: str) -> Iterator[Service]:
    """The service in-process on port 0 (fresh database, own etcd prefix)."""
    svc = Service(settings_for(migrated_db, etcd_endpoint, config_prefix))
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
        svc = Service(settings_for(url, stack.etcd_endpoint, prefix))
        try:
            yield svc
        finally:
            svc.close()
    finally:
        drop_database(name)
