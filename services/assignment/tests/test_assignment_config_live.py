"""Routing config from etcd applies live; an invalid value is rejected, the last good kept."""

from __future__ import annotations

from datetime import timedelta

from assignment_testlib import ManualClock, OfferReader, Service, put_config
from crm.assignment.v1 import assignment_pb2 as pb
from crm_assignment.domain.model import BusinessLine


def test_live_weights_and_accept_timeout(service: Service, clock: ManualClock) -> None:
    service.agent(1, capacity=3, brands=("BMW",))
    put_config(service, "SALE", {"weights": {"brand_match": 1000}, "accept_timeout_s": 12})
    routing = service.app.routing()
    assert routing.line(BusinessLine.SALE).weights.brand_match == 1000
    assert routing.version > 0

    high = service.clue("lc-1", "13800138600", priority=9).task.id
    bmw = service.clue("lc-2", "13800138601", priority=1, brands=["BMW"]).task.id
    reader = OfferReader(service.stub, 1)
    try:
        first = reader.next()
        assert first.task.id == bmw  # 100 + 1000 > 900
        assert first.deadline.ToDatetime() == (clock() + timedelta(seconds=12)).replace(tzinfo=None)
        assert reader.next().task.id == high

        # invalid values are rejected; the last good config stays
        put_config(service, "SALE", {"accept_timeout_s": 0})
        put_config(service, "SALE", {"weights": {"brand_match": 1}, "surprise": True})
        put_config(service, "RETAIL", {})
        assert {"SALE", "RETAIL"} <= set(service.app.watcher.rejected)
        sale = service.app.routing().line(BusinessLine.SALE)
        assert sale.accept_timeout_s == 12
        assert sale.weights.brand_match == 1000

        # a good value again: the next offer uses it without a restart
        put_config(service, "SALE", {"accept_timeout_s": 5})
        assert "SALE" not in service.app.watcher.rejected
        third = service.clue("lc-3", "13800138602").task.id
        offer = reader.next()
        assert offer.task.id == third
        assert offer.deadline.ToDatetime() == (clock() + timedelta(seconds=5)).replace(tzinfo=None)
    finally:
        reader.close()


def test_live_source_priority(service: Service) -> None:
    put_config(
        service, "AFTER_SALE", {"source_priority": {"400-hotline": 8}, "default_priority": 2}
    )
    hot = service.clue("sp-1", "13800138700", business_line=2, source="400-hotline")
    web = service.clue("sp-2", "13800138701", business_line=2, source="web")
    explicit = service.clue("sp-3", "13800138702", business_line=2, source="web", priority=6)
    assert (hot.task.priority, web.task.priority, explicit.task.priority) == (8, 2, 6)
    sale = service.clue("sp-4", "13800138703", source="400-hotline")
    assert sale.task.priority == 5  # the SALE line keeps its defaults
    assert service.task(hot.task.id).task.business_line == pb.Task().business_line + 2
