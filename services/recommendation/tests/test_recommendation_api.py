"""Bad input -> precise status and field paths; fuzzed requests never fail INTERNAL."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from crm.recommendation.v1 import recommendation_pb2 as pb
from crm_common.errors import error_reason, field_violations
from crm_devstack.apps import rpc_error
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from recommendation_testlib import ASKED, Service, car, fleet

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def svc(shared_service: Service) -> Service:
    shared_service.upsert(*fleet())
    return shared_service


def _fields(err: grpc.RpcError) -> set[str]:
    return {f for f, _ in field_violations(err)}


def test_unknown_car_is_not_found(svc: Service) -> None:
    err = rpc_error(lambda: svc.interact(7, 999_999, ASKED))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(err) == "CAR_NOT_FOUND"
    err = rpc_error(lambda: svc.similar(999_999))
    assert err.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("count", [0, -1, 101])
def test_count_out_of_range(svc: Service, count: int) -> None:
    err = rpc_error(lambda: svc.recommend(count=count))
    assert err.code() == INVALID
    assert field_violations(err) == [("count", "must be 1..100")]
    err = rpc_error(lambda: svc.similar(1, count))
    assert err.code() == INVALID
    assert _fields(err) == {"count"}


def test_invalid_car_fields_have_paths(svc: Service) -> None:
    cars = [
        car(500),
        car(501, price=10),
        car(502, city="Beijing", body=0),
        car(500, brand=" "),
        car(503, year=1900, mileage=-1, status=9),
    ]
    err = rpc_error(lambda: svc.upsert(*cars))
    assert err.code() == INVALID
    assert _fields(err) == {
        "cars[1].price_yuan",
        "cars[2].city",
        "cars[2].body_type",
        "cars[3].brand",
        "cars[3].id",
        "cars[4].model_year",
        "cars[4].mileage_km",
        "cars[4].status",
    }
    assert ("cars[3].id", "duplicate of cars[0].id") in field_violations(err)
    assert svc.app.sync.index is not None
    assert svc.app.sync.index.car(500) is None


def test_batch_size(svc: Service) -> None:
    err = rpc_error(lambda: svc.upsert())
    assert field_violations(err) == [("cars", "must hold 1..1000 cars")]
    err = rpc_error(lambda: svc.upsert(*[car(10_000 + i) for i in range(1001)]))
    assert _fields(err) == {"cars"}


def test_recommend_request_fields(svc: Service) -> None:
    err = rpc_error(
        lambda: svc.recommend(
            customer_id=-3,
            intent_car_ids=[1, 0],
            budget_min_yuan=300_000,
            budget_max_yuan=200_000,
            city="BEIJING",
            exclude_car_ids=[-1],
            business_line=-42,  # lines are data: any code >= 1 is one
        )
    )
    assert err.code() == INVALID
    assert _fields(err) == {
        "customer_id",
        "intent_car_ids[1]",
        "budget_max_yuan",
        "city",
        "exclude_car_ids[0]",
        "business_line",
    }
    err = rpc_error(lambda: svc.recommend(intent_car_ids=list(range(1, 22))))
    assert _fields(err) == {"intent_car_ids"}


def test_interaction_fields(svc: Service) -> None:
    future = Timestamp()
    future.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    err = rpc_error(
        lambda: svc.stub.RecordInteraction(
            pb.RecordInteractionRequest(customer_id=0, car_id=-1, kind=0, occurred_at=future)
        )
    )
    assert err.code() == INVALID
    assert _fields(err) == {"customer_id", "car_id", "kind", "occurred_at"}


def test_unknown_intent_ids_are_echoed(svc: Service) -> None:
    resp = svc.recommend(intent_car_ids=[1, 888_888], count=5)
    assert list(resp.ignored_intent_car_ids) == [888_888]
    assert resp.recommendations
    assert all(r.car.id != 1 for r in resp.recommendations)


# ----------------------------------------------------------------- fuzzing

_FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
_ALLOWED = {grpc.StatusCode.OK, INVALID, grpc.StatusCode.NOT_FOUND}
_int64 = st.integers(-(2**63), 2**63 - 1)
_small = st.integers(-5, 80)
_text = st.text(max_size=70)


def _code(fn: Callable[[], object]) -> grpc.StatusCode:
    """The call's status code; INVALID_ARGUMENT must name at least one field."""
    try:
        fn()
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        missing = code == INVALID and not field_violations(exc)
    else:
        return grpc.StatusCode.OK
    assert not missing, "INVALID_ARGUMENT without field violations"
    return code


@_FUZZ
@given(
    customer_id=st.one_of(_small, _int64),
    intent=st.lists(st.one_of(_small, _int64), max_size=25),
    budget_min=st.one_of(st.integers(-10, 10**6), _int64),
    budget_max=st.one_of(st.integers(-10, 10**6), _int64),
    city=st.one_of(st.sampled_from(["", "beijing", "shanghai", "mars"]), _text),
    count=st.one_of(st.integers(-2, 110), st.integers(-(2**31), 2**31 - 1)),
    exclude=st.lists(st.one_of(_small, _int64), max_size=30),
    line=st.integers(-3, 6),
)
def test_fuzz_recommend(
    svc: Service,
    customer_id: int,
    intent: list[int],
    budget_min: int,
    budget_max: int,
    city: str,
    count: int,
    exclude: list[int],
    line: int,
) -> None:
    request = pb.RecommendRequest(
        customer_id=customer_id,
        intent_car_ids=intent,
        budget_min_yuan=budget_min,
        budget_max_yuan=budget_max,
        city=city,
        count=count,
        exclude_car_ids=exclude,
        business_line=line,  # type: ignore[arg-type]
    )
    assert _code(lambda: svc.stub.Recommend(request)) in _ALLOWED


_cars = st.builds(
    pb.Car,
    id=st.one_of(st.integers(-2, 60), _int64),
    brand=st.one_of(st.sampled_from(["BMW", "Audi", ""]), _text),
    series=st.one_of(st.sampled_from(["X3", "A4L"]), _text),
    model_year=st.integers(-(2**31), 2**31 - 1),
    mileage_km=st.one_of(st.integers(-1, 3_000_000), _int64),
    price_yuan=st.one_of(st.integers(0, 200_000_000), _int64),
    city=st.one_of(st.sampled_from(["beijing", "xian", "Xi An"]), _text),
    body_type=st.integers(-1, 10),
    status=st.integers(-1, 4),
)


@_FUZZ
@given(cars=st.lists(_cars, max_size=8))
def test_fuzz_upsert_cars(svc: Service, cars: list[pb.Car]) -> None:
    assert _code(lambda: svc.stub.UpsertCars(pb.UpsertCarsRequest(cars=cars))) in _ALLOWED
