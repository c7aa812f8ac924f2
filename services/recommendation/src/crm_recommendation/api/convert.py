"""Domain values <-> protobuf messages (requests are validated in ``validation``)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from crm.recommendation.v1 import recommendation_pb2 as pb
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from google.protobuf.timestamp_pb2 import Timestamp

from crm_recommendation.domain.model import (
    BodyType,
    Car,
    CarStatus,
    Reason,
    ReasonKind,
    Recommendation,
)

__all__ = [
    "add_recommendations",
    "car_from_pb",
    "car_pb",
    "from_timestamp",
    "reason_from_pb",
    "recommendation_from_pb",
    "recommendation_pb",
    "timestamp",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp(dt: datetime) -> Timestamp:
    """An aware datetime as a Timestamp (microsecond precision)."""
    delta = dt - _EPOCH
    micros = (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds
    seconds, rest = divmod(micros, 1_000_000)
    return Timestamp(seconds=seconds, nanos=rest * 1000)


def from_timestamp(ts: Timestamp) -> datetime:
    """A Timestamp (validated to be in range) as an aware UTC datetime, truncated to µs."""
    return _EPOCH + timedelta(seconds=ts.seconds, microseconds=ts.nanos // 1000)


def car_pb(car: Car) -> pb.Car:
    return pb.Car(
        id=car.id,
        brand=car.brand,
        series=car.series,
        model_year=car.model_year,
        mileage_km=car.mileage_km,
        price_yuan=car.price_yuan,
        city=car.city,
        body_type=pb.BodyType.ValueType(int(car.body_type)),
        status=pb.CarStatus.ValueType(int(car.status)),
    )


def car_from_pb(msg: pb.Car) -> Car:
    """A car from a message whose fields are known to be valid (validated or ours)."""
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


def reason_pb(reason: Reason) -> pb.Reason:
    return pb.Reason(
        kind=pb.ReasonKind.ValueType(int(reason.kind)),
        text=reason.text,
        related_car_id=reason.related_car_id,
    )


def reason_from_pb(msg: pb.Reason) -> Reason:
    return Reason(ReasonKind(msg.kind), msg.text, msg.related_car_id)


def recommendation_pb(rec: Recommendation) -> pb.Recommendation:
    return pb.Recommendation(
        car=car_pb(rec.car), score=rec.score, reasons=[reason_pb(r) for r in rec.reasons]
    )


def add_recommendations(
    field: RepeatedCompositeFieldContainer[pb.Recommendation], items: Iterable[Recommendation]
) -> None:
    """Appends ``items`` to a repeated ``Recommendation`` field in place (the same messages
    as :func:`recommendation_pb`, built without the intermediate copies: about twice as
    fast for a 20-car answer)."""
    add = field.add
    for rec in items:
        car = rec.car
        msg = add(score=rec.score)
        out = msg.car
        out.id = car.id
        out.brand = car.brand
        out.series = car.series
        out.model_year = car.model_year
        out.mileage_km = car.mileage_km
        out.price_yuan = car.price_yuan
        out.city = car.city
        out.body_type = pb.BodyType.ValueType(int(car.body_type))
        out.status = pb.CarStatus.ValueType(int(car.status))
        add_reason = msg.reasons.add
        for reason in rec.reasons:
            add_reason(
                kind=pb.ReasonKind.ValueType(int(reason.kind)),
                text=reason.text,
                related_car_id=reason.related_car_id,
            )


def recommendation_from_pb(msg: pb.Recommendation) -> Recommendation:
    return Recommendation(
        car_from_pb(msg.car), msg.score, tuple(reason_from_pb(r) for r in msg.reasons)
    )
