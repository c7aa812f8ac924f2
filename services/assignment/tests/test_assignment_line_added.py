"""A business line added purely by config (issue #9): a line is data, a code named by its
config key; before the key a request naming the code is INVALID_ARGUMENT, with it the line
takes clues, offers them to its agents with its own timeouts, and without it again it is
gone."""

from __future__ import annotations

from datetime import timedelta

import grpc
from assignment_testlib import (
    SALE,
    OfferReader,
    Service,
    delete_config,
    put_config,
)
from crm.assignment.v1 import assignment_pb2 as pb
from crm_assignment.config import LineConfig, RoutingConfig, parse
from crm_assignment.domain.model import BusinessLine
from crm_common.errors import field_violations
from crm_devstack.apps import rpc_error


def test_an_unconfigured_code_is_no_line() -> None:
    lax = RoutingConfig.from_values({"SALE": LineConfig()}, 3)
    assert not lax.known(4)
    assert not lax.is_open(BusinessLine(4))


def test_lines_are_data() -> None:
    values = {
        "LEASING": parse("LEASING", b'{"code": 4, "accept_timeout_s": 7}'),
        "AAA": parse("AAA", b'{"code": 5}'),
        "ZZZ": parse("ZZZ", b'{"code": 5}'),  # the same code as AAA: AAA sorts first
    }
    cfg = RoutingConfig.from_values(values, 9)
    assert cfg.known(4)
    assert cfg.is_open(BusinessLine(4))
    assert cfg.line(BusinessLine(4)).accept_timeout_s == 7
    assert cfg.name(4) == "LEASING"
    assert cfg.name(5) == "AAA"
    assert cfg.name(1) == "SALE"
    assert cfg.name(77) == "LINE_77"
    assert cfg.conflicts == ("ZZZ",)
    assert cfg.all_lines() == (1, 2, 3, 4, 5)
    assert cfg.describe_lines() == "SALE = 1, AFTER_SALE = 2, FINANCE = 3, LEASING = 4, AAA = 5"


LEASING = 4  # no proto constant: a line added purely by config


def test_a_new_line_is_added_by_config_alone(strict: Service) -> None:
    """LEASING (code 4) does not exist until its key appears; then it takes a clue, offers
    it to its own agent with its own accept timeout; removing the key removes it again."""
    err = rpc_error(lambda: strict.clue("l-0", "13800004444", business_line=LEASING))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    [(field, message)] = field_violations(err)
    assert field == "business_line"
    assert "SALE = 1" in message
    assert "FINANCE = 3" in message
    assert "LEASING" not in message
    err = rpc_error(lambda: strict.agent(61, line=LEASING))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(err)] == ["agent.business_line"]

    put_config(strict, "LEASING", {"code": LEASING, "accept_timeout_s": 17})
    strict.agent(61, line=LEASING)
    strict.agent(62, line=SALE)  # idle too, but not in the line
    leasing, sale = OfferReader(strict.stub, 61), OfferReader(strict.stub, 62)
    try:
        now = strict.clock()
        task = strict.clue("l-1", "13800004444", business_line=LEASING).task
        assert task.business_line == LEASING
        offer = leasing.next()
        assert offer.task.id == task.id
        assert offer.task.business_line == LEASING
        assert offer.deadline.ToDatetime(tzinfo=now.tzinfo) == now + timedelta(seconds=17)
        assert sale.offers.empty()
        stats = strict.stub.QueueStats(pb.QueueStatsRequest(business_line=LEASING))
        assert {q.business_line for q in stats.queues} == {LEASING}
        assert sum(q.offered for q in stats.queues) == 1
        listed = strict.stub.ListTasks(pb.ListTasksRequest(business_line=LEASING)).tasks
        assert [t.id for t in listed] == [task.id]
        assert LEASING in {q.business_line for q in strict.stub.QueueStats(
            pb.QueueStatsRequest()).queues}  # fmt: skip
    finally:
        leasing.close()
        sale.close()

    put_config(strict, "LEASING", {"code": 2})  # a bad value: the last good one stays
    assert strict.app.routing().line(BusinessLine(LEASING)).accept_timeout_s == 17

    delete_config(strict, "LEASING")
    err = rpc_error(lambda: strict.clue("l-2", "13800004445", business_line=LEASING))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(err)] == ["business_line"]
    # its tasks are still readable, their line shown by code
    stats = strict.stub.QueueStats(pb.QueueStatsRequest())
    assert LEASING in {q.business_line for q in stats.queues}
    for bad in (-1, 0):
        err = rpc_error(lambda b=bad: strict.clue("l-3", "13800004446", business_line=b))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
