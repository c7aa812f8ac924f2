"""Persistence and replicas: restart on the same database gives the same answers, two
instances converge after writes on either, ranking weights change live through etcd."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from crm.recommendation.v1 import recommendation_pb2 as pb
from crm_common.config_watch import put_json
from crm_devstack import wait_until
from crm_recommendation.store.migrate import downgrade, upgrade
from recommendation_testlib import (
    ASKED,
    CALLED,
    SOLD,
    SUV,
    VIEWED,
    VISITED,
    Service,
    car,
    fleet,
    settings_for,
)
from sqlalchemy import create_engine, inspect

QUERIES = [
    {"intent_car_ids": [1], "city": "beijing"},
    {"intent_car_ids": [40, 41], "budget_min_yuan": 100_000, "budget_max_yuan": 200_000},
    {"customer_id": 1, "count": 20},
    {"customer_id": 2, "intent_car_ids": [20], "city": "shanghai", "count": 5},
    {"count": 30},
]


def _answers(svc: Service) -> list[list[tuple[int, float, tuple[tuple[int, str], ...]]]]:
    out = []
    for q in QUERIES:
        resp = svc.recommend(**q)
        out.append(
            [
                (r.car.id, r.score, tuple((x.kind, x.text) for x in r.reasons))
                for r in resp.recommendations
            ]
        )
    out.append([(r.car.id, r.score, ()) for r in svc.similar(7, 15).recommendations])
    return out


def _populate(svc: Service) -> None:
    svc.upsert(*fleet())
    kinds = [VIEWED, ASKED, CALLED, VISITED]
    for customer in range(1, 30):
        for k, car_id in enumerate((customer % 12 + 1, customer % 12 + 2, customer % 7 + 30)):
            svc.interact(customer, car_id, kinds[(customer + k) % 4])
    svc.upsert(car(3, status=SOLD), car(100, "Volvo", "XC60", price=280_000, body=SUV))


@pytest.fixture
def pair(
    migrated_db: str, etcd_endpoint: str, config_prefix: str
) -> Iterator[tuple[Service, Service]]:
    a = Service(settings_for(migrated_db, etcd_endpoint, config_prefix))
    b = Service(settings_for(migrated_db, etcd_endpoint, config_prefix))
    yield a, b
    a.close()
    b.close()


def test_restart_on_the_same_database_gives_the_same_answers(
    migrated_db: str, etcd_endpoint: str, config_prefix: str
) -> None:
    settings = settings_for(migrated_db, etcd_endpoint, config_prefix)
    first = Service(settings)
    try:
        _populate(first)
        before = _answers(first)
        sequence = first.recommend().data_sequence
    finally:
        first.close()
    assert any(before)
    assert all(len(a) > 0 for a in before)
    second = Service(settings)
    try:
        assert second.recommend().data_sequence >= sequence
        assert _answers(second) == before
    finally:
        second.close()


def test_two_instances_converge(pair: tuple[Service, Service]) -> None:
    a, b = pair
    _populate(a)
    wait_until(lambda: _answers(a) == _answers(b), "b to follow a's writes")
    # a write on b: a converges too (and b answered right away)
    b.upsert(car(200, "BMW", "3 Series", price=221_000))
    assert 200 in [r.car.id for r in b.recommend(intent_car_ids=[1], count=50).recommendations]
    for customer in (1, 2, 3):
        b.interact(customer, 200, VISITED)
    wait_until(lambda: _answers(a) == _answers(b), "a to follow b's writes")
    # b applied its own writes at once; its watermark catches up at its next poll
    wait_until(
        lambda: a.recommend().data_sequence == b.recommend().data_sequence,
        "both watermarks to reach the same sequence",
    )
    # a sold car disappears from both
    a.upsert(car(200, "BMW", "3 Series", price=221_000, status=SOLD))

    def gone() -> bool:
        for svc in (a, b):
            ids = [r.car.id for r in svc.recommend(intent_car_ids=[1], count=50).recommendations]
            if 200 in ids:
                return False
        return True

    wait_until(gone, "the sold car to leave both replicas")


def test_ranking_weights_change_live(service: Service, etcd_endpoint: str) -> None:
    _populate(service)
    query = {"intent_car_ids": [13], "city": "beijing", "count": 10}
    default = [r.car.id for r in service.recommend(**query).recommendations]
    brands = [r.car.brand for r in service.recommend(**query).recommendations]
    assert max(brands.count(b) for b in set(brands)) <= 3  # default max_per_brand
    key = service.settings.recommendation_config_prefix + "ranking"
    popular_only = {
        "weights": {"content": 0, "cooccurrence": 0, "popularity": 1},
        "max_per_brand": 1,
    }
    asyncio.run(put_json(etcd_endpoint, key, popular_only))

    def changed() -> list[pb.Recommendation] | None:
        recs = list(service.recommend(**query).recommendations)
        return recs if [r.car.id for r in recs] != default else None

    recs = wait_until(changed, "the new weights to apply")
    # max_per_brand 1: one car of each of the 5 brands first, then the rest in rank order
    assert len({r.car.brand for r in recs[:5]}) == 5
    assert recs[0].reasons[0].kind == pb.REASON_KIND_POPULAR
    # a bad value is rejected: the last good config stays
    asyncio.run(put_json(etcd_endpoint, key, {"max_per_brand": 0}))
    asyncio.run(put_json(etcd_endpoint, service.settings.recommendation_config_prefix + "x", {}))
    wait_until(lambda: "ranking" in service.app.watcher.rejected, "the rejection")
    assert [r.car.id for r in service.recommend(**query).recommendations] == [
        r.car.id for r in recs
    ]


def test_migration_downgrade_and_upgrade(mysql_database: str) -> None:
    upgrade(mysql_database)
    engine = create_engine(mysql_database)
    try:
        assert {"car", "interaction", "change_sequence"} <= set(inspect(engine).get_table_names())
        downgrade(mysql_database, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        upgrade(mysql_database)
        assert "interaction" in inspect(engine).get_table_names()
    finally:
        engine.dispose()
