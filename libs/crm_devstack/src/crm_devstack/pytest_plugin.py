"""Pytest fixtures over the real local stack (loaded by the root conftest.py).

Real servers only: MariaDB, Redis, etcd and Tansu are started by ``crm_devstack.up()``
when they are not running. Every test that touches MySQL gets a database of its own
(dropped afterwards) and every etcd user gets a key prefix of its own.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from crm_devstack.stack import Stack, create_database, drop_database, up


@pytest.fixture(scope="session")
def stack() -> Stack:
    """The running local stack (started on first use, left running for reuse)."""
    return up()


@pytest.fixture
def mysql_database(stack: Stack) -> Iterator[str]:
    """SQLAlchemy URL of a fresh, empty MariaDB database, dropped after the test."""
    name = f"crm_t_{uuid.uuid4().hex[:12]}"
    url = create_database(name)
    yield url
    drop_database(name)


@pytest.fixture
def etcd_endpoint(stack: Stack) -> str:
    """host:port of the shared throwaway etcd."""
    return stack.etcd_endpoint


@pytest.fixture
def config_prefix() -> str:
    """A config key prefix no other test uses (services take it as a setting)."""
    return f"/crm-test/{uuid.uuid4().hex[:12]}/config"
