"""The service starts, serves health, stores cars and ranks them."""

from __future__ import annotations

from crm_devstack import wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc
from recommendation_testlib import Service, car


def test_serving_and_round_trip(service: Service) -> None:
    health = health_pb2_grpc.HealthStub(service.channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    wait_until(
        lambda: health.Check(health_pb2.HealthCheckRequest(service="")).status == serving,
        "health SERVING",
    )

    resp = service.upsert(car(1), car(2, series="X3"), car(3, "Audi", "A4L"))
    assert (resp.created_count, resp.updated_count) == (3, 0)
    resp = service.upsert(car(1, price=210_000))
    assert (resp.created_count, resp.updated_count) == (0, 1)

    recs = service.recommend(intent_car_ids=[2], city="beijing").recommendations
    assert [r.car.id for r in recs][:1] == [1]
    assert recs[0].car.price_yuan == 210_000
    assert recs[0].reasons[0].text == "same brand as the BMW X3 asked about"
