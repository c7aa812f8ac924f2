"""Offline evaluation of the recommendation ranking (issue #6): `make eval`.

    PYTHONPATH=tools .venv/bin/python -m crm_tools.eval_recommendation [--cars N ...]

Synthetic data with planted preferences, fixed seeds:

- inventory: a few thousand used cars of realistic brands / series / body types, model
  years 2012..2024, mileage growing with age, prices depreciating from the series' new
  price, spread over Chinese cities by size; each car has a hidden "appeal" (log-normal)
  that makes some listings more clicked than others;
- customers: a city, one or two preferred brands, a body type and a price band; their
  interactions (viewed / asked / called / visited) mostly hit cars matching those
  preferences (weighted by appeal), the rest is noise (any car of the city, sometimes
  another city).

Protocol (leave-last-out): each customer's last interaction (a car not seen before) is
held out; the index is built from every other interaction; the request is what the
console would send: intent cars = the customer's earlier cars, their city, a budget
band of +-25 % around their price preference, the customer id. Metrics: hit@10 and
NDCG@10 of the held-out car, for the hybrid ranking (the service's code, in-process:
``CarIndex`` + ``ranking.recommend``), its single signals, a popularity baseline (same
hard filters, most popular first) and random (same hard filters). Target: hybrid hit@10
>= 2x popularity.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import numpy.typing as npt
from crm_recommendation.config import HybridWeights, RankingConfig
from crm_recommendation.domain import ranking
from crm_recommendation.domain.model import (
    BodyType,
    Car,
    CarStatus,
    RecommendQuery,
)
from crm_recommendation.index.car_index import CarIndex, InteractionArrays

__all__ = [
    "BRANDS",
    "CITIES",
    "Customer",
    "SyntheticData",
    "generate",
    "main",
    "make_cars",
]

# brand -> (weight, [(series, body, new price in yuan)])
BRANDS: dict[str, tuple[float, list[tuple[str, BodyType, int]]]] = {
    "Volkswagen": (
        12,
        [
            ("Lavida", BodyType.SEDAN, 120_000),
            ("Sagitar", BodyType.SEDAN, 150_000),
            ("Passat", BodyType.SEDAN, 210_000),
            ("Tiguan L", BodyType.SUV, 250_000),
            ("Golf", BodyType.HATCHBACK, 140_000),
        ],
    ),
    "Toyota": (
        10,
        [
            ("Corolla", BodyType.SEDAN, 120_000),
            ("Camry", BodyType.SEDAN, 200_000),
            ("RAV4", BodyType.SUV, 210_000),
            ("Highlander", BodyType.SUV, 300_000),
            ("Sienna", BodyType.MPV, 330_000),
        ],
    ),
    "Honda": (
        9,
        [
            ("Civic", BodyType.SEDAN, 130_000),
            ("Accord", BodyType.SEDAN, 190_000),
            ("CR-V", BodyType.SUV, 200_000),
            ("Odyssey", BodyType.MPV, 260_000),
            ("Fit", BodyType.HATCHBACK, 90_000),
        ],
    ),
    "Nissan": (
        6,
        [
            ("Sylphy", BodyType.SEDAN, 120_000),
            ("Teana", BodyType.SEDAN, 190_000),
            ("X-Trail", BodyType.SUV, 200_000),
        ],
    ),
    "Buick": (
        6,
        [
            ("Excelle", BodyType.SEDAN, 100_000),
            ("Regal", BodyType.SEDAN, 190_000),
            ("GL8", BodyType.MPV, 300_000),
            ("Envision", BodyType.SUV, 220_000),
        ],
    ),
    "BMW": (
        8,
        [
            ("3 Series", BodyType.SEDAN, 320_000),
            ("5 Series", BodyType.SEDAN, 450_000),
            ("X3", BodyType.SUV, 420_000),
            ("X5", BodyType.SUV, 700_000),
            ("4 Series", BodyType.COUPE, 420_000),
        ],
    ),
    "Mercedes-Benz": (
        8,
        [
            ("C-Class", BodyType.SEDAN, 330_000),
            ("E-Class", BodyType.SEDAN, 470_000),
            ("GLC", BodyType.SUV, 430_000),
            ("V-Class", BodyType.MPV, 550_000),
            ("E-Class Cabriolet", BodyType.CONVERTIBLE, 620_000),
        ],
    ),
    "Audi": (
        7,
        [
            ("A4L", BodyType.SEDAN, 320_000),
            ("A6L", BodyType.SEDAN, 460_000),
            ("Q5L", BodyType.SUV, 420_000),
            ("A3", BodyType.HATCHBACK, 220_000),
        ],
    ),
    "BYD": (
        9,
        [
            ("Qin", BodyType.SEDAN, 110_000),
            ("Han", BodyType.SEDAN, 230_000),
            ("Song", BodyType.SUV, 170_000),
            ("Tang", BodyType.SUV, 260_000),
        ],
    ),
    "Geely": (
        6,
        [
            ("Emgrand", BodyType.SEDAN, 80_000),
            ("Boyue", BodyType.SUV, 120_000),
            ("Xingyue", BodyType.SUV, 160_000),
        ],
    ),
    "Haval": (
        5,
        [
            ("H6", BodyType.SUV, 120_000),
            ("Jolion", BodyType.SUV, 100_000),
            ("Poer", BodyType.PICKUP, 150_000),
        ],
    ),
    "Volvo": (
        3,
        [
            ("S60", BodyType.SEDAN, 300_000),
            ("XC60", BodyType.SUV, 400_000),
            ("V60", BodyType.WAGON, 340_000),
        ],
    ),
    "Tesla": (
        4,
        [
            ("Model 3", BodyType.SEDAN, 250_000),
            ("Model Y", BodyType.SUV, 280_000),
        ],
    ),
    "Porsche": (
        1,
        [
            ("Macan", BodyType.SUV, 600_000),
            ("911", BodyType.COUPE, 1_300_000),
        ],
    ),
}

CITIES: list[tuple[str, float]] = [
    ("beijing", 16),
    ("shanghai", 15),
    ("guangzhou", 10),
    ("shenzhen", 10),
    ("chengdu", 9),
    ("chongqing", 7),
    ("hangzhou", 8),
    ("wuhan", 7),
    ("xian", 6),
    ("nanjing", 6),
    ("tianjin", 6),
]

KIND_P = [0.6, 0.25, 0.1, 0.05]  # VIEWED, ASKED, CALLED, VISITED
NOW = datetime(2025, 11, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Customer:
    id: int
    city: str
    brands: tuple[str, ...]
    body: BodyType
    price_center: float


@dataclass
class SyntheticData:
    cars: list[Car]
    customers: list[Customer]
    # interactions in time order per customer: columns
    customer: npt.NDArray[np.int64]
    car_id: npt.NDArray[np.int64]
    kind: npt.NDArray[np.int8]
    t: npt.NDArray[np.float64]

    def arrays(self, keep: npt.NDArray[np.bool_] | None = None) -> InteractionArrays:
        if keep is None:
            return self.customer, self.car_id, self.kind, self.t
        return self.customer[keep], self.car_id[keep], self.kind[keep], self.t[keep]


def _weights(values: list[float]) -> npt.NDArray[np.float64]:
    w: npt.NDArray[np.float64] = np.asarray(values, dtype=np.float64)
    return w / float(w.sum())


def make_cars(
    n: int, rng: np.random.Generator, first_id: int = 1, sold_share: float = 0.05
) -> tuple[list[Car], npt.NDArray[np.float64]]:
    """``n`` cars and their hidden appeal (vectorized: fast for 100,000s)."""
    brand_names = list(BRANDS)
    brand_idx = rng.choice(len(brand_names), n, p=_weights([BRANDS[b][0] for b in brand_names]))
    city_names = [c for c, _ in CITIES]
    city_idx = rng.choice(len(city_names), n, p=_weights([w for _, w in CITIES]))
    years = rng.integers(2012, 2025, n)
    age = 2025 - years
    mileage = np.clip(age * rng.normal(14_000, 4_000, n) + rng.integers(500, 5_000, n), 300, None)
    series_pick = rng.random(n)
    noise = rng.lognormal(0.0, 0.08, n)
    status = np.where(rng.random(n) < sold_share, CarStatus.SOLD, CarStatus.ON_SALE)
    appeal = rng.lognormal(0.0, 0.8, n)
    cars: list[Car] = []
    for i in range(n):
        brand = brand_names[int(brand_idx[i])]
        lines = BRANDS[brand][1]
        series, body, new_price = lines[int(series_pick[i] * len(lines))]
        price = new_price * 0.86 ** int(age[i]) * (1 - 0.25 * min(mileage[i], 300_000) / 300_000)
        price = max(10_000, round(price * noise[i] / 100) * 100)
        cars.append(
            Car(
                id=first_id + i,
                brand=brand,
                series=series,
                model_year=int(years[i]),
                mileage_km=int(mileage[i]),
                price_yuan=int(price),
                city=city_names[int(city_idx[i])],
                body_type=body,
                status=CarStatus(int(status[i])),
            )
        )
    return cars, appeal


def generate(
    n_cars: int,
    n_customers: int,
    seed: int,
    *,
    mean_interactions: float = 6.0,
    match_share: float = 0.85,
    first_customer_id: int = 1,
) -> SyntheticData:
    """Inventory plus customers with planted preferences and their interactions."""
    rng = np.random.default_rng(seed)
    cars, appeal = make_cars(n_cars, rng)
    city_of = np.array([c.city for c in cars])
    body_of = np.array([int(c.body_type) for c in cars])
    brand_of = np.array([c.brand for c in cars])
    price_of = np.array([c.price_yuan for c in cars], dtype=np.float64)
    ids = np.array([c.id for c in cars], dtype=np.int64)
    on_sale = np.array([c.status == CarStatus.ON_SALE for c in cars])
    by_city = {c: np.flatnonzero(city_of == c) for c, _ in CITIES}
    brand_names = list(BRANDS)
    brand_p = _weights([BRANDS[b][0] for b in brand_names])
    city_names = [c for c, _ in CITIES]
    city_p = _weights([w for _, w in CITIES])

    customers: list[Customer] = []
    cols: tuple[list[int], list[int], list[int], list[float]] = ([], [], [], [])
    for k in range(n_customers):
        cid = first_customer_id + k
        city = city_names[int(rng.choice(len(city_names), p=city_p))]
        n_brands = 1 if rng.random() < 0.6 else 2
        brands = tuple(
            brand_names[int(i)] for i in rng.choice(len(brand_names), n_brands, False, brand_p)
        )
        lines = BRANDS[brands[0]][1]
        _, body, new_price = lines[int(rng.integers(len(lines)))]
        center = new_price * rng.uniform(0.35, 0.8)
        customers.append(Customer(cid, city, brands, body, center))
        local = by_city[city]
        local = local[on_sale[local]]
        match = local[
            (body_of[local] == int(body)) & (np.abs(np.log(price_of[local] / center)) < 0.3)
        ]
        branded = match[np.isin(brand_of[match], brands)]
        count = 2 + int(rng.poisson(mean_interactions - 2))
        t = NOW - timedelta(days=float(rng.uniform(5, 90)))
        for _ in range(count):
            r = rng.random()
            if r < match_share and len(match):
                pool = branded if len(branded) and rng.random() < 0.75 else match
            elif r < 0.97 or len(local) == 0:
                pool = local
            else:
                pool = np.flatnonzero(on_sale)
            if len(pool) == 0:
                continue
            p = appeal[pool] / appeal[pool].sum()
            car_i = int(pool[int(rng.choice(len(pool), p=p))])
            cols[0].append(cid)
            cols[1].append(int(ids[car_i]))
            cols[2].append(int(rng.choice(4, p=KIND_P)) + 1)
            cols[3].append(t.timestamp())
            t += timedelta(hours=float(rng.exponential(24)))
    return SyntheticData(
        cars,
        customers,
        np.array(cols[0], dtype=np.int64),
        np.array(cols[1], dtype=np.int64),
        np.array(cols[2], dtype=np.int8),
        np.array(cols[3], dtype=np.float64),
    )


@dataclass(frozen=True, slots=True)
class Case:
    query: RecommendQuery
    held_out: int


def leave_last_out(data: SyntheticData) -> tuple[npt.NDArray[np.bool_], list[Case]]:
    """Training mask (all but each customer's last interaction) and one case per customer
    whose last car is new to them and who has at least one earlier car."""
    keep = np.ones(len(data.customer), np.bool_)
    by_customer = {c.id: c for c in data.customers}
    cases: list[Case] = []
    starts = np.flatnonzero(np.r_[True, data.customer[1:] != data.customer[:-1]])
    ends = np.r_[starts[1:], len(data.customer)]
    for lo, hi in zip(starts.tolist(), ends.tolist(), strict=True):
        if hi - lo < 2:
            continue
        last = hi - 1
        earlier = list(dict.fromkeys(data.car_id[lo:last].tolist()))
        held = int(data.car_id[last])
        if held in earlier:
            continue
        keep[last] = False
        cust = by_customer[int(data.customer[lo])]
        query = RecommendQuery(
            count=10,
            intent_car_ids=tuple(earlier[-20:]),
            customer_id=cust.id,
            budget_min_yuan=int(cust.price_center * 0.75),
            budget_max_yuan=int(cust.price_center * 1.25),
            city=cust.city,
        )
        cases.append(Case(query, held))
    return keep, cases


def build_index(data: SyntheticData, keep: npt.NDArray[np.bool_]) -> CarIndex:
    index = CarIndex()
    index.bulk_load([(c, i + 1) for i, c in enumerate(data.cars)], data.arrays(keep), 0)
    return index


def _metrics(ranked: list[int], held_out: int) -> tuple[float, float]:
    if held_out in ranked[:10]:
        rank = ranked.index(held_out) + 1
        return 1.0, 1.0 / math.log2(rank + 1)
    return 0.0, 0.0


def evaluate(index: CarIndex, cases: list[Case], seed: int) -> dict[str, tuple[float, float]]:
    """Mean (hit@10, NDCG@10) per method."""
    hybrid = RankingConfig()
    only = {
        "content only": HybridWeights(content=1, cooccurrence=0, popularity=0),
        "co-occurrence only": HybridWeights(content=0, cooccurrence=1, popularity=0),
        "popularity": HybridWeights(content=0, cooccurrence=0, popularity=1),
    }
    configs = {"hybrid": hybrid, "hybrid, no brand cap": RankingConfig(max_per_brand=100)}
    configs.update({name: RankingConfig(weights=w, max_per_brand=100) for name, w in only.items()})
    rng = np.random.default_rng(seed)
    sums = {name: [0.0, 0.0] for name in [*configs, "random"]}
    for case in cases:
        for name, cfg in configs.items():
            result = ranking.recommend(index, cfg, case.query)
            hit, ndcg = _metrics([r.car.id for r in result.items], case.held_out)
            sums[name][0] += hit
            sums[name][1] += ndcg
        q = case.query
        lo, hi = ranking.budget_bounds(
            q.budget_min_yuan, q.budget_max_yuan, hybrid.budget_tolerance
        )
        excluded = {index.slot_of[c] for c in q.intent_car_ids}
        if q.customer_id is not None:
            excluded |= set(index.customer_cars(q.customer_id))
        cands = ranking.candidates(index, q.city, lo, hi, excluded)
        picked = rng.permutation(cands)[:10]
        hit, ndcg = _metrics([int(index.ids[s]) for s in picked], case.held_out)
        sums["random"][0] += hit
        sums["random"][1] += ndcg
    n = max(len(cases), 1)
    return {name: (h / n, g / n) for name, (h, g) in sums.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cars", type=int, default=6000, help="inventory size")
    ap.add_argument("--customers", type=int, default=4000, help="synthetic customers")
    ap.add_argument("--seed", type=int, default=20251123, help="random seed")
    ap.add_argument("--strict", action="store_true", help="exit 1 when the target is missed")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    data = generate(args.cars, args.customers, args.seed)
    keep, cases = leave_last_out(data)
    index = build_index(data, keep)
    t1 = time.perf_counter()
    results = evaluate(index, cases, args.seed + 1)
    t2 = time.perf_counter()
    print(
        f"eval: {len(data.cars)} cars, {len(data.customers)} customers, "
        f"{len(data.customer)} interactions, {len(cases)} leave-last-out cases "
        f"(seed {args.seed}; data+index {t1 - t0:.1f}s, ranking {t2 - t1:.1f}s)\n"
    )
    pop_hit = results["popularity"][0]
    print(f"{'method':<22}{'hit@10':>9}{'NDCG@10':>10}{'hit vs popularity':>20}")
    for name, (hit, ndcg) in results.items():
        ratio = f"{hit / pop_hit:.2f}x" if pop_hit > 0 else "-"
        print(f"{name:<22}{hit:>9.3f}{ndcg:>10.3f}{ratio:>20}")
    ok = results["hybrid"][0] >= 2 * pop_hit
    print(f"\ntarget hybrid hit@10 >= 2x popularity: {'ok' if ok else 'MISS'}")
    return 0 if ok or not args.strict else 1


if __name__ == "__main__":
    sys.exit(main())
