"""A business line as data: with require_line_config a line opens when its config key
appears in etcd (live, no restart) and closes when it is removed or disabled."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from assignment_testlib import (
    FINANCE,
    SALE,
    ManualClock,
    OfferReader,
    Service,
    rpc_error,
    settings_for,
)
from crm.assignment.v1 import assignment_pb2 as pb
from crm_assignment.config import LineConfig, RoutingConfig
from crm_assignment.domain.model import BusinessLine
from crm_common.config_watch import delete_key, put_json
from crm_common.errors import error_reason


def _put(svc: Service, key: str, value: object) -> None:
    settings = svc.settings
    rev = svc.call(
        put_json(settings.etcd_endpoints, settings.assignment_config_prefix + key, value)
    )
    svc.call(svc.app.watcher.wait_for_revision(rev, 10))


def _delete(svc: Service, key: str) -> None:
    settings = svc.settings
    rev = svc.call(delete_key(settings.etcd_endpoints, settings.assignment_config_prefix + key))
    svc.call(svc.app.watcher.wait_for_revision(rev, 10))


@pytest.fixture
def strict(migrated_db: str, etcd_endpoint: str, config_prefix: str) -> Iterator[Service]:
    svc = Service(
        settings_for(migrated_db, etcd_endpoint, config_prefix, require_line_config=True),
        ManualClock(),
    )
    yield svc
    svc.close()


def test_is_open_rules() -> None:
    lines = {"SALE": LineConfig(), "AFTER_SALE": LineConfig(enabled=False)}
    strict = RoutingConfig.from_values(lines, 3, require_line_config=True)
    lax = RoutingConfig.from_values(lines, 3)
    assert [strict.is_open(b) for b in BusinessLine] == [True, False, False]
    assert [lax.is_open(b) for b in BusinessLine] == [True, False, True]


def test_a_line_opens_when_its_config_appears(strict: Service) -> None:
    strict.agent(31, line=FINANCE)
    reader = OfferReader(strict.stub, 31)
    try:
        err = rpc_error(lambda: strict.clue("fin-1", "13800001234", business_line=FINANCE))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_reason(err) == "LINE_CLOSED"
        assert "FINANCE" in (err.details() or "")
        _put(strict, "FINANCE", {"accept_timeout_s": 20})
        task = strict.clue("fin-1", "13800001234", business_line=FINANCE).task
        offer = reader.next()  # the waiting agent gets it, no restart
        assert offer.task.id == task.id
        assert offer.task.business_line == FINANCE
    finally:
        reader.close()


def test_a_disabled_or_removed_line_takes_no_clues_and_offers_nothing(strict: Service) -> None:
    _put(strict, "SALE", {})
    waiting = strict.clue("s-1", "13800005678").task.id
    _put(strict, "SALE", {"enabled": False})
    err = rpc_error(lambda: strict.clue("s-2", "13800005679"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    strict.agent(41, line=SALE)
    reader = OfferReader(strict.stub, 41)
    try:
        # the agent is idle, the task waits: dispatch offers nothing while the line is closed
        app = strict.app
        assert app.store.offer_next(41, strict.clock(), app.routing()) is None
        assert strict.stub.GetAgent(pb.GetAgentRequest(id=41)).agent.active_tasks == 0
        assert reader.offers.empty()
        _put(strict, "SALE", {"enabled": True})
        assert reader.next().task.id == waiting
        _delete(strict, "SALE")
        err = rpc_error(lambda: strict.clue("s-3", "13800005680"))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        reader.close()


def test_without_the_setting_lines_use_defaults(service: Service) -> None:
    assert service.clue("d-1", "13800009999", business_line=FINANCE).task.id > 0
