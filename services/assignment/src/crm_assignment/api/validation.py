"""Request validation: protobuf requests -> domain values, or InvalidArgument listing every
bad field by its path (``agent.capacity``, ``intent_car_ids[3]``, ``page.page_token``).

Descriptions never echo the submitted value (a phone number could be in any field).
Lists over their size limit get one violation for the list, not one per item.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol, TypeVar

from crm.assignment.v1 import assignment_pb2 as pb
from crm_common.errors import InvalidArgument, Validator
from crm_common.tracing import RequestOrigin
from google.protobuf.timestamp_pb2 import Timestamp

from crm_assignment.api.convert import from_timestamp
from crm_assignment.domain.agent_query import AgentCursor, AgentFilter
from crm_assignment.domain.model import (
    AgentSpec,
    BusinessLine,
    CallOutcome,
    CallType,
    Category,
    NewCall,
    NewClue,
    Presence,
    Status,
    TaskFilter,
    TelephonyProvider,
)
from crm_assignment.domain.paging import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    BadPageToken,
    Cursor,
    filter_hash,
)
from crm_assignment.domain.phone import PhoneProtector, normalize_phone
from crm_assignment.domain.rules import CALL_CLOCK_SKEW, call_request_hash, clue_request_hash

__all__ = [
    "AgentListQuery",
    "Lines",
    "ListQuery",
    "agent_list_query",
    "agent_spec",
    "list_query",
    "new_call",
    "new_clue",
    "optional_line",
    "positive_id",
    "presence",
    "reason_text",
    "revisit_time",
]

CITY = re.compile(r"[a-z][a-z0-9_-]*")
MAX_TEXT = 500
MAX_CAR_IDS = 20
MAX_CLUE_BRANDS = 20
MAX_BRAND_CHARS = 32
MAX_AGENT_LIST = 50
MAX_STATUSES = 16
MAX_REVISIT_AHEAD = timedelta(days=366)
MAX_CALL_AHEAD = CALL_CLOCK_SKEW  # clocks differ; a call does not start later
MAX_CALL_AGE = timedelta(days=366)
MAX_CALL_SECONDS = 86400
# Timestamps accepted in requests: 1970-01-01 .. 9999-12-31 (DATETIME range, no negatives).
_MIN_SECONDS = 0
_MAX_SECONDS = 253402300799
INT64_MAX = 2**63 - 1
T = TypeVar("T")


def _printable_ascii(s: str) -> bool:
    return all(" " <= ch <= "~" for ch in s)


def _text(v: Validator, value: str, field: str, lo: int, hi: int) -> bool:
    """``lo..hi`` printable characters, not blank (when lo >= 1)."""
    if not lo <= len(value) <= hi:
        v.add(field, f"must be {lo}..{hi} characters")
        return False
    if lo >= 1 and not value.strip():
        v.add(field, "must not be blank")
        return False
    return v.require(value.isprintable(), field, "must contain printable characters only")


def _city(v: Validator, value: str, field: str) -> bool:
    if not 1 <= len(value) <= 64:
        v.add(field, "must be 1..64 characters")
        return False
    return v.require(
        CITY.fullmatch(value) is not None,
        field,
        "must be a lower-case slug: a letter, then letters, digits, '_' or '-'",
    )


class Lines(Protocol):
    """The configured business lines (``crm_assignment.config.RoutingConfig``)."""

    def known(self, code: int) -> bool: ...

    def describe_lines(self) -> str: ...


def _line(
    v: Validator, value: int, field: str, required: bool, lines: Lines
) -> BusinessLine | None:
    """A line is data: valid iff its code is a configured (or well-known) line."""
    if value == 0:
        if required:
            v.add(field, f"must be set: one of {lines.describe_lines()}")
        return None
    if value < 0 or not lines.known(value):
        v.add(field, f"is not a configured business line: expected {lines.describe_lines()}")
        return None
    return BusinessLine(value)


def _category(v: Validator, value: int, field: str) -> Category | None:
    if value == 0:
        v.add(field, "must be set")
        return None
    if value not in Category._value2member_map_:
        v.add(field, "is not a known category")
        return None
    return Category(value)


def _brands(v: Validator, values: Sequence[str], field: str, limit: int) -> tuple[str, ...]:
    if len(values) > limit:
        v.add(field, f"must have at most {limit} items")
        return ()
    out: list[str] = []
    seen: set[str] = set()
    for i, brand in enumerate(values):
        if _text(v, brand, f"{field}[{i}]", 1, MAX_BRAND_CHARS):
            clean = brand.strip()
            if clean.casefold() not in seen:
                seen.add(clean.casefold())
                out.append(clean)
    return tuple(out)


def _timestamp(v: Validator, ts: Timestamp, field: str) -> datetime | None:
    ok = _MIN_SECONDS <= ts.seconds <= _MAX_SECONDS and 0 <= ts.nanos <= 999_999_999
    if not v.require(ok, field, "must be a valid time between 1970 and 9999"):
        return None
    return from_timestamp(ts)


def positive_id(v: Validator, value: int, field: str) -> int:
    v.require(value > 0, field, "must be > 0")
    return value


def optional_line(v: Validator, value: int, field: str, lines: Lines) -> BusinessLine | None:
    return _line(v, value, field, required=False, lines=lines)


def presence(v: Validator, value: int, field: str) -> Presence | None:
    if value == 0:
        v.add(field, "must be set")
        return None
    if value not in Presence._value2member_map_:
        v.add(field, "is not a known presence")
        return None
    return Presence(value)


def reason_text(v: Validator, value: str, field: str, required: bool) -> str:
    """Free text of at most 500 characters (1..500 when ``required``)."""
    if required:
        v.require(bool(value.strip()), field, "must be given (1..500 characters)")
    v.require(len(value) <= MAX_TEXT, field, f"must be at most {MAX_TEXT} characters")
    return value


def revisit_time(v: Validator, ts: Timestamp, field: str, now: datetime) -> datetime | None:
    """A revisit time: in the future, at most a year ahead."""
    at = _timestamp(v, ts, field)
    if at is None:
        return None
    if not v.require(at > now, field, "must be in the future"):
        return None
    if not v.require(at <= now + MAX_REVISIT_AHEAD, field, "must be at most a year ahead"):
        return None
    return at


def _key(v: Validator, key: str, field: str) -> None:
    if 1 <= len(key) <= 128:
        v.require(_printable_ascii(key), field, "must be printable ASCII")
    else:
        v.add(field, "must be 1..128 characters")


def _enum_value(v: Validator, value: int, field: str, cls: type[T]) -> T | None:
    if value == 0:
        v.add(field, "must be set")
        return None
    if value not in cls._value2member_map_:  # type: ignore[attr-defined]
        v.add(field, "is not a known value")
        return None
    return cls(value)  # type: ignore[call-arg]


def _call_start(v: Validator, req: pb.RecordCallRequest, now: datetime) -> datetime | None:
    if not v.require(req.HasField("started_at"), "started_at", "must be set"):
        return None
    at = _timestamp(v, req.started_at, "started_at")
    if at is None:
        return None
    ahead = int(MAX_CALL_AHEAD.total_seconds())
    if not v.require(
        at <= now + MAX_CALL_AHEAD, "started_at", f"must not be in the future (>{ahead} s)"
    ):
        return None
    if not v.require(at >= now - MAX_CALL_AGE, "started_at", "must be at most a year ago"):
        return None
    return at


def new_call(req: pb.RecordCallRequest, now: datetime) -> NewCall:
    """Validate a RecordCall request (an unset call type is CALLOUT)."""
    v = Validator()
    _key(v, req.call_id, "call_id")
    positive_id(v, req.task_id, "task_id")
    positive_id(v, req.agent_id, "agent_id")
    call_type = CallType.CALLOUT
    if req.call_type != 0:
        call_type = _enum_value(v, req.call_type, "call_type", CallType) or CallType.CALLOUT
    provider = _enum_value(v, req.provider, "provider", TelephonyProvider)
    outcome = _enum_value(v, req.outcome, "outcome", CallOutcome)
    started_at = _call_start(v, req, now)
    v.require(
        0 <= req.duration_seconds <= MAX_CALL_SECONDS,
        "duration_seconds",
        f"must be 0..{MAX_CALL_SECONDS}",
    )
    reason_text(v, req.note, "note", required=False)
    v.check()
    assert provider is not None
    assert outcome is not None
    assert started_at is not None
    started_us = (started_at - datetime(1970, 1, 1, tzinfo=started_at.tzinfo)) // timedelta(
        microseconds=1
    )
    request_hash = call_request_hash(
        task_id=req.task_id,
        agent_id=req.agent_id,
        call_type=int(call_type),
        provider=int(provider),
        started_at_us=started_us,
        duration_s=req.duration_seconds,
        outcome=int(outcome),
        note=req.note,
    )
    return NewCall(
        call_id=req.call_id,
        task_id=req.task_id,
        agent_id=req.agent_id,
        call_type=call_type,
        provider=provider,
        started_at=started_at,
        duration_s=req.duration_seconds,
        outcome=outcome,
        note=req.note,
        request_hash=request_hash,
    )


def new_clue(
    req: pb.CreateClueRequest,
    protector: PhoneProtector,
    lines: Lines,
    origin: RequestOrigin | None = None,
) -> NewClue:
    """Validate and normalize a CreateClue request; the phone leaves here protected.
    ``origin``: the call's request id and trace context (recorded with its BI events)."""
    v = Validator()
    key = req.idempotency_key
    _key(v, key, "idempotency_key")
    digits = normalize_phone(req.phone) if len(req.phone) <= 64 else None
    v.require(digits is not None, "phone", "must be 7..15 digits with an optional leading '+'")
    line = _line(v, req.business_line, "business_line", required=True, lines=lines)
    _text(v, req.source, "source", 1, 64)
    _city(v, req.city, "city")
    if len(req.intent_car_ids) > MAX_CAR_IDS:
        v.add("intent_car_ids", f"must have at most {MAX_CAR_IDS} items")
    else:
        for i, car_id in enumerate(req.intent_car_ids):
            v.require(car_id > 0, f"intent_car_ids[{i}]", "must be > 0")
    brands = _brands(v, req.brands, "brands", MAX_CLUE_BRANDS)
    v.require(req.budget_min_yuan >= 0, "budget_min_yuan", "must be >= 0")
    if v.require(req.budget_max_yuan >= 0, "budget_max_yuan", "must be >= 0"):
        v.require(
            req.budget_max_yuan == 0 or req.budget_max_yuan >= req.budget_min_yuan,
            "budget_max_yuan",
            "must be >= budget_min_yuan, or 0 for unknown",
        )
    v.require(0 <= req.priority <= 9, "priority", "must be 0..9")
    v.check()
    assert digits is not None
    assert line is not None
    phone = protector.protect(digits)
    cars = tuple(req.intent_car_ids)
    request_hash = clue_request_hash(
        phone_hash=phone.hash_hex,
        business_line=int(line),
        source=req.source,
        city=req.city,
        intent_car_ids=cars,
        brands=brands,
        budget_min_yuan=req.budget_min_yuan,
        budget_max_yuan=req.budget_max_yuan,
        priority=req.priority,
    )
    return NewClue(
        idempotency_key=key,
        phone=phone,
        business_line=line,
        source=req.source,
        city=req.city,
        intent_car_ids=cars,
        brands=brands,
        budget_min_yuan=req.budget_min_yuan,
        budget_max_yuan=req.budget_max_yuan,
        priority=req.priority,
        request_hash=request_hash,
        origin=origin,
    )


