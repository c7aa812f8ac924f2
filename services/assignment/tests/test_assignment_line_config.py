"""A business line as data: with require_line_config a line opens when its config key
appears in etcd (live, no restart) and closes when it is removed or disabled."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import datetime

import grpc
import pytest
from assignment_testlib import (
    FINANCE,
    SALE,
    ManualClock,
    OfferReader,
    Service,
    delete_config,
    put_config,
    settings_for,
)
from crm.assignment.v1 import assignment_pb2 as pb
from crm_assignment.config import LineConfig, RoutingConfig
from crm_assignment.domain.model import BusinessLine
from crm_assignment.store import AssignmentStore
from crm_assignment.store.dispatching import DispatchResult
from crm_common.errors import error_reason
from crm_common.tracing import RequestOrigin
from crm_devstack import wait_until
from crm_devstack.apps import rpc_error


def test_is_open_rules() -> None:
    lines = {"SALE": LineConfig(), "AFTER_SALE": LineConfig(enabled=False)}
    strict = RoutingConfig.from_values(lines, 3, require_line_config=True)
    lax = RoutingConfig.from_values(lines, 3)
    well_known = BusinessLine.well_known_lines()
    assert [strict.is_open(b) for b in well_known] == [True, False, False]
    assert [lax.is_open(b) for b in well_known] == [True, False, True]


def test_a_line_opens_when_its_config_appears(strict: Service) -> None:
    strict.agent(31, line=FINANCE)
    reader = OfferReader(strict.stub, 31)
    try:
        err = rpc_error(lambda: strict.clue("fin-1", "13800001234", business_line=FINANCE))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_reason(err) == "LINE_CLOSED"
        assert "FINANCE" in (err.details() or "")
        put_config(strict, "FINANCE", {"accept_timeout_s": 20})
        task = strict.clue("fin-1", "13800001234", business_line=FINANCE).task
        offer = reader.next()  # the waiting agent gets it, no restart
        assert offer.task.id == task.id
        assert offer.task.business_line == FINANCE
    finally:
        reader.close()


def test_a_disabled_or_removed_line_takes_no_clues_and_offers_nothing(strict: Service) -> None:
    put_config(strict, "SALE", {})
    waiting = strict.clue("s-1", "13800005678").task.id
    put_config(strict, "SALE", {"enabled": False})
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
        put_config(strict, "SALE", {"enabled": True})
        assert reader.next().task.id == waiting
        delete_config(strict, "SALE")
        err = rpc_error(lambda: strict.clue("s-3", "13800005680"))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        reader.close()


def test_without_the_setting_lines_use_defaults(service: Service) -> None:
    assert service.clue("d-1", "13800009999", business_line=FINANCE).task.id > 0


class _GatedDispatch:
    """The service's real store behind a gate: a dispatch batch that has read its routing
    config (when the batch started) waits for the test before it runs, so a config change
    lands while the batch is being written."""

    def __init__(self, store: AssignmentStore) -> None:
        self._store = store
        self.entered = threading.Event()
        self.gate = threading.Event()

    def dispatch_many(
        self,
        agent_ids: Sequence[int],
        now: datetime,
        routing: RoutingConfig,
        origins: Sequence[RequestOrigin] | None = None,
        /,
    ) -> list[DispatchResult]:
        self.entered.set()
        self.gate.wait(30)
        return self._store.dispatch_many(agent_ids, now, routing, origins)


@pytest.mark.parametrize("when", ["while-dispatching", "while-waiting"])
def test_re_enabling_a_line_wakes_its_offer_streams(
    migrated_db: str, etcd_endpoint: str, config_prefix: str, when: str
) -> None:
    """The stream of an agent of a disabled line is woken when the line is enabled again,
    whether it waits for work or is inside a dispatch batch that read the old config (it
    must ask again, and at once: the batch's lane is gone by then). An idle stream does not
    poll here (60 s): only the wake-up can deliver the offer in time."""
    svc = Service(
        settings_for(
            migrated_db, etcd_endpoint, config_prefix, require_line_config=True, dispatch_poll_s=60
        ),
        ManualClock(),
    )
    reader: OfferReader | None = None
    try:
        put_config(svc, "SALE", {})
        waiting = svc.clue("w-1", "13800007001").task.id
        put_config(svc, "SALE", {"enabled": False})
        svc.agent(51, line=SALE)
        gated = _GatedDispatch(svc.app.store)
        dispatcher = svc.app.servicer.dispatcher
        dispatcher._store = gated  # the gate is the point of this test
        if when == "while-waiting":
            gated.gate.set()
        reader = OfferReader(svc.stub, 51)
        assert gated.entered.wait(15), "the stream's first dispatch batch"
        if when == "while-waiting":
            wait_until(lambda: svc.app.hub.waiting(BusinessLine.SALE) == 1, "the stream waits")
            assert dispatcher.batches == 1  # it found nothing: the line is closed
        put_config(svc, "SALE", {"enabled": True})  # applied: every stream woken
        gated.gate.set()
        assert reader.next(timeout=15).task.id == waiting
    finally:
        if reader is not None:
            reader.close()
        svc.close()
