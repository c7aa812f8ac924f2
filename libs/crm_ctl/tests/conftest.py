"""Fixtures of the crm_ctl tests: the ConfigAdmin server in-process on port 0 over the
shared throwaway etcd (a prefix of its own per test)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from crm.config.v1 import config_pb2_grpc
from crm_ctl.app import App, build_app
from crm_ctl.settings import ConfigAdminSettings


@pytest.fixture
async def admin_app(etcd_endpoint: str, config_prefix: str) -> AsyncIterator[App]:
    settings = ConfigAdminSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        etcd_endpoints=etcd_endpoint,
        config_prefix=config_prefix,
        readiness_interval_s=0.2,
        shutdown_grace_s=1.0,
        history_limit=5,
    )
    async with build_app(settings) as app:
        await app.wait_ready(20)
        yield app


@pytest.fixture
async def stub(admin_app: App) -> AsyncIterator[config_pb2_grpc.ConfigAdminServiceStub]:
    async with grpc.aio.insecure_channel(admin_app.target) as channel:
        yield config_pb2_grpc.ConfigAdminServiceStub(channel)
