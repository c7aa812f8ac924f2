"""The agent console in headless Chromium against the real local platform.

The platform runs as processes (recommendation, assignment, the grpc-web gateway serving
the console built from the current sources) on the real stack (MariaDB, etcd); the
browser is Debian's chromium driven by playwright-core (node scenarios beside this file).
What the browser shows is checked in the scenario; what the platform recorded is checked
here, over gRPC. Screenshots go to tests/web/artifacts/ (git-ignored).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from crm.assignment.v1 import assignment_pb2 as pb
from crm.assignment.v1 import assignment_pb2_grpc as pb_grpc
from crm.common.v1 import common_pb2
from crm_common.config_watch import put_json
from crm_devstack import Stack
from web_platform import Platform, Scenario, browser_missing, build_console, platform

pytestmark = [
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="module"),
]

SALE, AFTER_SALE = common_pb2.BUSINESS_LINE_SALE, common_pb2.BUSINESS_LINE_AFTER_SALE
# Long accept windows: the browser, not a timer, decides what happens to an offer.
LINE_CONFIGS = {
    "SALE": {"accept_timeout_s": 120, "default_priority": 5},
    "AFTER_SALE": {"accept_timeout_s": 120},
}
FINANCE = common_pb2.BUSINESS_LINE_FINANCE


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def web(stack: Stack) -> AsyncIterator[Platform]:
    missing = browser_missing()  # make setup installs both; a missing one is a failure
    assert missing is None, missing
    await asyncio.to_thread(build_console)
    async with platform(stack, LINE_CONFIGS) as p:
        yield p


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stub(web: Platform) -> AsyncIterator[pb_grpc.AssignmentServiceAsyncStub]:
    async with grpc.aio.insecure_channel(web.assignment.target) as ch:
        yield pb_grpc.AssignmentServiceStub(ch)  # type: ignore[no-untyped-call]


async def add_agent(
    stub: pb_grpc.AssignmentServiceAsyncStub, agent_id: int, line: int, capacity: int = 1
) -> None:
    await stub.UpsertAgent(
        pb.UpsertAgentRequest(
            agent=pb.Agent(
                id=agent_id, name=f"Agent {agent_id}", business_line=line, capacity=capacity
            )
        )
    )


async def clue(
    stub: pb_grpc.AssignmentServiceAsyncStub, key: str, line: int, city: str = "beijing"
) -> pb.Task:
    resp = await stub.CreateClue(
        pb.CreateClueRequest(
            idempotency_key=key,
            phone=f"139{abs(hash(key)) % 10**8:08d}",
            business_line=line,
            source="web",
            city=city,
            intent_car_ids=[3, 7],
            brands=["Toyota"],
            budget_min_yuan=50_000,
            budget_max_yuan=300_000,
        )
    )
    return resp.task


async def test_agent_accepts_an_offer_records_the_call_and_completes_it(
    web: Platform, stub: pb_grpc.AssignmentServiceAsyncStub
) -> None:
    await add_agent(stub, 301, SALE)
    async with Scenario("scenario_console.mjs", {"CONSOLE_URL": web.url, "AGENT_ID": "301"}) as sc:
        await sc.event("ready", 90)  # signed in, IDLE, offer stream live
        agent = (await stub.GetAgent(pb.GetAgentRequest(id=301))).agent
        assert agent.presence == pb.PRESENCE_IDLE  # the presence switch reached the service
        task = await clue(stub, "web-console-1", SALE)
        await sc.send(str(task.id))
        countdown = await sc.event("countdown")
        assert countdown["later"] < countdown["first"]
        detail = await sc.event("detail")
        assert detail["cars"] > 0  # recommended cars from the recommendation service
        await sc.event("call")
        await sc.event("completed")
        await sc.event("signed-out")
        assert await sc.finish() == 0
    agent = (await stub.GetAgent(pb.GetAgentRequest(id=301))).agent
    assert agent.presence == pb.PRESENCE_OFFLINE  # signing out went offline
    got = await stub.GetTask(pb.GetTaskRequest(id=task.id))
    assert got.task.status == pb.STATUS_COMPLETED
    assert got.task.agent_id == 301
    kinds = [e.kind for e in got.history]
    assert kinds[-2:] == ["ACCEPTED", "COMPLETED"], kinds
    assert any(e.reason == "test drive booked" for e in got.history)
    [call] = got.calls  # recorded on the page
    assert (call.agent_id, call.duration_seconds) == (301, 95)
    assert call.outcome == pb.CALL_OUTCOME_CONNECTED
    assert call.note == "asked about financing"
    # the console's start of a call just after accepting: not "now - 95 s" (before the
    # agent had the task, refused by the service) but the offer's time (in milliseconds)
    [offered] = [e for e in got.history if e.kind == "OFFERED" and e.agent_id == 301]
    offered_ms = offered.at.ToDatetime().replace(microsecond=offered.at.nanos // 10**6 * 1000)
    assert call.started_at.ToDatetime() >= offered_ms
    # the console showed what the service holds
    assert detail["phone"] == got.customer.phone.masked
    shots = {e["name"] for e in sc.events if e["event"] == "screenshot"}
    assert {"console-offer", "console-task-detail", "console-task-list"} <= shots


async def test_task_list_filters_and_pages(
    web: Platform, stub: pb_grpc.AssignmentServiceAsyncStub
) -> None:
    await add_agent(stub, 302, AFTER_SALE, capacity=12)
    async with Scenario("scenario_tasks.mjs", {"CONSOLE_URL": web.url, "AGENT_ID": "302"}) as sc:
        await sc.event("ready", 90)
        cities = ["shanghai" if i % 4 == 0 else "beijing" for i in range(12)]
        for i, city in enumerate(cities):
            await clue(stub, f"web-list-{i}", AFTER_SALE, city)
        # all 12 offered to (held by) the agent before the browser looks
        deadline = time.monotonic() + 60
        while True:
            held = await stub.ListTasks(
                pb.ListTasksRequest(
                    agent_id=302, statuses=[pb.STATUS_ASSIGNED], page={"page_size": 50}
                )
            )
            if len(held.tasks) == 12 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert len(held.tasks) == 12
        newest_first = [str(t.id) for t in held.tasks]  # the service's list order
        await sc.send(json.dumps({"shanghai": cities.count("shanghai"), "ids": newest_first}))
        pages = await sc.event("paged")
        assert pages["first"] == 10
        assert pages["second"] == 2
        assert pages["back"] == 10
        ids = {t.id for t in held.tasks}
        assert {int(x) for x in pages["ids"]} == ids  # both pages together: every task once
        filtered = await sc.event("filtered")
        assert filtered["shanghai"] == cities.count("shanghai")
        # a task of another line, never offered to agent 302: the service hides it
        foreign = await clue(stub, "web-list-foreign", SALE)
        await sc.send(str(foreign.id))
        await sc.event("scoped")
        assert await sc.finish() == 0


async def test_offer_runs_out_then_one_is_rejected_on_a_break(
    web: Platform, stub: pb_grpc.AssignmentServiceAsyncStub
) -> None:
    # FINANCE: short accept window, applied live (the service watches etcd)
    await put_json(
        web.stack.etcd_endpoint, f"{web.prefix}/assignment/FINANCE", {"accept_timeout_s": 4}
    )
    await add_agent(stub, 303, FINANCE, capacity=2)  # the lost task comes back beside the new
    async with Scenario("scenario_offers.mjs", {"CONSOLE_URL": web.url, "AGENT_ID": "303"}) as sc:
        await sc.event("ready", 90)
        first = await clue(stub, "web-offers-1", FINANCE)
        await sc.send(str(first.id))
        expired = await sc.event("expired", 60)
        assert expired["acceptDisabled"]
        assert "Deadline passed" in expired["text"]
        second = await clue(stub, "web-offers-2", FINANCE)
        await sc.send(str(second.id))
        await sc.event("rejected")
        assert await sc.finish() == 0
    lost = await stub.GetTask(pb.GetTaskRequest(id=first.id))
    assert "TIMED_OUT" in [e.kind for e in lost.history]
    rejected = await stub.GetTask(pb.GetTaskRequest(id=second.id))
    assert [(e.kind, e.agent_id) for e in rejected.history if e.kind == "REJECTED"] == [
        ("REJECTED", 303)
    ]
    agent = (await stub.GetAgent(pb.GetAgentRequest(id=303))).agent
    assert agent.presence == pb.PRESENCE_BREAK
