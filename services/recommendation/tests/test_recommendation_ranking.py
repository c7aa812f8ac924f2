"""Ranking rules on the in-memory index (no database): hard filters, brand diversity,
reasons backed by the data, determinism across replicas, incremental == bulk."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from crm_recommendation.config import HybridWeights, RankingConfig, parse
from crm_recommendation.domain import ranking
from crm_recommendation.domain.model import (
    BodyType,
    BusinessLine,
    Car,
    CarStatus,
    Interaction,
    InteractionKind,
    ReasonKind,
    Recommendations,
    RecommendQuery,
)
from crm_recommendation.index.car_index import CarIndex
from pydantic import ValidationError
from recommendation_testlib import SyntheticData, generate

CITIES = ["beijing", "shanghai", "chengdu", "nowhere"]


@pytest.fixture(scope="module")
def data() -> SyntheticData:
    return generate(1500, 600, seed=7)


def _interactions(data: SyntheticData) -> list[Interaction]:
    return [
        Interaction(
            int(c), int(car), InteractionKind(int(k)), datetime.fromtimestamp(float(t), UTC), i + 1
        )
        for i, (c, car, k, t) in enumerate(
            zip(data.customer, data.car_id, data.kind, data.t, strict=True)
        )
    ]


@pytest.fixture(scope="module")
def index(data: SyntheticData) -> CarIndex:
    ix = CarIndex()
    ix.bulk_load([(c, i + 1) for i, c in enumerate(data.cars)], data.arrays(), 0)
    return ix


def _queries(data: SyntheticData, n: int, seed: int) -> list[RecommendQuery]:
    rng = random.Random(seed)
    ids = [c.id for c in data.cars]
    out = []
    for _ in range(n):
        lo = rng.choice([0, 0, rng.randrange(20_000, 300_000)])
        hi = rng.choice([0, lo + rng.randrange(0, 400_000)])
        out.append(
            RecommendQuery(
                count=rng.randint(1, 40),
                intent_car_ids=(*tuple(rng.sample(ids, rng.randint(0, 4))), 10**9),
                customer_id=rng.choice([None, rng.randint(1, 600)]),
                budget_min_yuan=lo,
                budget_max_yuan=hi,
                city=rng.choice([None, *CITIES]),
                exclude_car_ids=frozenset(rng.sample(ids, rng.randint(0, 30))),
                business_line=rng.choice([None, BusinessLine.SALE]),
            )
        )
    return out


def _check_filters(index: CarIndex, cfg: RankingConfig, q: RecommendQuery) -> Recommendations:
    result = ranking.recommend(index, cfg, q)
    lo, hi = ranking.budget_bounds(q.budget_min_yuan, q.budget_max_yuan, cfg.budget_tolerance)
    seen = {int(index.ids[s]) for s in index.customer_cars(q.customer_id or 0)}
    got = [r.car.id for r in result.items]
    assert len(got) == len(set(got)) <= q.count
    for rec in result.items:
        car = rec.car
        assert car.status == CarStatus.ON_SALE
        assert q.city is None or car.city == q.city
        assert lo is None or car.price_yuan >= lo
        assert hi is None or car.price_yuan <= hi
        assert car.id not in q.exclude_car_ids
        assert car.id not in q.intent_car_ids
        assert car.id not in seen
        assert rec.reasons
        assert 0.0 <= rec.score <= 1.0
    assert 10**9 in result.ignored_intent_car_ids
    return result


def test_hard_filters_are_never_violated(index: CarIndex, data: SyntheticData) -> None:
    cfg = RankingConfig(budget_tolerance=0.05)
    for q in _queries(data, 300, seed=1):
        _check_filters(index, cfg, q)


def test_fills_up_to_count_when_enough_candidates(index: CarIndex) -> None:
    q = RecommendQuery(count=100, city="beijing")
    result = ranking.recommend(index, RankingConfig(), q)
    available = len(ranking.candidates(index, "beijing", None, None, set()))
    assert len(result.items) == min(100, available)


def test_order_is_score_then_car_id(index: CarIndex, data: SyntheticData) -> None:
    cfg = RankingConfig(max_per_brand=100)  # no diversity fill: pure order
    for q in _queries(data, 100, seed=2):
        items = ranking.recommend(index, cfg, q).items
        keys = [(-r.score, r.car.id) for r in items]
        assert keys == sorted(keys)


def test_brand_diversity(index: CarIndex, data: SyntheticData) -> None:
    for per_brand in (1, 2, 3):
        cfg = RankingConfig(max_per_brand=per_brand)
        for q in _queries(data, 100, seed=3):
            items = ranking.recommend(index, cfg, q).items
            counts: dict[str, int] = {}
            for rec in items:
                counts[rec.car.brand] = counts.get(rec.car.brand, 0) + 1
            if any(n > per_brand for n in counts.values()):
                # allowed only when the capped brands cannot fill the answer
                everything = RecommendQuery(**{**_fields(q), "count": 10**6})
                available: dict[str, int] = {}
                for rec in ranking.recommend(index, cfg, everything).items:
                    available[rec.car.brand] = available.get(rec.car.brand, 0) + 1
                assert sum(min(per_brand, n) for n in available.values()) < q.count
                assert len(items) == min(q.count, sum(available.values()))


def test_brand_cap_relaxed_when_one_brand_only() -> None:
    ix = CarIndex()
    cars = [
        Car(i, "BMW", "3 Series", 2019, 10_000, 200_000 + i, "beijing", BodyType.SEDAN,
            CarStatus.ON_SALE)
        for i in range(1, 8)
    ]  # fmt: skip
    ix.apply_cars((c, c.id) for c in cars)
    items = ranking.recommend(ix, RankingConfig(max_per_brand=2), RecommendQuery(count=5)).items
    assert len(items) == 5


def test_reasons_match_the_data(index: CarIndex, data: SyntheticData) -> None:
    cfg = RankingConfig()
    by_id = {c.id: c for c in data.cars}
    kinds: set[ReasonKind] = set()
    for q in _queries(data, 200, seed=4):
        history = {int(index.ids[s]) for s in index.customer_cars(q.customer_id or 0)}
        seeds = set(q.intent_car_ids) | history
        for rec in ranking.recommend(index, cfg, q).items:
            car = rec.car
            for reason in rec.reasons:
                kinds.add(reason.kind)
                related = by_id.get(reason.related_car_id)
                if reason.kind == ReasonKind.SAME_SERIES:
                    assert related is not None
                    assert reason.related_car_id in seeds
                    assert (related.brand, related.series) == (car.brand, car.series)
                    assert related.title in reason.text
                elif reason.kind == ReasonKind.SAME_BRAND:
                    assert related is not None
                    assert reason.related_car_id in seeds
                    assert related.brand == car.brand
                    assert related.series != car.series
                elif reason.kind == ReasonKind.SIMILAR_CAR:
                    assert related is not None
                    assert related.body_type == car.body_type
                elif reason.kind == ReasonKind.WITHIN_BUDGET:
                    assert q.budget_min_yuan <= car.price_yuan
                    assert q.budget_max_yuan == 0 or car.price_yuan <= q.budget_max_yuan
                elif reason.kind == ReasonKind.NEAR_BUDGET:
                    assert car.price_yuan < q.budget_min_yuan or (
                        0 < q.budget_max_yuan < car.price_yuan
                    )
                elif reason.kind == ReasonKind.POPULAR:
                    assert np.isfinite(index.logpop[index.slot_of[car.id]])
                    assert reason.text == f"popular in {car.city}"
                elif reason.kind == ReasonKind.ALSO_INTERESTED:
                    assert related is not None
                    assert reason.related_car_id in seeds
                    both = (
                        [
                            c
                            for c in set(data.customer.tolist())
                            if {related.id, car.id} <= set(data.car_id[data.customer == c].tolist())
                        ]
                        if len(kinds) < 3
                        else [1]
                    )  # (expensive; checked on the first ones)
                    assert both
                    assert index.cosine(index.slot_of[related.id], index.slot_of[car.id]) > 0
    assert {ReasonKind.SAME_SERIES, ReasonKind.WITHIN_BUDGET, ReasonKind.POPULAR} <= kinds
    assert ReasonKind.ALSO_INTERESTED in kinds


def test_no_signal_gives_the_on_sale_reason() -> None:
    ix = CarIndex()
    ix.upsert_car(
        Car(1, "BYD", "Han", 2021, 5_000, 180_000, "xian", BodyType.SEDAN, CarStatus.ON_SALE), 1
    )
    (rec,) = ranking.recommend(ix, RankingConfig(), RecommendQuery(count=3)).items
    assert [(r.kind, r.text) for r in rec.reasons] == [(ReasonKind.ON_SALE, "on sale in xian")]


def test_replicas_applying_in_any_order_answer_identically(data: SyntheticData) -> None:
    """Bulk load vs. one-by-one in a shuffled order, with car rewrites arriving late."""
    bulk = CarIndex(max_customer_cars=5)
    bulk.bulk_load([(c, i + 1) for i, c in enumerate(data.cars)], data.arrays(), 0)
    shuffled = CarIndex(max_customer_cars=5)
    cars = [(c, i + 1) for i, c in enumerate(data.cars)]
    interactions = _interactions(data)
    rng = random.Random(5)
    rng.shuffle(cars)
    rng.shuffle(interactions)
    # interactions may arrive before their car; an old version of a car after the new one
    shuffled.apply_interactions(interactions[: len(interactions) // 2])
    shuffled.apply_cars(cars)
    stale = [(c, 0) for c, _ in cars[:50]]
    assert shuffled.apply_cars(stale) == 0
    shuffled.apply_interactions(interactions)  # the first half again: applied once
    for q in _queries(data, 150, seed=6):
        a = ranking.recommend(bulk, RankingConfig(), q)
        b = ranking.recommend(shuffled, RankingConfig(), q)
        assert a.items == b.items


def test_incremental_cooccurrence_equals_bulk(data: SyntheticData) -> None:
    limit = 4  # small: many customers cross it one way or the other
    bulk = CarIndex(max_customer_cars=limit)
    bulk.bulk_load([(c, i + 1) for i, c in enumerate(data.cars)], data.arrays(), 0)
    inc = CarIndex(max_customer_cars=limit)
    inc.apply_cars((c, i + 1) for i, c in enumerate(data.cars))
    inc.apply_interactions(_interactions(data))
    n = bulk.n
    assert inc.n == n
    order = np.argsort(inc.ids[:n])
    border = np.argsort(bulk.ids[:n])
    assert np.array_equal(inc.sq_norm[:n][order], bulk.sq_norm[:n][border])
    for s in range(0, n, 7):
        car_id = int(bulk.ids[s])
        t = inc.slot_of[car_id]
        nb_b, w_b = bulk.pairs.row(s)
        nb_i, w_i = inc.pairs.row(t)
        got_b = dict(zip(bulk.ids[nb_b].tolist(), w_b.tolist(), strict=True))
        got_i = dict(zip(inc.ids[nb_i].tolist(), w_i.tolist(), strict=True))
        assert got_b == got_i
    # compaction keeps the same weights
    frozen = inc.pairs.begin_compaction()
    assert frozen is not None
    inc.pairs.finish_compaction(inc.pairs.merged(*frozen, inc.n))
    for s in range(0, n, 11):
        nb_b, w_b = bulk.pairs.row(s)
        t = inc.slot_of[int(bulk.ids[s])]
        nb_i, w_i = inc.pairs.row(t)
        assert dict(zip(bulk.ids[nb_b].tolist(), w_b.tolist(), strict=True)) == dict(
            zip(inc.ids[nb_i].tolist(), w_i.tolist(), strict=True)
        )


def test_popularity_prefers_recent_interactions() -> None:
    ix = CarIndex(half_life_days=7)
    now = datetime(2025, 6, 1, tzinfo=UTC)
    for i in (1, 2):
        ix.upsert_car(
            Car(i, "Geely", "Boyue", 2020, 30_000, 90_000, "wuhan", BodyType.SUV,
                CarStatus.ON_SALE), i,
        )  # fmt: skip
    for k in range(3):  # three old visits to car 1, one fresh view of car 2
        ix.add_interaction(
            Interaction(10 + k, 1, InteractionKind.VISITED, now - timedelta(days=60))
        )
    ix.add_interaction(Interaction(20, 2, InteractionKind.VIEWED, now))
    cfg = RankingConfig(weights=HybridWeights(content=0, cooccurrence=0, popularity=1))
    items = ranking.recommend(ix, cfg, RecommendQuery(count=2)).items
    assert [r.car.id for r in items] == [2, 1]
    assert items[0].score == 1.0


def test_business_line_weights(index: CarIndex, data: SyntheticData) -> None:
    only_popular = {"content": 0, "cooccurrence": 0, "popularity": 1}
    cfg = parse(
        "ranking",
        json.dumps(
            {
                "lines": {
                    "FINANCE": only_popular,
                    "LEASING": {"code": 4, **only_popular},  # lines are data: a name + code
                    "5": only_popular,  # or a code
                }
            }
        ).encode(),
    )
    q = RecommendQuery(count=10, intent_car_ids=(data.cars[0].id,), city=data.cars[0].city)
    popularity = ranking.recommend(
        index,
        RankingConfig(weights=HybridWeights(content=0, cooccurrence=0, popularity=1)),
        q,
    )
    for line in (BusinessLine.FINANCE, BusinessLine(4), BusinessLine(5)):
        by_line = ranking.recommend(
            index, cfg, RecommendQuery(**{**_fields(q), "business_line": line})
        )
        assert by_line.items == popularity.items
    assert ranking.recommend(index, cfg, q).items != popularity.items
    other = RecommendQuery(**{**_fields(q), "business_line": BusinessLine(6)})
    assert ranking.recommend(index, cfg, other).items == ranking.recommend(index, cfg, q).items


def _fields(q: RecommendQuery) -> dict[str, object]:
    return {f: getattr(q, f) for f in q.__slots__}  # type: ignore[attr-defined]


def test_similar_cars(index: CarIndex, data: SyntheticData) -> None:
    car = data.cars[3]
    items = ranking.similar_cars(index, RankingConfig(), car.id, 20).items
    assert items
    assert all(r.car.id != car.id and r.car.status == CarStatus.ON_SALE for r in items)
    assert items[0].car.brand == car.brand
    with pytest.raises(Exception, match="not in the inventory"):
        ranking.similar_cars(index, RankingConfig(), 10**9, 5)


def test_config_is_strict() -> None:
    assert parse("ranking", b'{"max_per_brand": 2}').max_per_brand == 2
    with pytest.raises(ValidationError):
        parse("ranking", b'{"max_per_brand": 2, "surprise": 1}')
    with pytest.raises(ValidationError):
        parse("ranking", b'{"weights": {"content": 0, "cooccurrence": 0, "popularity": 0}}')
    with pytest.raises(ValidationError):
        parse("ranking", b'{"budget_tolerance": 1.5}')
    for lines in [
        {"MARKETING": {}},  # a line that is not well known needs its code
        {"MARKETING": {"code": 0}},
        {"FINANCE": {"code": 4}},  # FINANCE is 3
        {"4": {"code": 5}},
        {"marketing": {"code": 4}},
        {"0": {}},
        {"LEASING": {"code": 4}, "4": {}},  # one line twice
    ]:
        with pytest.raises(ValidationError) as exc:
            parse("ranking", json.dumps({"lines": lines}).encode())
        assert exc.value.errors()[0]["loc"][0] == "lines", lines
    assert parse("ranking", b'{"lines": {"SALE": {"code": 1}}}').lines_by_code.keys() == {1}
    with pytest.raises(ValueError, match="unknown config key"):
        parse("weights", b"{}")
