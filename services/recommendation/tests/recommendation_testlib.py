"""Test helpers: the service running in a thread of its own, cars, polling."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from crm.recommendation.v1 import recommendation_pb2 as pb
from crm.recommendation.v1 import recommendation_pb2_grpc
from crm_devstack.apps import AppThread
from crm_recommendation.app import App, build_app
from crm_recommendation.domain.model import BodyType, Car, CarStatus
from crm_recommendation.index.car_index import InteractionArrays
from crm_recommendation.settings import RecommendationSettings

T = TypeVar("T")

SEDAN = pb.BODY_TYPE_SEDAN
SUV = pb.BODY_TYPE_SUV
ON_SALE = pb.CAR_STATUS_ON_SALE
SOLD = pb.CAR_STATUS_SOLD
VIEWED = pb.INTERACTION_KIND_VIEWED
ASKED = pb.INTERACTION_KIND_ASKED
CALLED = pb.INTERACTION_KIND_CALLED
VISITED = pb.INTERACTION_KIND_VISITED


class Service(AppThread[App]):
    """The recommendation app served from a background thread with its own event loop, so
    tests use plain (blocking) gRPC stubs."""

    def __init__(self, settings: RecommendationSettings) -> None:
        self.settings = settings
        super().__init__(lambda: build_app(settings))
        self.stub = recommendation_pb2_grpc.RecommendationServiceStub(self.channel)

    # ----------------------------------------------------------------- shortcuts

    def upsert(self, *cars: pb.Car) -> pb.UpsertCarsResponse:
        return self.stub.UpsertCars(pb.UpsertCarsRequest(cars=list(cars)))

    def interact(self, customer_id: int, car_id: int, kind: int = ASKED) -> int:
        return self.stub.RecordInteraction(
            pb.RecordInteractionRequest(customer_id=customer_id, car_id=car_id, kind=kind)
        ).sequence

    def recommend(self, **kw: Any) -> pb.RecommendResponse:
        kw.setdefault("count", 10)
        return self.stub.Recommend(pb.RecommendRequest(**kw))

    def similar(self, car_id: int, count: int = 10) -> pb.SimilarCarsResponse:
        return self.stub.SimilarCars(pb.SimilarCarsRequest(car_id=car_id, count=count))


def settings_for(database_url: str, etcd: str, prefix: str, **kw: Any) -> RecommendationSettings:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": -1,
        "database_url": database_url,
        "db_pool_size": 4,
        "etcd_endpoints": etcd,
        "config_prefix": prefix,
        "refresh_interval_s": 0.1,
        "shutdown_grace_s": 2.0,
        "readiness_interval_s": 0.2,
    }
    values.update(kw)
    return RecommendationSettings(**values)


def car(
    car_id: int,
    brand: str = "BMW",
    series: str = "3 Series",
    *,
    year: int = 2019,
    mileage: int = 40_000,
    price: int = 200_000,
    city: str = "beijing",
    body: int = SEDAN,
    status: int = ON_SALE,
) -> pb.Car:
    return pb.Car(
        id=car_id,
        brand=brand,
        series=series,
        model_year=year,
        mileage_km=mileage,
        price_yuan=price,
        city=city,
        body_type=body,
        status=status,
    )


def fleet() -> list[pb.Car]:
    """A small varied inventory: 4 brands x 3 series x 2 cities, several prices."""
    series = {
        "BMW": [("3 Series", SEDAN, 220_000), ("X3", SUV, 300_000), ("5 Series", SEDAN, 350_000)],
        "Audi": [("A4L", SEDAN, 210_000), ("Q5L", SUV, 290_000), ("A6L", SEDAN, 340_000)],
        "Toyota": [("Camry", SEDAN, 150_000), ("RAV4", SUV, 170_000), ("Corolla", SEDAN, 90_000)],
        "Honda": [("Accord", SEDAN, 140_000), ("CR-V", SUV, 160_000), ("Civic", SEDAN, 95_000)],
    }
    cars: list[pb.Car] = []
    next_id = 1
    for brand, lines in series.items():
        for name, body, base in lines:
            for city in ("beijing", "shanghai"):
                for k in range(3):
                    cars.append(
                        car(
                            next_id,
                            brand,
                            name,
                            year=2016 + 2 * k,
                            mileage=90_000 - 30_000 * k,
                            price=int(base * (0.8 + 0.15 * k)),
                            city=city,
                            body=body,
                        )
                    )
                    next_id += 1
    return cars


# ----------------------------------------------------------------- synthetic index data

_LINES = [
    ("BMW", "3 Series", BodyType.SEDAN, 250_000),
    ("BMW", "X3", BodyType.SUV, 320_000),
    ("Audi", "A4L", BodyType.SEDAN, 240_000),
    ("Audi", "Q5L", BodyType.SUV, 310_000),
    ("Toyota", "Camry", BodyType.SEDAN, 160_000),
    ("Toyota", "RAV4", BodyType.SUV, 170_000),
    ("Honda", "Accord", BodyType.SEDAN, 150_000),
    ("Honda", "Odyssey", BodyType.MPV, 220_000),
    ("BYD", "Han", BodyType.SEDAN, 190_000),
    ("BYD", "Tang", BodyType.SUV, 210_000),
]
_CITIES = ["beijing", "shanghai", "chengdu"]


@dataclass
class SyntheticData:
    """Cars and interaction columns (time order) for index-level tests."""

    cars: list[Car]
    customer: npt.NDArray[np.int64]
    car_id: npt.NDArray[np.int64]
    kind: npt.NDArray[np.int8]
    t: npt.NDArray[np.float64]

    def arrays(self) -> InteractionArrays:
        return self.customer, self.car_id, self.kind, self.t


def generate(n_cars: int, n_customers: int, seed: int) -> SyntheticData:
    """Cars over 10 series / 3 cities; customers who mostly look at one series in one
    city (so co-occurrence has structure), sometimes anything."""
    rng = np.random.default_rng(seed)
    cars = []
    for i in range(n_cars):
        brand, series, body, base = _LINES[int(rng.integers(len(_LINES)))]
        year = int(rng.integers(2014, 2025))
        cars.append(
            Car(
                id=i + 1,
                brand=brand,
                series=series,
                model_year=year,
                mileage_km=int((2025 - year) * rng.uniform(5_000, 20_000)),
                price_yuan=int(base * 0.88 ** (2025 - year) * rng.uniform(0.85, 1.15)),
                city=_CITIES[int(rng.integers(len(_CITIES)))],
                body_type=body,
                status=CarStatus.SOLD if rng.random() < 0.1 else CarStatus.ON_SALE,
            )
        )
    groups: dict[tuple[str, str], list[int]] = {}
    for c in cars:
        groups.setdefault((c.city, c.series), []).append(c.id)
    keys = sorted(groups)
    cols: tuple[list[int], list[int], list[int], list[float]] = ([], [], [], [])
    t0 = datetime(2025, 9, 1, tzinfo=UTC).timestamp()
    for cust in range(1, n_customers + 1):
        pool = groups[keys[int(rng.integers(len(keys)))]]
        t = t0 + float(rng.uniform(0, 30 * 86400))
        for _ in range(int(rng.integers(1, 9))):
            pick = pool if rng.random() < 0.8 else [c.id for c in cars]
            cols[0].append(cust)
            cols[1].append(int(pick[int(rng.integers(len(pick)))]))
            cols[2].append(int(rng.integers(1, 5)))
            cols[3].append(t)
            t += float(rng.exponential(86400))
    return SyntheticData(
        cars,
        np.array(cols[0], np.int64),
        np.array(cols[1], np.int64),
        np.array(cols[2], np.int8),
        np.array(cols[3], np.float64),
    )
