"""Request validation: protobuf requests -> domain values, or InvalidArgument listing every
bad field by its path (``cars[3].price_yuan``, ``intent_car_ids[2]``, ``count``).

Lists over their size limit get one violation for the list, not one per item.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from crm.recommendation.v1 import recommendation_pb2 as pb
from crm_common.errors import Validator
from google.protobuf.timestamp_pb2 import Timestamp

from crm_recommendation.api.convert import from_timestamp
from crm_recommendation.domain.model import (
    BodyType,
    BusinessLine,
    Car,
    CarStatus,
    Interaction,
    InteractionKind,
    RecommendQuery,
)

__all__ = [
    "MAX_CARS_PER_UPSERT",
    "MAX_COUNT",
    "cars",
    "interaction",
    "recommend_query",
    "similar_query",
]

CITY = re.compile(r"[a-z][a-z0-9_-]*")
MAX_CARS_PER_UPSERT = 1000
MAX_COUNT = 100
MAX_INTENT_CARS = 20
MAX_EXCLUDED = 1000
MIN_MODEL_YEAR = 1980
MAX_MILEAGE_KM = 2_000_000
MIN_PRICE_YUAN = 1_000
MAX_PRICE_YUAN = 100_000_000
MAX_BUDGET_YUAN = 10_000_000_000
MAX_FUTURE = timedelta(minutes=5)
MIN_OCCURRED_AT = datetime(2000, 1, 1, tzinfo=UTC).timestamp()
_MAX_SECONDS = 253402300799


def _text(v: Validator, value: str, field: str, hi: int) -> None:
    if not 1 <= len(value) <= hi:
        v.add(field, f"must be 1..{hi} characters")
    elif not value.strip():
        v.add(field, "must not be blank")
    elif value != value.strip():
        v.add(field, "must not start or end with spaces")
    else:
        v.require(value.isprintable(), field, "must contain printable characters only")


def _city(v: Validator, value: str, field: str) -> None:
    if not 1 <= len(value) <= 64:
        v.add(field, "must be 1..64 characters")
    else:
        v.require(
            CITY.fullmatch(value) is not None,
            field,
            "must be a lower-case slug: a letter, then letters, digits, '_' or '-'",
        )


def _enum(v: Validator, value: int, field: str, members: Mapping[Any, object], what: str) -> bool:
    if value == 0:
        v.add(field, "must be set")
        return False
    return v.require(value in members, field, f"is not a known {what}")


def _ids(v: Validator, values: list[int], field: str, limit: int) -> None:
    if len(values) > limit:
        v.add(field, f"must have at most {limit} items")
        return
    for i, value in enumerate(values):
        v.require(value > 0, f"{field}[{i}]", "must be > 0")


def _count(v: Validator, value: int) -> None:
    v.require(1 <= value <= MAX_COUNT, "count", f"must be 1..{MAX_COUNT}")


def _car(v: Validator, msg: pb.Car, now: datetime) -> Car | None:
    before = len(v.violations)
    v.require(msg.id > 0, "id", "must be > 0")
    _text(v, msg.brand, "brand", 32)
    _text(v, msg.series, "series", 64)
    max_year = now.year + 1
    v.require(
        MIN_MODEL_YEAR <= msg.model_year <= max_year,
        "model_year",
        f"must be {MIN_MODEL_YEAR}..{max_year}",
    )
    v.require(0 <= msg.mileage_km <= MAX_MILEAGE_KM, "mileage_km", f"must be 0..{MAX_MILEAGE_KM:,}")
    v.require(
        MIN_PRICE_YUAN <= msg.price_yuan <= MAX_PRICE_YUAN,
        "price_yuan",
        f"must be {MIN_PRICE_YUAN:,}..{MAX_PRICE_YUAN:,}",
    )
    _city(v, msg.city, "city")
    _enum(v, msg.body_type, "body_type", BodyType._value2member_map_, "body type")
    _enum(v, msg.status, "status", CarStatus._value2member_map_, "car status")
    if len(v.violations) > before:
        return None
    return Car(
        id=msg.id,
        brand=msg.brand,
        series=msg.series,
        model_year=msg.model_year,
        mileage_km=msg.mileage_km,
        price_yuan=msg.price_yuan,
        city=msg.city,
        body_type=BodyType(msg.body_type),
        status=CarStatus(msg.status),
    )


def cars(req: pb.UpsertCarsRequest, now: datetime) -> list[Car]:
    """The cars of an UpsertCars request (1..1000, valid, ids unique)."""
    v = Validator()
    if not 1 <= len(req.cars) <= MAX_CARS_PER_UPSERT:
        v.add("cars", f"must hold 1..{MAX_CARS_PER_UPSERT} cars")
        v.check()
    out: list[Car] = []
    first_at: dict[int, int] = {}
    for i, msg in enumerate(req.cars):
        at = v.at(f"cars[{i}]")
        car = _car(at, msg, now)
        if msg.id > 0:
            j = first_at.setdefault(msg.id, i)
            if j != i:
                at.add("id", f"duplicate of cars[{j}].id")
                car = None
        if car is not None:
            out.append(car)
    v.check()
    return out


def interaction(req: pb.RecordInteractionRequest, now: datetime) -> Interaction:
    """The interaction of a RecordInteraction request (time defaults to ``now``)."""
    v = Validator()
    v.require(req.customer_id > 0, "customer_id", "must be > 0")
    v.require(req.car_id > 0, "car_id", "must be > 0")
    _enum(v, req.kind, "kind", InteractionKind._value2member_map_, "interaction kind")
    occurred_at = now
    if req.HasField("occurred_at"):
        found = _occurred_at(v, req.occurred_at, now)
        if found is not None:
            occurred_at = found
    v.check()
    return Interaction(req.customer_id, req.car_id, InteractionKind(req.kind), occurred_at)


def _occurred_at(v: Validator, ts: Timestamp, now: datetime) -> datetime | None:
    ok = MIN_OCCURRED_AT <= ts.seconds <= _MAX_SECONDS and 0 <= ts.nanos <= 999_999_999
    if not v.require(ok, "occurred_at", "must be a valid time from 2000 on"):
        return None
    at = from_timestamp(ts)
    if not v.require(at <= now + MAX_FUTURE, "occurred_at", "must not be in the future"):
        return None
    return at


def recommend_query(req: pb.RecommendRequest) -> RecommendQuery:
    """The query of a Recommend request."""
    v = Validator()
    v.require(req.customer_id >= 0, "customer_id", "must be >= 0 (0: unknown customer)")
    _ids(v, list(req.intent_car_ids), "intent_car_ids", MAX_INTENT_CARS)
    lo, hi = req.budget_min_yuan, req.budget_max_yuan
    v.require(0 <= lo <= MAX_BUDGET_YUAN, "budget_min_yuan", f"must be 0..{MAX_BUDGET_YUAN:,}")
    if v.require(0 <= hi <= MAX_BUDGET_YUAN, "budget_max_yuan", f"must be 0..{MAX_BUDGET_YUAN:,}"):
        v.require(
            hi == 0 or hi >= lo,
            "budget_max_yuan",
            "must be >= budget_min_yuan, or 0 for unknown",
        )
    if req.city:
        _city(v, req.city, "city")
    _count(v, req.count)
    _ids(v, list(req.exclude_car_ids), "exclude_car_ids", MAX_EXCLUDED)
    line: BusinessLine | None = None
    # Lines are data (crm_common.lines): any code >= 1 is a line; one without an entry in
    # the ranking config's ``lines`` uses the default weights. 0: no line.
    if req.business_line != 0 and v.require(
        req.business_line > 0, "business_line", "must be a business line code >= 1, or 0"
    ):
        line = BusinessLine(req.business_line)
    v.check()
    return RecommendQuery(
        count=req.count,
        intent_car_ids=tuple(req.intent_car_ids),
        customer_id=req.customer_id or None,
        budget_min_yuan=lo,
        budget_max_yuan=hi,
        city=req.city or None,
        exclude_car_ids=frozenset(req.exclude_car_ids),
        business_line=line,
    )


def similar_query(req: pb.SimilarCarsRequest) -> tuple[int, int]:
    """``(car_id, count)`` of a SimilarCars request."""
    with Validator() as v:
        v.require(req.car_id > 0, "car_id", "must be > 0")
        _count(v, req.count)
    return req.car_id, req.count
