"""Payloads of the BI events the assignment service sends besides task transitions
(pure: no I/O). Each follows its Avro schema in ``crm_bilog/schemas/avsc`` field for field;
the payload is built in the transaction of the change and kept in the ``bi_outbox`` table
until bilog acknowledges it.

- ``crm.bi.FactCallRecord``: one call of an agent (RecordCall). ``bundle_id`` is the task
  id, ``call_tag_id`` the outcome name (``CONNECTED``, ...), ``contact_phone`` the
  customer's *masked* phone (bilog masks the field again, which leaves a masked value as
  it is: the clear number never leaves the service), ``operator_header.timestamp`` the
  call's start. ``operator_id`` is an Avro ``int``: an agent id above 2^31-1 is sent as
  null (the record keeps it in ``bundle_id``'s task, and in the call_record table).
- ``crm.bi.AgentPresenceChanged``: an agent's presence changed (SetPresence, only when it
  really changed).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from crm_assignment.domain.model import BusinessLine, CallRecord, Presence

__all__ = [
    "CALL_RECORD_SCHEMA",
    "INT32_MAX",
    "PRESENCE_SCHEMA",
    "call_record_payload",
    "epoch_ms",
    "presence_payload",
]

CALL_RECORD_SCHEMA = "crm.bi.FactCallRecord"
PRESENCE_SCHEMA = "crm.bi.AgentPresenceChanged"
INT32_MAX = 2**31 - 1

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def epoch_ms(at: datetime) -> int:
    """An aware datetime as milliseconds since the Unix epoch (Avro timestamp-millis)."""
    return (at - _EPOCH) // _MS


def call_record_payload(
    call: CallRecord,
    *,
    business_line: BusinessLine,
    masked_phone: str,
    host: str,
    request_id: str,
) -> dict[str, Any]:
    """The ``crm.bi.FactCallRecord`` payload of a call record."""
    return {
        "business_line": int(business_line),
        "bundle_id": str(call.task_id),
        "call_type": call.call_type.name,
        "contact_phone": masked_phone,
        "call_tag_id": call.outcome.name,
        "provider_type": call.provider.name,
        "operator_header": {
            "timestamp": epoch_ms(call.started_at),
            "http_host": host,
            "request_id": request_id,
            "operator_id": call.agent_id if 0 < call.agent_id <= INT32_MAX else None,
        },
    }


def presence_payload(
    agent_id: int,
    business_line: BusinessLine,
    before: Presence | None,
    after: Presence,
    at: datetime,
) -> dict[str, Any]:
    """The ``crm.bi.AgentPresenceChanged`` payload of a presence change."""
    return {
        "agent_id": agent_id,
        "business_line": int(business_line),
        "from_presence": before.name if before is not None else None,
        "to_presence": after.name,
        "at": epoch_ms(at),
    }
