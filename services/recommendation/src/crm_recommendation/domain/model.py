"""Domain values of the recommendation service (pure: no I/O, no protobuf).

Enum values equal the protobuf numbers of ``crm.recommendation.v1`` (the api layer converts
by value); the store keeps enums by name.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from crm_common.lines import BusinessLine

__all__ = [
    "KIND_WEIGHT",
    "BodyType",
    "BusinessLine",
    "Car",
    "CarStatus",
    "Interaction",
    "InteractionKind",
    "Reason",
    "ReasonKind",
    "RecommendQuery",
    "Recommendation",
    "Recommendations",
    "fast_constructor",
    "kind_mask_weight",
    "utc_now",
]

T = TypeVar("T")


def utc_now() -> datetime:
    """The current time, aware UTC."""
    return datetime.now(UTC)


class CarStatus(enum.IntEnum):
    ON_SALE = 1
    SOLD = 2


class BodyType(enum.IntEnum):
    SEDAN = 1
    SUV = 2
    MPV = 3
    HATCHBACK = 4
    COUPE = 5
    WAGON = 6
    PICKUP = 7
    CONVERTIBLE = 8


class InteractionKind(enum.IntEnum):
    VIEWED = 1
    ASKED = 2
    CALLED = 3
    VISITED = 4


class ReasonKind(enum.IntEnum):
    SAME_SERIES = 1
    SAME_BRAND = 2
    SIMILAR_CAR = 3
    WITHIN_BUDGET = 4
    NEAR_BUDGET = 5
    POPULAR = 6
    ALSO_INTERESTED = 7
    ON_SALE = 8


KIND_WEIGHT: dict[InteractionKind, int] = {
    InteractionKind.VIEWED: 1,
    InteractionKind.ASKED: 2,
    InteractionKind.CALLED: 3,
    InteractionKind.VISITED: 4,
}
"""Strength of an interaction kind in co-interest and popularity. Integers on purpose: the
co-occurrence sums stay exact, so replicas applying the same interactions in a different
order hold bit-identical values. They are baked into the index (not live config)."""


def kind_mask_weight(mask: int) -> int:
    """The weight of a customer's interest in a car whose kinds are the bits of ``mask``
    (bit ``1 << kind``): the strongest kind counts, repeats add nothing."""
    best = 0
    for kind, weight in KIND_WEIGHT.items():
        if mask & (1 << kind) and weight > best:
            best = weight
    return best


@dataclass(frozen=True, slots=True)
class Car:
    """A car of the inventory (validated by the api layer)."""

    id: int
    brand: str
    series: str
    model_year: int
    mileage_km: int
    price_yuan: int
    city: str
    body_type: BodyType
    status: CarStatus

    @property
    def title(self) -> str:
        """``BMW 3 Series`` (for reasons)."""
        return f"{self.brand} {self.series}"


@dataclass(frozen=True, slots=True)
class Interaction:
    """A customer's interaction with a car; ``sequence`` is its change sequence number
    (0 before it is stored)."""

    customer_id: int
    car_id: int
    kind: InteractionKind
    occurred_at: datetime
    sequence: int = 0


@dataclass(frozen=True, slots=True)
class RecommendQuery:
    """What the console asks for (validated). ``budget_*`` 0 means unknown, ``city`` None
    means every city, ``customer_id`` None means an unknown customer."""

    count: int
    intent_car_ids: tuple[int, ...] = ()
    customer_id: int | None = None
    budget_min_yuan: int = 0
    budget_max_yuan: int = 0
    city: str | None = None
    exclude_car_ids: frozenset[int] = field(default_factory=frozenset)
    business_line: BusinessLine | None = None


@dataclass(frozen=True, slots=True)
class Reason:
    """Why a car was recommended: ``related_car_id`` is the car it refers to (0: none)."""

    kind: ReasonKind
    text: str
    related_car_id: int = 0


@dataclass(frozen=True, slots=True)
class Recommendation:
    """One ranked car with its score (0..1, 6 decimals) and reasons (strongest first)."""

    car: Car
    score: float
    reasons: tuple[Reason, ...]


@dataclass(frozen=True, slots=True)
class Recommendations:
    """A ranked answer and the change sequence of the data it was computed from."""

    items: tuple[Recommendation, ...]
    data_sequence: int
    ignored_intent_car_ids: tuple[int, ...] = ()


def fast_constructor(cls: type[T]) -> Callable[..., T]:
    """A constructor of the frozen slots dataclass ``cls`` taking every field, in order,
    positionally (no defaults, no ``__post_init__``): it sets the slots through their
    descriptors, about three times as fast as the generated ``__init__`` (which goes
    through ``object.__setattr__`` for each field). For the ranking's hot path; the
    instances are the same frozen values."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    setters = [cls.__dict__[name].__set__ for name in names]
    new = object.__new__
    if len(setters) == 3:
        a, b, c = setters

        def make3(x: Any, y: Any, z: Any) -> T:
            obj = new(cls)
            a(obj, x)
            b(obj, y)
            c(obj, z)
            return obj

        return make3
    if len(setters) == 4:
        a, b, c, d = setters

        def make4(x: Any, y: Any, z: Any, w: Any) -> T:
            obj = new(cls)
            a(obj, x)
            b(obj, y)
            c(obj, z)
            d(obj, w)
            return obj

        return make4

    def make(*values: Any) -> T:
        if len(values) != len(setters):
            raise TypeError(f"{cls.__name__} takes {len(setters)} values, got {len(values)}")
        obj = new(cls)
        for set_, value in zip(setters, values, strict=True):
            set_(obj, value)
        return obj

    return make