@dataclass(frozen=True, slots=True)
class ListQuery:
    """A validated ListTasks request."""

    filter: TaskFilter
    page_size: int
    after: Cursor | None
    filters_hash: str


def list_query(req: pb.ListTasksRequest, lines: Lines) -> ListQuery:
    v = Validator()
    line = _line(v, req.business_line, "business_line", required=False, lines=lines)
    category: Category | None = None
    if req.category != 0:
        category = _category(v, req.category, "category")
    statuses: list[Status] = []
    if len(req.statuses) > MAX_STATUSES:
        v.add("statuses", f"must have at most {MAX_STATUSES} items")
    else:
        for i, s in enumerate(req.statuses):
            if s == 0 or s not in Status._value2member_map_:
                v.add(f"statuses[{i}]", "is not a known status")
            elif Status(s) not in statuses:
                statuses.append(Status(s))
    v.require(req.agent_id >= 0, "agent_id", "must be >= 0")
    if req.city:
        _city(v, req.city, "city")
    created_from = (
        _timestamp(v, req.created_from, "created_from") if req.HasField("created_from") else None
    )
    created_to = _timestamp(v, req.created_to, "created_to") if req.HasField("created_to") else None
    if created_from is not None and created_to is not None:
        v.require(created_from <= created_to, "created_from", "must not be after created_to")
    page_size = req.page.page_size
    v.require(0 <= page_size <= MAX_PAGE_SIZE, "page.page_size", f"must be 0..{MAX_PAGE_SIZE}")
    v.check()
    f = TaskFilter(
        business_line=line,
        category=category,
        statuses=tuple(sorted(statuses)),
        agent_id=req.agent_id or None,
        city=req.city or None,
        created_from=created_from,
        created_to=created_to,
    )
    fh = filter_hash(f)
    after: Cursor | None = None
    if req.page.page_token:
        try:
            after = Cursor.decode(req.page.page_token, fh)
        except BadPageToken as exc:
            raise InvalidArgument.single("page.page_token", str(exc)) from exc
    return ListQuery(f, page_size or DEFAULT_PAGE_SIZE, after, fh)


