"""CreateClue, GetTask, SetCustomerStar through the real gRPC server; migrations."""

from __future__ import annotations

import threading

import grpc
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from assignment_testlib import FINANCE, SALE, ManualClock, Service
from crm.assignment.v1 import assignment_pb2 as pb
from crm_assignment.store.migrate import downgrade, upgrade
from crm_assignment.store.schema import Base
from crm_common.config_watch import put_json
from crm_common.errors import field_violations
from crm_devstack.apps import rpc_error
from sqlalchemy import create_engine, inspect


def test_migrations_match_models_and_downgrade(mysql_database: str) -> None:
    upgrade(mysql_database)
    engine = create_engine(mysql_database)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(ctx, Base.metadata) == []
        downgrade(mysql_database, "base")
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}
        upgrade(mysql_database)
        assert {"customer", "clue", "task", "task_event", "agent"} <= set(
            inspect(engine).get_table_names()
        )
    finally:
        engine.dispose()


def test_create_clue_new_task(service: Service) -> None:
    r = service.clue(
        "c-1",
        "+86 138-0013-8000",
        intent_car_ids=[11, 12],
        brands=["BMW", " Audi ", "bmw"],
        budget_min_yuan=100_000,
        budget_max_yuan=200_000,
    )
    assert not r.merged
    t = r.task
    assert t.status == pb.STATUS_UNASSIGNED
    assert t.category == pb.CATEGORY_NEW_CLUE
    assert t.business_line == SALE
    assert t.priority == 5  # line default
    assert t.clue_count == 1
    assert list(t.brands) == ["BMW", "Audi"]
    assert t.agent_id == 0
    assert not t.HasField("offer_deadline")
    assert r.clue.id > 0
    assert list(r.clue.intent_car_ids) == [11, 12]
    d = service.task(t.id)
    assert d.customer.phone.masked == "861****8000"
    assert not d.customer.star
    assert [c.id for c in d.clues] == [r.clue.id]
    assert [(e.kind, e.from_status, e.to_status) for e in d.history] == [
        ("CREATED", pb.STATUS_UNSPECIFIED, pb.STATUS_UNASSIGNED)
    ]


def test_idempotent_retry_and_key_reuse(service: Service) -> None:
    first = service.clue("same-key", "13800138000", priority=7)
    again = service.clue("same-key", "138 0013 8000", priority=7)  # same normalized request
    assert again.task.id == first.task.id
    assert again.clue.id == first.clue.id
    assert again.merged == first.merged
    other_phone = rpc_error(lambda: service.clue("same-key", "13900139000", priority=7))
    assert other_phone.code() == grpc.StatusCode.ALREADY_EXISTS
    other_city = rpc_error(lambda: service.clue("same-key", "13800138000", city="shanghai"))
    assert other_city.code() == grpc.StatusCode.ALREADY_EXISTS
    # the retry returns the task's current state
    service.stub.CancelTask(pb.CancelTaskRequest(task_id=first.task.id, reason="dup"))
    third = service.clue("same-key", "13800138000", priority=7)
    assert third.task.status == pb.STATUS_CANCELLED
    # keys are compared exactly (no case folding, no trailing-space padding)
    assert service.clue("Same-Key", "13800138000", priority=7).clue.id != first.clue.id
    assert service.clue("same-key ", "13800138000", priority=7).clue.id != first.clue.id


def test_merge_within_window_and_new_task_after(service: Service, clock: ManualClock) -> None:
    a = service.clue("m-1", "13800138001", brands=["BMW"])
    clock.advance(3600)
    b = service.clue("m-2", "138-0013-8001", brands=["Audi"], source="web", priority=8)
    assert b.merged
    assert b.task.id == a.task.id
    assert b.task.clue_count == 2
    assert list(b.task.brands) == ["BMW", "Audi"]
    assert b.task.priority == 8  # raised by the merged clue
    # another business line never merges
    f = service.clue("m-3", "13800138001", business_line=FINANCE)
    assert not f.merged
    assert f.task.id != a.task.id
    d = service.task(a.task.id)
    assert [c.id for c in d.clues] == [a.clue.id, b.clue.id]
    assert [e.kind for e in d.history] == ["CREATED", "MERGED"]
    # after the window (default one day from the task's creation): a new task
    clock.advance(86400 - 3600 + 1)
    c = service.clue("m-4", "13800138001")
    assert not c.merged
    assert c.task.id != a.task.id


def test_merge_window_from_live_config(service: Service, clock: ManualClock) -> None:
    prefix = service.settings.assignment_config_prefix
    rev = service.call(
        put_json(service.settings.etcd_endpoints, prefix + "SALE", {"merge_window_s": 0})
    )
    service.call(service.app.watcher.wait_for_revision(rev, 10))
    a = service.clue("w-1", "13800138002")
    b = service.clue("w-2", "13800138002")
    assert not b.merged
    assert a.task.id != b.task.id


