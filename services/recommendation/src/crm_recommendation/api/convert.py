"""Domain values <-> protobuf messages (requests are validated in ``validation``)."""

from __future__ import annotations

import struct
from collections.abc import Iterable

from crm.recommendation.v1 import recommendation_pb2 as pb
from crm_common.timestamps import from_timestamp, timestamp
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from crm_recommendation.domain.model import (
    BodyType,
    Car,
    CarStatus,
    Reason,
    ReasonKind,
    Recommendation,
    Recommendations,
)

__all__ = [
    "ResponseEncoder",
    "add_recommendations",
    "car_from_pb",
    "car_pb",
    "from_timestamp",
    "reason_from_pb",
    "recommendation_from_pb",
    "recommendation_pb",
    "timestamp",
]


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


def _varint(value: int) -> bytes:
    if value < _VARINTS_UPTO:
        return _VARINTS[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_VARINTS_UPTO = 1 << 14
_VARINTS = [bytes([i]) for i in range(0x80)] + [
    bytes([(i & 0x7F) | 0x80, i >> 7]) for i in range(0x80, _VARINTS_UPTO)
]
"""The varint of every value below ``_VARINTS_UPTO`` (one or two bytes)."""
_PACK_DOUBLE = struct.Struct("<d").pack
# wire tags (field number << 3 | wire type) of the fields written here
_ITEM = b"\x0a"  # RecommendResponse / SimilarCarsResponse.recommendations = 1, LEN
_CAR = b"\x0a"  # Recommendation.car = 1, LEN
_SCORE = b"\x11"  # Recommendation.score = 2, I64
_REASON = b"\x1a"  # Recommendation.reasons = 3, LEN
_KIND = b"\x08"  # Reason.kind = 1, VARINT
_TEXT = b"\x12"  # Reason.text = 2, LEN
_RELATED = b"\x18"  # Reason.related_car_id = 3, VARINT


def _reason_field(reason: Reason) -> bytes:
    """The ``reasons`` field of a Recommendation holding ``reason`` (tag, length, message):
    the bytes ``reason_pb(reason).SerializeToString()`` gives, written directly (fields in
    number order, defaults left out)."""
    kind, related = int(reason.kind), reason.related_car_id
    if kind < 0 or related < 0:  # negative varints: left to protobuf
        body = reason_pb(reason).SerializeToString()
    else:
        text = reason.text.encode()
        body = b"".join((
            _KIND + _varint(kind) if kind else b"",
            _TEXT + _varint(len(text)) + text if text else b"",
            _RELATED + _varint(related) if related else b"",
        ))  # fmt: skip
    return _REASON + _varint(len(body)) + body


class ResponseEncoder:
    """Builds the ``recommendations`` of a response as the bytes of the messages
    :func:`recommendation_pb` would give, from cached pieces, then parses them once
    (about three times as fast as setting every field of 20 cars from Python):

    - a car's serialized ``Car`` is kept per car id along with the ``Car`` object it was
      made from and reused only for that very object (a changed car is a new object in the
      index, so a stale entry is never used); two dicts keyed by id, not one of tuples, so
      the cache adds no object the garbage collector tracks per entry (full collections
      would walk them); at most ``max_cars`` entries, then it starts over;
    - a reason is serialized once per answer (the ranking shares one ``Reason`` object
      among the cars it applies to).

    Not thread-safe: one per servicer, used on the event loop."""

    def __init__(self, max_cars: int = 200_000) -> None:
        self._bytes: dict[int, bytes] = {}
        self._made_from: dict[int, Car] = {}
        self._max_cars = max_cars

    def _car(self, car: Car) -> bytes:
        """The ``car`` field of a Recommendation holding ``car`` (tag, length, message)."""
        if len(self._bytes) >= self._max_cars:
            self._bytes.clear()
            self._made_from.clear()
        body = car_pb(car).SerializeToString()
        data = self._bytes[car.id] = _CAR + _varint(len(body)) + body
        self._made_from[car.id] = car
        return data

    def items(self, items: Iterable[Recommendation]) -> bytes:
        """The serialized ``recommendations`` field (number 1) holding ``items``."""
        out: list[bytes] = []
        reasons: dict[int, bytes] = {}
        made_from, cached = self._made_from, self._bytes
        for rec in items:
            car = rec.car
            parts = [cached[car.id] if made_from.get(car.id) is car else self._car(car)]
            if rec.score:
                parts += (_SCORE, _PACK_DOUBLE(rec.score))
            for reason in rec.reasons:
                data = reasons.get(id(reason))
                if data is None:
                    data = reasons[id(reason)] = _reason_field(reason)
                parts.append(data)
            item = b"".join(parts)
            size = len(item)
            out += (_ITEM, _VARINTS[size] if size < _VARINTS_UPTO else _varint(size), item)
        return b"".join(out)

    def recommend_response(self, result: Recommendations) -> pb.RecommendResponse:
        msg = pb.RecommendResponse.FromString(self.items(result.items))
        msg.data_sequence = result.data_sequence
        msg.ignored_intent_car_ids.extend(result.ignored_intent_car_ids)
        return msg

    def similar_cars_response(self, result: Recommendations) -> pb.SimilarCarsResponse:
        msg = pb.SimilarCarsResponse.FromString(self.items(result.items))
        msg.data_sequence = result.data_sequence
        return msg
