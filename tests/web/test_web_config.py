"""Config review in headless Chromium against the real platform: the ConfigAdmin service
(``python -m crm_ctl serve-config-admin``) over etcd, the assignment service watching that
config live, and the grpc-web gateway serving the console.

"Which instances applied it" comes from the leased acknowledgements the config watcher
writes under the instance name: here the real assignment process of the test platform
(``CRM_ASSIGNMENT_INSTANCE_NAME``), which acknowledges a value once it applied it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
import pytest_asyncio
from crm.config.v1 import config_pb2 as cpb
from crm.config.v1 import config_pb2_grpc as cpb_grpc
from crm_devstack import Stack
from web_platform import (
    ASSIGNMENT_INSTANCE,
    Platform,
    Scenario,
    browser_missing,
    build_console,
    platform,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="module"),
]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def web(stack: Stack) -> AsyncIterator[Platform]:
    missing = browser_missing()  # make setup installs both; a missing one is a failure
    assert missing is None, missing
    await asyncio.to_thread(build_console)
    async with platform(stack, {"SALE": {"accept_timeout_s": 120}}, config_admin=True) as p:
        yield p


REPLICA = ASSIGNMENT_INSTANCE  # the platform's assignment process


async def acked(
    stub: cpb_grpc.ConfigAdminServiceStub, done: Callable[[cpb.InstanceAck], bool]
) -> cpb.InstanceAck:
    """The assignment process's acknowledgement of SALE once ``done`` holds for it (it
    acknowledges asynchronously, after applying); the last one seen after 30 s."""
    deadline = time.monotonic() + 30
    while True:
        rollout = await stub.Rollout(cpb.RolloutRequest(service="assignment", key="SALE"))
        ack = {i.instance: i for i in rollout.instances}.get(REPLICA)
        if ack is not None and (done(ack) or time.monotonic() > deadline):
            return ack
        assert time.monotonic() < deadline, f"{REPLICA} never acknowledged SALE"
        await asyncio.sleep(0.1)


async def test_config_change_appears_in_history_and_is_applied(web: Platform) -> None:
    env = {"CONSOLE_URL": web.url, "EXPECT_INSTANCE": REPLICA}
    async with Scenario("scenario_config.mjs", env) as sc:
        changed = await sc.event("changed", 90)
        applied = await sc.event("applied", 60)
        refused = await sc.event("refused")
        rolled = await sc.event("rolled-back")
        await check_rollback(web, rolled, changed, applied, refused)
        await sc.send("rollout")
        await sc.event("rollout", 60)
        assert await sc.finish() == 0
    assert web.config_admin is not None
    async with grpc.aio.insecure_channel(web.config_admin.target) as ch:
        stub = cpb_grpc.ConfigAdminServiceStub(ch)  # type: ignore[no-untyped-call]
        rollout = await stub.Rollout(cpb.RolloutRequest(service="assignment", key="SALE"))
        assert rollout.candidate.percent == 80
        assert json.loads(rollout.candidate.value_json)["accept_timeout_s"] == 30
        assert rollout.stable.revision == int(rolled["revision"])  # untouched
        # the assignment process (bucket below 80) applied the candidate
        ack = await acked(stub, lambda a: a.applied_revision == rollout.candidate.revision)
        assert ack.bucket < 80
        assert ack.applied_revision == rollout.candidate.revision
        assert ack.version == cpb.APPLIED_VERSION_ROLLOUT
        assert ack.rejected_revision == 0


async def check_rollback(
    web: Platform,
    rolled: dict[str, Any],
    changed: dict[str, Any],
    applied: dict[str, Any],
    refused: dict[str, Any],
) -> None:
    assert any("accept_timeout_s" in f for f in refused["fields"]), refused
    assert web.config_admin is not None
    async with grpc.aio.insecure_channel(web.config_admin.target) as ch:
        stub = cpb_grpc.ConfigAdminServiceStub(ch)  # type: ignore[no-untyped-call]
        hist = await stub.History(cpb.HistoryRequest(service="assignment", key="SALE"))
        newest = hist.versions[0]
        assert newest.revision == int(rolled["revision"])
        assert newest.author == "ops-web"
        assert json.loads(newest.value_json)["accept_timeout_s"] == 45  # the rollback
        by_rev = {v.revision: v for v in hist.versions}
        second = by_rev[int(changed["r2"])]
        assert second.author == "ops-web"
        assert {c.path for c in second.changes} == {"accept_timeout_s", "weights"}
        assert applied["instance"] == REPLICA  # the page showed the process's ack
        # the assignment process applies the rollback too
        ack = await acked(stub, lambda a: a.applied_revision == newest.revision)
        assert ack.applied_revision == newest.revision
        assert ack.version == cpb.APPLIED_VERSION_STABLE
        assert ack.rejected_revision == 0