def agent_spec(req: pb.UpsertAgentRequest, lines: Lines) -> AgentSpec:
    v = Validator()
    if not v.require(req.HasField("agent"), "agent", "must be set"):
        v.check()
    a = req.agent
    va = v.at("agent")
    positive_id(va, a.id, "id")
    _text(va, a.name, "name", 1, 100)
    line = _line(va, a.business_line, "business_line", required=True, lines=lines)
    cities: list[str] = []
    if len(a.cities) > MAX_AGENT_LIST:
        va.add("cities", f"must have at most {MAX_AGENT_LIST} items")
    else:
        for i, city in enumerate(a.cities):
            if _city(va, city, f"cities[{i}]") and city not in cities:
                cities.append(city)
    categories: list[Category] = []
    if len(a.categories) > MAX_AGENT_LIST:
        va.add("categories", f"must have at most {MAX_AGENT_LIST} items")
    else:
        for i, c in enumerate(a.categories):
            cat = _category(va, c, f"categories[{i}]")
            if cat is not None and cat not in categories:
                categories.append(cat)
    brands = _brands(va, a.brands, "brands", MAX_AGENT_LIST)
    va.require(1 <= a.capacity <= 50, "capacity", "must be 1..50")
    v.check()
    assert line is not None
    return AgentSpec(
        id=a.id,
        name=a.name,
        business_line=line,
        cities=tuple(cities),
        categories=tuple(categories),
        brands=brands,
        capacity=a.capacity,
    )


