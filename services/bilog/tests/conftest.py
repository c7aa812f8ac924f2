"""Fixtures of the bilog tests: the dev registry (real MariaDB) and the service on port 0
against the shared Tansu broker (each test has topics of its own)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from bilog_testlib import RegistryThread, scratch_registry, settings_for
from crm_bilog.app import App, build_app
from crm_bilog.settings import BilogSettings
from crm_devstack.stack import Proc, Stack, start_tansu


@pytest.fixture
def tansu(tmp_path: Path) -> Iterator[Proc]:
    """A Tansu broker of the test's own, to pause (SIGSTOP) or kill without touching the
    shared one; resumed and killed afterwards."""
    proc = start_tansu(tmp_path / "tansu")
    try:
        yield proc
    finally:
        proc.resume()
        proc.kill()


@pytest.fixture(scope="module")
def registry(stack: Stack) -> Iterator[RegistryThread]:
    """The dev schema registry with a database of its own, for a whole module."""
    with scratch_registry() as reg:
        yield reg


@pytest.fixture
def settings(stack: Stack, registry: RegistryThread) -> BilogSettings:
    return settings_for(stack.kafka_bootstrap, registry.url)


@pytest.fixture
async def app(settings: BilogSettings) -> AsyncIterator[App]:
    """The service in-process on port 0, ready (Kafka answers, schemas registered)."""
    app = build_app(settings)
    await app.start()
    try:
        await app.wait_ready(30)
        yield app
    finally:
        await app.stop()
