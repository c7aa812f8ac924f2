"""The structures and shortcuts that make Recommend fast give the same answers as the
plain way: price-sorted on-sale lists vs a mask over every car, the pruned content
scoring vs scoring every candidate, the chunked brand-capped walk vs a walk over the
whole rank order, the gathered co-occurrence rows vs row by row, and the in-place
response builder vs one message per car."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime

import numpy as np
import pytest
from crm.recommendation.v1 import recommendation_pb2 as pb
from crm_recommendation.api import convert
from crm_recommendation.config import ContentWeights, HybridWeights, RankingConfig
from crm_recommendation.domain import ranking
from crm_recommendation.domain.model import (
    BodyType,
    BusinessLine,
    Car,
    CarStatus,
    Interaction,
    InteractionKind,
    Reason,
    ReasonKind,
    Recommendations,
    RecommendQuery,
)
from crm_recommendation.index.car_index import CarIndex
from crm_recommendation.index.onsale import SortedKeys, price_key
from recommendation_testlib import SyntheticData, generate

CITIES = ["beijing", "shanghai", "chengdu", "nowhere"]


@pytest.fixture(scope="module")
def data() -> SyntheticData:
    return generate(3000, 1200, seed=11)


@pytest.fixture(scope="module")
def index(data: SyntheticData) -> CarIndex:
    ix = CarIndex()
    ix.bulk_load([(c, i + 1) for i, c in enumerate(data.cars)], data.arrays(), 0)
    return ix


def _naive_slots(ix: CarIndex, city: str | None, lo: float | None, hi: float | None) -> list[int]:
    n = ix.n
    keep = ix.on_sale[:n].copy()
    if city is not None:
        code = ix.cities.code.get(city, -2)
        keep &= ix.city[:n] == code
    if lo is not None:
        keep &= ix.price[:n] >= lo
    if hi is not None:
        keep &= ix.price[:n] <= hi
    return np.flatnonzero(keep).tolist()


def test_sorted_keys_follow_any_sequence_of_changes() -> None:
    rng = random.Random(1)
    keys = SortedKeys()
    model: set[int] = set()
    for step in range(3000):
        if model and rng.random() < 0.45:
            key = rng.choice(sorted(model))
            keys.remove(key)
            model.discard(key)
        else:
            key = price_key(rng.randrange(0, 500), rng.randrange(0, 200))
            if key not in model:
                keys.add(key)
                model.add(key)
        if step % 97 == 0:  # read in between: pending changes merged at odd moments
            assert keys.keys().tolist() == sorted(model)
    assert keys.keys().tolist() == sorted(model)
    assert len(keys) == len(model)
    by_price = sorted(model)
    lo, hi = 120.5, 333.0
    expected = sorted(k & 0xFFFFFFFF for k in by_price if lo <= k >> 32 <= hi)
    assert keys.slots_between(lo, hi).tolist() == expected
    assert keys.slots_between(None, None).tolist() == sorted(k & 0xFFFFFFFF for k in by_price)
    assert keys.slots_between(400, 100).tolist() == []
    with pytest.raises(ValueError, match="out of the key's range"):
        price_key(-1, 0)


def test_on_sale_lists_follow_car_changes(data: SyntheticData) -> None:
    """Re-priced, sold, put back on sale, moved between cities, stale rows: the slices
    equal a mask over every car after each batch."""
    ix = CarIndex()
    cars = list(data.cars[:800])
    ix.apply_cars((c, 1) for c in cars)
    rng = random.Random(2)
    seq = 1
    for _ in range(6):
        for _ in range(300):
            seq += 1
            car = rng.choice(cars)
            changed = replace(
                car,
                price_yuan=rng.randrange(10_000, 600_000),
                city=rng.choice(CITIES),
                status=rng.choice([CarStatus.ON_SALE, CarStatus.ON_SALE, CarStatus.SOLD]),
            )
            ix.upsert_car(changed, seq)
            ix.upsert_car(car, seq - 1)  # an older row arriving late changes nothing
        for city in [None, *CITIES, "atlantis"]:
            for lo, hi in ((None, None), (50_000.0, 200_000.5), (None, 90_000.0), (3e5, None)):
                got = ix.on_sale_slots(city, lo, hi).tolist()
                assert got == _naive_slots(ix, city, lo, hi)
    with pytest.raises(ValueError, match="out of range"):
        ix.upsert_car(replace(cars[0], price_yuan=2**31), seq + 1)


def _queries(data: SyntheticData, n: int, seed: int) -> list[RecommendQuery]:
    rng = random.Random(seed)
    ids = [c.id for c in data.cars]
    out = []
    for _ in range(n):
        lo = rng.choice([0, 0, rng.randrange(20_000, 300_000)])
        hi = rng.choice([0, lo + rng.randrange(0, 400_000)])
        out.append(
            RecommendQuery(
                count=rng.choice([1, 5, 20, 20, 40, 100]),
                intent_car_ids=tuple(rng.sample(ids, rng.randint(0, 4))),
                customer_id=rng.choice([None, rng.randint(1, 1200)]),
                budget_min_yuan=lo,
                budget_max_yuan=hi,
                city=rng.choice([None, None, *CITIES]),
                exclude_car_ids=frozenset(rng.sample(ids, rng.randint(0, 10))),
                business_line=rng.choice([None, BusinessLine.SALE]),
            )
        )
    return out


@pytest.mark.parametrize(
    "cfg",
    [
        RankingConfig(),
        RankingConfig(max_per_brand=1, history_cars=3),
        RankingConfig(
            weights=HybridWeights(content=1, cooccurrence=0, popularity=0),
            content=ContentWeights(price=3, year=0, mileage=0, brand=0.1, series=0, body_type=2),
            outside_budget_penalty=0,
        ),
    ],
    ids=["defaults", "one-per-brand", "content-only"],
)
def test_pruned_scoring_answers_like_scoring_every_candidate(
    index: CarIndex, data: SyntheticData, cfg: RankingConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    queries = _queries(data, 150, seed=3)
    monkeypatch.setattr(ranking, "_PRUNE_FROM", 10**12)  # never prune
    plain = [ranking.recommend(index, cfg, q) for q in queries]
    monkeypatch.setattr(ranking, "_PRUNE_FROM", 0)  # always prune
    pruned_cands = 0
    original = ranking._signals

    def counting(*args: object, **kwargs: object) -> object:
        nonlocal pruned_cands
        sig = original(*args, **kwargs)  # type: ignore[arg-type]
        if sig.at is not None:  # type: ignore[attr-defined]
            pruned_cands += len(args[2]) - len(sig.at)  # type: ignore[arg-type, attr-defined]
        return sig

    monkeypatch.setattr(ranking, "_signals", counting)
    for q, expected in zip(queries, plain, strict=True):
        assert ranking.recommend(index, cfg, q) == expected
    assert pruned_cands > 0  # the shortcut was taken, not just allowed


def _walk(index: CarIndex, cands: np.ndarray, score: np.ndarray, count: int, cap: int) -> list[int]:
    """The brand-capped walk over the whole rank order, as the ranking doc states it."""
    order = sorted(range(len(cands)), key=lambda i: (-score[i], int(index.ids[cands[i]])))
    chosen: list[int] = []
    passed: list[int] = []
    per: dict[int, int] = {}
    for i in order:
        b = int(index.brand[cands[i]])
        if per.get(b, 0) < cap:
            per[b] = per.get(b, 0) + 1
            chosen.append(i)
            if len(chosen) == count:
                return chosen
        else:
            passed.append(i)
    return chosen + passed[: count - len(chosen)]


def test_chunked_brand_walk_equals_the_whole_walk(index: CarIndex) -> None:
    rng = np.random.default_rng(4)
    everything = index.on_sale_slots(None, None, None)
    for trial in range(200):
        n = int(rng.integers(1, 1500))
        cands = np.sort(rng.choice(everything, n, replace=False))
        # coarse scores: many ties, broken by car id
        score = np.round(rng.random(n) * (3 if trial % 2 else 1000)) / 1000
        count = int(rng.integers(1, 60))
        cap = int(rng.integers(1, 5))
        got = ranking._select(index.ids[cands], index.brand[cands], score, count, cap)
        assert got == _walk(index, cands, score, count, cap)


def test_gathered_cooccurrence_rows_equal_row_by_row(data: SyntheticData) -> None:
    ix = CarIndex()
    half = len(data.customer) // 2
    ix.bulk_load([(c, i + 1) for i, c in enumerate(data.cars)], data.arrays(), 0)
    probe = CarIndex()
    probe.bulk_load(
        [(c, i + 1) for i, c in enumerate(data.cars)],
        tuple(a[:half] for a in data.arrays()),  # type: ignore[arg-type]
        0,
    )
    # the second half arrives incrementally: rows then live in base + overlay
    for c, car, k, t in zip(
        data.customer[half:], data.car_id[half:], data.kind[half:], data.t[half:], strict=True
    ):
        probe.add_interaction(
            Interaction(
                int(c), int(car), InteractionKind(int(k)), datetime.fromtimestamp(float(t), UTC)
            )
        )
    assert probe.pairs.delta_entries > 0
    rng = random.Random(5)
    for _ in range(50):
        slots = [rng.randrange(probe.n + 3) for _ in range(rng.randint(1, 15))]
        which, nbr, weight = probe.pairs.rows(slots)
        for i, s in enumerate(slots):
            row_nbr, row_weight = probe.pairs.row(s)
            assert nbr[which == i].tolist() == row_nbr.tolist()
            assert weight[which == i].tolist() == row_weight.tolist()
        _, _, cos = probe.cooccurrence_rows(slots)
        expected = [probe.cosine(slots[w], int(b)) for w, b in zip(which, nbr, strict=True)]
        assert np.allclose(cos, expected)
    # and the incremental index holds what the bulk one does, answers included
    for q in _queries(data, 40, seed=6):
        a = ranking.recommend(ix, RankingConfig(), q)
        b = ranking.recommend(probe, RankingConfig(), q)
        assert [r.car.id for r in a.items] == [r.car.id for r in b.items]


def test_in_place_response_equals_one_message_per_car(index: CarIndex, data: SyntheticData) -> None:
    for q in _queries(data, 30, seed=7):
        items = ranking.recommend(index, RankingConfig(), q).items
        built = pb.RecommendResponse()
        convert.add_recommendations(built.recommendations, items)
        plain = pb.RecommendResponse(recommendations=[convert.recommendation_pb(r) for r in items])
        assert built == plain
        assert [convert.recommendation_from_pb(m) for m in built.recommendations] == list(items)


def test_variants_map_back_to_their_codes() -> None:
    ix = CarIndex()
    cars = [
        Car(1, "BMW", "X5", 2020, 1, 300_000, "beijing", BodyType.SUV, CarStatus.ON_SALE),
        Car(2, "BMW", "X5", 2021, 1, 310_000, "beijing", BodyType.SUV, CarStatus.ON_SALE),
        Car(3, "BMW", "3 Series", 2021, 1, 210_000, "beijing", BodyType.SEDAN, CarStatus.SOLD),
        Car(4, "Audi", "X5", 2021, 1, 210_000, "wuhan", BodyType.SUV, CarStatus.ON_SALE),
    ]
    ix.apply_cars((c, c.id) for c in cars)
    brand, series, body = ix.variants()
    assert len(brand) == 3  # X5 SUV of BMW twice: one variant; Audi's "X5" is another
    for s in range(ix.n):
        v = int(ix.variant[s])
        assert (brand[v], series[v], body[v]) == (ix.brand[s], ix.series[s], ix.body[s])


def test_response_encoder_equals_the_plain_messages(index: CarIndex, data: SyntheticData) -> None:
    """The cached-bytes encoder gives the messages built field by field: for repeated
    answers (cache hits), after its cache starts over, and for a car changed under the same
    id (a new object: never the stale bytes)."""
    encoder = convert.ResponseEncoder(max_cars=50)
    results = [ranking.recommend(index, RankingConfig(), q) for q in _queries(data, 40, seed=8)]
    for result in [*results, *results]:
        got = encoder.recommend_response(result)
        expected = pb.RecommendResponse(
            recommendations=[convert.recommendation_pb(r) for r in result.items],
            ignored_intent_car_ids=result.ignored_intent_car_ids,
            data_sequence=result.data_sequence,
        )
        assert got == expected
        similar = encoder.similar_cars_response(result)
        assert list(similar.recommendations) == list(expected.recommendations)
    rec = next(r for res in results for r in res.items)
    changed = replace(rec, car=replace(rec.car, price_yuan=rec.car.price_yuan + 1, city="x" * 300))
    for item in (rec, changed, rec):
        one = Recommendations((item,), 1)
        assert encoder.recommend_response(one).recommendations[0] == convert.recommendation_pb(item)
    for value in [*range(0, 300), 16_383, 16_384, 2**21 - 1, 2**21, 2**35]:
        varint = convert._varint(value)
        assert _decode_varint(varint) == value


def test_packed_rank_order_equals_the_two_key_sort() -> None:
    """The one-key order (score desc, car id asc; excluded cars, -inf, last) and the top m
    by argpartition equal the two-key lexsort, with many ties and excluded cars."""
    rng = np.random.default_rng(11)
    for trial in range(300):
        n = int(rng.integers(1, 3000))
        ids = rng.choice(2**40, n, replace=False).astype(np.int64)
        score = np.round(rng.random(n) * (3 if trial % 2 else 1000)) / 1000
        score[rng.random(n) < 0.1] = -np.inf
        expected = np.lexsort((ids, -score))
        assert (ranking._rank_order(ids, score, True) == expected).all()
        m = int(rng.integers(1, n + 1))
        assert (ranking._top(ids, score, None, m) == expected[:m]).all()


def test_reason_bytes_equal_protobufs() -> None:
    """A reason written directly is byte for byte what protobuf serializes, defaults
    (0, "") left out, non-ASCII text, long text and large ids included."""
    texts = ["", "popular in 上海", "x" * 200, "within budget (1-2 yuan)"]
    for kind in ReasonKind:
        for text in texts:
            for related in (0, 1, 127, 128, 2**35, 2**63 - 1):
                reason = Reason(kind, text, related)
                body = convert.reason_pb(reason).SerializeToString()
                expected = b"\x1a" + convert._varint(len(body)) + body
                assert convert._reason_field(reason) == expected


def _decode_varint(data: bytes) -> int:
    value = 0
    for i, byte in enumerate(data):
        value |= (byte & 0x7F) << (7 * i)
        assert (byte & 0x80) == (0 if i == len(data) - 1 else 0x80)
    return value