@dataclass(frozen=True, slots=True)
class AgentListQuery:
    """A validated ListAgents request."""

    filter: AgentFilter
    page_size: int
    after: AgentCursor | None
    filters_hash: str


def agent_list_query(req: pb.ListAgentsRequest, lines: Lines) -> AgentListQuery:
    """ListAgents request -> filters and page, or InvalidArgument with field paths
    (``business_line``, ``presences[1]``, ``page.page_size``, ``page.page_token``)."""
    v = Validator()
    line = _line(v, req.business_line, "business_line", required=False, lines=lines)
    presences: list[Presence] = []
    if len(req.presences) > len(Presence):
        v.add("presences", f"must have at most {len(Presence)} items")
    else:
        for i, value in enumerate(req.presences):
            p = presence(v, value, f"presences[{i}]")
            if p is not None and p not in presences:
                presences.append(p)
    page_size = req.page.page_size
    v.require(0 <= page_size <= MAX_PAGE_SIZE, "page.page_size", f"must be 0..{MAX_PAGE_SIZE}")
    v.check()
    f = AgentFilter(business_line=line, presences=tuple(sorted(presences)))
    fh = f.hash()
    after: AgentCursor | None = None
    if req.page.page_token:
        try:
            after = AgentCursor.decode(req.page.page_token, fh)
        except BadPageToken as exc:
            raise InvalidArgument.single("page.page_token", str(exc)) from exc
    return AgentListQuery(f, page_size or DEFAULT_PAGE_SIZE, after, fh)