def test_concurrent_clues_of_one_phone_merge_into_one_task(service: Service) -> None:
    results: list[pb.CreateClueResponse] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(12)

    def send(i: int) -> None:
        channel, stub = service.new_stub()
        try:
            barrier.wait()
            results.append(
                stub.CreateClue(
                    pb.CreateClueRequest(
                        idempotency_key=f"cc-{i % 6}",  # every key sent twice at once
                        phone="13800138003",
                        business_line=SALE,
                        source="app",
                        city="beijing",
                    )
                )
            )
        except BaseException as exc:
            errors.append(exc)
        finally:
            channel.close()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({r.task.id for r in results}) == 1
    assert len({r.clue.id for r in results}) == 6
    assert sum(1 for r in results if not r.merged) == 2  # the creating clue, sent twice
    d = service.task(results[0].task.id)
    assert d.task.clue_count == 6
    assert len(d.clues) == 6


def _violations(err: grpc.RpcError) -> set[str]:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    return {field for field, _ in field_violations(err)}


GOOD = {
    "idempotency_key": "k",
    "phone": "13800138000",
    "business_line": SALE,
    "source": "app",
    "city": "beijing",
}


@pytest.mark.parametrize(
    ("changes", "fields"),
    [
        ({"idempotency_key": ""}, {"idempotency_key"}),
        ({"idempotency_key": "x" * 129}, {"idempotency_key"}),
        ({"idempotency_key": "ключ"}, {"idempotency_key"}),
        ({"idempotency_key": "a\tb"}, {"idempotency_key"}),
        ({"phone": ""}, {"phone"}),
        ({"phone": "12345"}, {"phone"}),
        ({"phone": "138001380001234567"}, {"phone"}),
        ({"phone": "138OO138000"}, {"phone"}),
        ({"business_line": 0}, {"business_line"}),
        ({"business_line": 99}, {"business_line"}),
        ({"source": ""}, {"source"}),
        ({"source": "s" * 65}, {"source"}),
        ({"source": "   "}, {"source"}),
        ({"source": "a\nb"}, {"source"}),
        ({"city": ""}, {"city"}),
        ({"city": "Beijing"}, {"city"}),
        ({"city": "1beijing"}, {"city"}),
        ({"city": "bei jing"}, {"city"}),
        ({"city": "b" * 65}, {"city"}),
        ({"intent_car_ids": [1, 0, -5]}, {"intent_car_ids[1]", "intent_car_ids[2]"}),
        ({"intent_car_ids": list(range(1, 22))}, {"intent_car_ids"}),
        ({"brands": ["BMW", ""]}, {"brands[1]"}),
        ({"brands": ["b" * 33]}, {"brands[0]"}),
        ({"brands": ["x"] * 21}, {"brands"}),
        ({"budget_min_yuan": -1}, {"budget_min_yuan"}),
        ({"budget_max_yuan": -1}, {"budget_max_yuan"}),
        ({"budget_min_yuan": 10, "budget_max_yuan": 5}, {"budget_max_yuan"}),
        ({"priority": 10}, {"priority"}),
        ({"priority": -1}, {"priority"}),
        (
            {"idempotency_key": "", "phone": "1", "business_line": 0, "city": "X"},
            {"idempotency_key", "phone", "business_line", "city"},
        ),
    ],
)
def test_create_clue_field_violations(
    shared_service: Service, changes: dict[str, object], fields: set[str]
) -> None:
    req = pb.CreateClueRequest(**{**GOOD, **changes})  # type: ignore[arg-type]
    err = rpc_error(lambda: shared_service.stub.CreateClue(req))
    assert _violations(err) == fields
    assert "13800138000" not in (err.details() or "")


def test_budget_max_zero_means_unknown(service: Service) -> None:
    r = service.clue("b-1", "13800138000", budget_min_yuan=50_000, budget_max_yuan=0)
    assert r.clue.budget_min_yuan == 50_000


def test_get_task_errors(service: Service) -> None:
    assert _violations(rpc_error(lambda: service.task(0))) == {"id"}
    assert rpc_error(lambda: service.task(999_999)).code() == grpc.StatusCode.NOT_FOUND


def test_set_customer_star(service: Service) -> None:
    r = service.clue("s-1", "13800138004")
    customer_id = service.task(r.task.id).customer.id
    out = service.stub.SetCustomerStar(
        pb.SetCustomerStarRequest(customer_id=customer_id, star=True)
    )
    assert out.customer.star
    assert out.customer.phone.masked == "138****8004"
    assert service.task(r.task.id).customer.star
    err = rpc_error(
        lambda: service.stub.SetCustomerStar(pb.SetCustomerStarRequest(customer_id=424242))
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    bad = rpc_error(lambda: service.stub.SetCustomerStar(pb.SetCustomerStarRequest()))
    assert _violations(bad) == {"customer_id"}
