"""The phone number never appears in clear: not in any column of any table, not in logs."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import grpc
import pytest
from assignment_testlib import ManualClock, OfferReader, Service, settings_for
from crm.assignment.v1 import assignment_pb2 as pb
from crm_assignment.api.convert import timestamp
from crm_common.logs import configure_logging
from sqlalchemy import MetaData, select

PHONES = {
    # as sent -> normalized digits
    "+86 139-1234-5678": "8613912345678",
    "13987654321": "13987654321",
    "010 6666 7777": "01066667777",
}


def _forms(digits: str) -> set[str]:
    """Ways a leaked number could be spelled."""
    return {digits, digits[-11:], f"{digits[:3]} {digits[3:7]} {digits[7:]}"}


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """Every log record of the test as JSON lines (the service's log format), at DEBUG."""
    buffer = io.StringIO()
    root = logging.getLogger()
    level = root.level
    configure_logging("assignment", "DEBUG", stream=buffer)
    yield buffer
    for handler in list(root.handlers):
        if getattr(handler, "stream", None) is buffer:
            root.removeHandler(handler)
    root.setLevel(level)


def test_phone_never_stored_or_logged_in_clear(
    json_logs: io.StringIO, migrated_db: str, etcd_endpoint: str, config_prefix: str
) -> None:
    clock = ManualClock()
    service = Service(settings_for(migrated_db, etcd_endpoint, config_prefix), clock)
    try:
        service.agent(1, capacity=5)
        task_ids = []
        for i, phone in enumerate(PHONES):
            r = service.clue(f"p-{i}", phone, brands=["BMW"])
            task_ids.append(r.task.id)
            again = service.clue(f"p-{i}-again", phone)  # merged into the same task
            assert again.merged
            assert again.task.id == r.task.id
        # invalid and conflicting requests carrying the number
        for bad in ("+86 139-1234-5678x", "8613912345678" * 2):
            with pytest.raises(grpc.RpcError) as info:
                service.clue("p-bad", bad)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "8613912345678" not in (info.value.details() or "")
        with pytest.raises(grpc.RpcError) as info:
            service.clue("p-0", "13987654321")  # key reuse with another phone
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "13987654321" not in (info.value.details() or "")
        # the whole life cycle, so every table has rows
        reader = OfferReader(service.stub, 1)
        try:
            offered = [reader.next().task.id for _ in task_ids]
        finally:
            reader.close()
        service.stub.AcceptTask(pb.AcceptTaskRequest(task_id=offered[0], agent_id=1))
        record = pb.RecordCallRequest(
            call_id="p-call", task_id=offered[0], agent_id=1, outcome=pb.CALL_OUTCOME_CONNECTED,
            provider=pb.TELEPHONY_PROVIDER_ZT, started_at=timestamp(clock()), note="called",
        )  # fmt: skip
        service.stub.RecordCall(record)  # call_record and bi_outbox (FactCallRecord) rows
        service.stub.CompleteTask(pb.CompleteTaskRequest(task_id=offered[0], agent_id=1))
        for task_id in task_ids:
            masked = service.task(task_id).customer.phone.masked
            assert "****" in masked
        engine = service.app.engine
        meta = MetaData()
        meta.reflect(engine)
        dumped: list[str] = []
        with engine.connect() as conn:
            for table in meta.sorted_tables:
                for row in conn.execute(select(table)):
                    for value in row:
                        if isinstance(value, bytes | bytearray):
                            dumped.append(bytes(value).decode("latin-1"))
                            dumped.append(bytes(value).hex())
                        else:
                            dumped.append(str(value))
        assert any("861****5678" in v for v in dumped)  # the masked form is there
        assert {"call_record", "bi_outbox"} <= {t.name for t in meta.sorted_tables}
        assert any("crm.bi.FactCallRecord" in v for v in dumped)
        db_text = "\n".join(dumped)
    finally:
        service.close()

    log_text = json_logs.getvalue()
    lines = [json.loads(line) for line in log_text.splitlines() if line.strip()]
    assert any(line.get("method", "").endswith("/CreateClue") for line in lines)
    assert any("development defaults" in line["msg"] for line in lines)
    for raw, digits in PHONES.items():
        for form in _forms(digits) | {raw}:
            assert form not in db_text, f"{form!r} found in the database"
            assert form not in log_text, f"{form!r} found in the logs"
