"""``crmctl tasks/agents/queue/jobs`` against the real assignment and scheduler services,
in-process on port 0 over fresh MariaDB databases: tables, JSON, and gRPC failures as one
readable line with an exit code."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from crm.assignment.v1 import assignment_pb2 as apb
from crm.assignment.v1 import assignment_pb2_grpc
from crm.common.v1 import common_pb2
from crm.scheduler.v1 import scheduler_pb2 as spb
from crm.scheduler.v1 import scheduler_pb2_grpc
from crm_assignment.app import build_app as build_assignment
from crm_assignment.settings import AssignmentSettings
from crm_assignment.store.migrate import upgrade as upgrade_assignment
from crm_devstack.stack import Stack, create_database, drop_database, refusing_port, wait_until
from crm_scheduler.app import build_app as build_scheduler
from crm_scheduler.settings import SchedulerSettings
from crm_scheduler.store.migrate import upgrade as upgrade_scheduler
from ctl_testlib import ThreadedApp, crmctl, table_rows
from google.protobuf.duration_pb2 import Duration

PHONE = "13812345678"


@pytest.fixture(scope="module")
def platform(stack: Stack) -> Iterator[dict[str, Any]]:
    """Assignment and scheduler served from threads over databases of their own."""
    names = [f"crm_t_{uuid.uuid4().hex[:12]}" for _ in range(2)]
    urls = [create_database(n) for n in names]
    apps: list[ThreadedApp] = []
    try:
        upgrade_assignment(urls[0])
        upgrade_scheduler(urls[1])
        prefix = f"/crm-test/{uuid.uuid4().hex[:12]}/config"
        asg = AssignmentSettings(
            host="127.0.0.1", port=0, metrics_port=-1, database_url=urls[0], db_pool_size=4,
            etcd_endpoints=stack.etcd_endpoint, config_prefix=prefix, shutdown_grace_s=1.0,
            readiness_interval_s=0.2,
        )  # fmt: skip
        sch = SchedulerSettings(
            host="127.0.0.1", port=0, metrics_port=-1, database_url=urls[1], db_pool_size=4,
            readiness_interval_s=0.2, allowed_target_services="crm.",
        )  # fmt: skip
        apps.append(ThreadedApp(lambda: build_assignment(asg)))
        apps.append(ThreadedApp(lambda: build_scheduler(sch)))
        with grpc.insecure_channel(apps[0].target) as ch:
            seed_assignment(assignment_pb2_grpc.AssignmentServiceStub(ch))
        with grpc.insecure_channel(apps[1].target) as ch:
            jobs = seed_scheduler(scheduler_pb2_grpc.SchedulerServiceStub(ch))
        yield {
            "flags": ("--assignment", apps[0].target, "--scheduler", apps[1].target),
            "etcd": ("--etcd", stack.etcd_endpoint, "--config-prefix", prefix),
            "jobs": jobs,
        }
    finally:
        for app in apps:
            app.close()
        for n in names:
            drop_database(n)


def seed_assignment(stub: assignment_pb2_grpc.AssignmentServiceStub) -> None:
    stub.UpsertAgent(apb.UpsertAgentRequest(agent=apb.Agent(
        id=7, name="Mei", business_line=common_pb2.BUSINESS_LINE_FINANCE, capacity=2,
        cities=["beijing"], brands=["BYD"],
    )))  # fmt: skip
    for i, line in enumerate(
        [common_pb2.BUSINESS_LINE_SALE] * 3 + [common_pb2.BUSINESS_LINE_FINANCE] * 2
    ):
        stub.CreateClue(apb.CreateClueRequest(
            idempotency_key=f"k{i}", phone=f"1381234{i:04d}", business_line=line, source="app",
            city="beijing" if i % 2 else "shanghai", brands=["BYD"],
        ))  # fmt: skip


def seed_scheduler(stub: scheduler_pb2_grpc.SchedulerServiceStub) -> list[spb.Job]:
    jobs = []
    for i in range(3):
        resp = stub.Schedule(spb.ScheduleRequest(
            name=f"ctl-test-{i}", idempotency_key=f"ctl-{i}",
            target=spb.Target(method="/crm.assignment.v1.AssignmentService/WakeRevisit",
                              address="127.0.0.1:1", request=b""),
            delay=Duration(seconds=int(timedelta(hours=1).total_seconds())),
        ))  # fmt: skip
        jobs.append(resp.job)
    return jobs


def test_tasks_list_table_and_json(platform: dict[str, Any]) -> None:
    f = platform["flags"]
    r = crmctl(*f, "tasks", "list", "--line", "sale")
    assert r.code == 0, r.err
    header = r.out.splitlines()[0].split()
    assert header[:4] == ["ID", "LINE", "CATEGORY", "STATUS"]
    rows = table_rows(r.out)
    assert len(rows) == 3
    assert {row[1] for row in rows} == {"SALE"}
    assert {row[2] for row in rows} == {"NEW_CLUE"}

    page = crmctl(*f, "tasks", "list", "--limit", "2")
    assert len(table_rows(page.out)) == 3  # 2 rows + the "(more: ...)" line
    token = page.out.strip().splitlines()[-1].split("--page-token ")[1].rstrip(")")
    rest = crmctl(*f, "-o", "json", "tasks", "list", "--limit", "2", "--page-token", token)
    assert len(rest.json()["tasks"]) == 2

    js = crmctl(*f, "tasks", "list", "--line", "FINANCE", "--city", "beijing", "-o", "json")
    assert js.code == 0
    tasks = js.json()["tasks"]
    assert [t["business_line"] for t in tasks] == ["BUSINESS_LINE_FINANCE"]
    assert tasks[0]["city"] == "beijing"

    bad = crmctl(*f, "tasks", "list", "--line", "retail?")
    assert bad.code == 2
    assert "'retail?' is not a business line" in bad.err
    unknown = crmctl(*f, *platform["etcd"], "tasks", "list", "--line", "RETAIL")
    assert unknown.code == 3
    assert "unknown business line RETAIL: expected a code or one of SALE" in unknown.err


def test_tasks_get_masks_the_phone(platform: dict[str, Any]) -> None:
    f = platform["flags"]
    some = crmctl(*f, "-o", "json", "tasks", "list").json()["tasks"][0]
    r = crmctl(*f, "tasks", "get", str(some["id"]))
    assert r.code == 0, r.err
    assert "Task:" in r.out
    assert str(some["id"]) in r.out.splitlines()[0]
    assert "****" in r.out
    assert "1381234" not in r.out  # only the masked phone is shown
    assert "History:" in r.out
    assert "CREATED" in r.out
    js = crmctl(*f, "-o", "json", "tasks", "get", str(some["id"])).json()
    assert js["task"]["id"] == some["id"]
    assert js["history"][0]["kind"] == "CREATED"


def test_agents_and_presence(platform: dict[str, Any]) -> None:
    f = platform["flags"]
    r = crmctl(*f, "agents", "get", "7")
    assert r.code == 0, r.err
    assert "Name:" in r.out
    assert "Mei" in r.out
    assert "FINANCE" in r.out
    assert "0/2" in r.out
    set_ = crmctl(*f, "agents", "presence", "7", "break")
    assert set_.code == 0, set_.err
    assert set_.out.strip() == "agent 7 (Mei): BREAK"
    shown = crmctl(*f, "-o", "json", "agents", "presence", "7").json()
    assert shown == {"agent_id": 7, "presence": "BREAK"}


def test_queue_stats(platform: dict[str, Any]) -> None:
    f = platform["flags"]
    r = crmctl(*f, "queue", "stats")
    assert r.code == 0, r.err
    queues, agents = r.out.split("\n\n")
    rows = {(row[0], row[1]): row for row in table_rows(queues)}
    assert rows[("SALE", "NEW_CLUE")][2] == "3"
    assert rows[("FINANCE", "NEW_CLUE")][2] == "2"
    assert any(row[0] == "FINANCE" for row in table_rows(agents))
    js = crmctl(*f, "-o", "json", "queue", "stats", "--line", "FINANCE").json()
    assert {q["business_line"] for q in js["queues"]} == {"BUSINESS_LINE_FINANCE"}
    assert sum(q["waiting"] for q in js["queues"]) == 2


def test_jobs_list_get_cancel_rerun(platform: dict[str, Any]) -> None:
    f = platform["flags"]
    jobs = platform["jobs"]
    r = crmctl(*f, "jobs", "list", "--name", "ctl-test-0")
    assert r.code == 0, r.err
    rows = table_rows(r.out)
    assert [(row[0], row[1], row[2]) for row in rows] == [(jobs[0].id, "ctl-test-0", "SCHEDULED")]

    got = crmctl(*f, "jobs", "get", "--key", "ctl-1")
    assert got.code == 0
    assert jobs[1].id in got.out
    assert "WakeRevisit @ 127.0.0.1:1" in got.out

    cancelled = crmctl(*f, "-o", "json", "jobs", "cancel", jobs[2].id)
    assert cancelled.code == 0, cancelled.err
    assert cancelled.json()["job"]["state"] == "JOB_STATE_CANCELLED"
    listed = crmctl(*f, "-o", "json", "jobs", "list", "--state", "cancelled").json()
    assert [j["id"] for j in listed["jobs"]] == [jobs[2].id]

    # Rerun needs a DEAD job: a SCHEDULED one is a precondition failure, one line, exit 5
    rerun = crmctl(*f, "jobs", "rerun", jobs[0].id)
    assert rerun.code == 5
    assert rerun.err.startswith("error: FAILED_PRECONDITION: ")
    assert len(rerun.err.strip().splitlines()) == 1


def test_grpc_failures_are_one_line_with_an_exit_code(platform: dict[str, Any]) -> None:
    f = platform["flags"]
    missing = crmctl(*f, "tasks", "get", "999999")
    assert missing.code == 4
    assert missing.err.startswith("error: NOT_FOUND: ")
    assert len(missing.err.strip().splitlines()) == 1
    nojob = crmctl(*f, "jobs", "get", "no-such-job")
    assert nojob.code in (3, 4)  # a malformed id or an unknown one; never INTERNAL
    assert "INTERNAL" not in nojob.err
    with refusing_port() as dead:
        down = crmctl("--assignment", f"127.0.0.1:{dead}", "--timeout", "3", "queue", "stats")
    assert down.code == 6
    assert down.err.startswith(("error: UNAVAILABLE: ", "error: DEADLINE_EXCEEDED: "))
    assert crmctl(*f, "tasks", "get", "0").code == 2  # refused before any call
    assert crmctl(*f, "agents", "presence", "7", "SLEEPING").code == 2


def test_a_line_added_by_config_is_shown_by_name(platform: dict[str, Any]) -> None:
    """Lines are data: ``crmctl config apply`` adds LEASING (code 4); crmctl then takes
    its name or its code and shows its name (the services only know its code)."""
    f, etcd = platform["flags"], platform["etcd"]
    example = Path(__file__).resolve().parent.parent / "examples" / "leasing.yaml"
    applied = crmctl(*etcd, "config", "apply", "-f", str(example))
    assert applied.code == 0, applied.err
    listed = crmctl(*etcd, "-o", "json", "config", "list", "assignment").json()
    assert {"key": "LEASING", "known": True} in [
        {"key": k["key"], "known": k["known"]} for k in listed
    ]
    with grpc.insecure_channel(f[1]) as ch:
        stub = assignment_pb2_grpc.AssignmentServiceStub(ch)
        request = apb.CreateClueRequest(
            idempotency_key="lease-1", phone="13812349999", business_line=cast(Any, 4),
            source="app", city="beijing",
        )  # fmt: skip

        def created() -> bool:
            try:
                stub.CreateClue(request)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:  # else: not applied yet
                    raise
                return False
            return True

        wait_until(created, timeout=15, what="the service applies LEASING")
    for line in ("leasing", "4"):
        r = crmctl(*f, *etcd, "tasks", "list", "--line", line)
        assert r.code == 0, r.err
        assert [row[1] for row in table_rows(r.out)] == ["LEASING"]
    stats = crmctl(*f, *etcd, "queue", "stats")
    rows = {(row[0], row[1]): row for row in table_rows(stats.out.split("\n\n")[0])}
    assert rows[("LEASING", "NEW_CLUE")][2] == "1"
    # without the live config crmctl still shows the line, by its code
    plain = crmctl(*f, "--etcd", "127.0.0.1:1", "--timeout", "2", "tasks", "list", "--line", "4")
    assert plain.code == 0, plain.err
    assert [row[1] for row in table_rows(plain.out)] == ["4"]


def test_agents_list_table_json_and_paging(platform: dict[str, Any]) -> None:
    f = platform["flags"]
    with grpc.insecure_channel(f[1]) as ch:
        assignment_pb2_grpc.AssignmentServiceStub(ch).UpsertAgent(
            apb.UpsertAgentRequest(
                agent=apb.Agent(
                    id=9, name="Bo", business_line=common_pb2.BUSINESS_LINE_SALE, capacity=1
                )
            )
        )
    r = crmctl(*f, "agents", "list")
    assert r.code == 0, r.err
    rows = table_rows(r.out)
    assert [row[0] for row in rows] == ["7", "9"]
    assert rows[0][1:3] == ["Mei", "FINANCE"]
    assert rows[1][1:5] == ["Bo", "SALE", "OFFLINE", "0/1"]
    js = crmctl(*f, "-o", "json", "agents", "list", "--line", "SALE").json()
    assert [a["id"] for a in js["agents"]] == ["9"]  # int64: a JSON string
    alias = crmctl(*f, "agents", "list", "--presence", "offline", "--line", "SALE", "--json")
    assert alias.code == 0, alias.err
    assert alias.json()["agents"][0]["name"] == "Bo"
    first = crmctl(*f, "agents", "list", "--limit", "1")
    assert [row[0] for row in table_rows(first.out) if not row[0].startswith("(more:")] == ["7"]
    token = first.out.rsplit("--page-token ", 1)[1].rstrip(")\n ")
    rest = crmctl(*f, "--json", "agents", "list", "--limit", "1", "--page-token", token).json()
    assert [a["name"] for a in rest["agents"]] == ["Bo"]
    assert not rest.get("page", {}).get("next_page_token")  # the last page
    bad = crmctl(*f, "agents", "list", "--page-token", "garbage")
    assert bad.code == 3, bad.err  # INVALID_ARGUMENT, with the field at fault
    assert "page.page_token" in bad.err
