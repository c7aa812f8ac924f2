"""Request validation: proto -> domain, with every violation named by its field path.

Limits (also in the proto comments): name 1..128 of ``[A-Za-z0-9._:/-]``; target method
``/pkg.Service/Method`` of an allowed service; address ``host:port``; request at most
``max_payload_bytes``; ETA at most ``max_past_s`` in the past and 400 days ahead;
idempotency key at most 255 printable ASCII characters; max_retries 0..100; backoff
initial 10 ms..1 h, max initial..1 day; attempt deadline 100 ms..10 min.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from crm.scheduler.v1 import scheduler_pb2 as pb
from crm_common.errors import Validator
from crm_common.timestamps import from_timestamp
from google.protobuf import duration_pb2, timestamp_pb2

from crm_scheduler.domain.model import (
    JobFilter,
    JobRef,
    JobSpec,
    JobState,
    Target,
    default_idempotency_key,
    rfc3339,
)
from crm_scheduler.domain.paging import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    BadPageToken,
    decode_token,
)

__all__ = ["Limits", "parse_filter", "parse_ref", "parse_schedule"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/\-]{0,127}")
_METHOD = re.compile(r"/(?:[A-Za-z_][A-Za-z0-9_]*\.)*[A-Za-z_][A-Za-z0-9_]*/[A-Za-z_][A-Za-z0-9_]*")
_HOST = re.compile(
    r"(?:\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9](?:[A-Za-z0-9\-]{0,62})(?:\.[A-Za-z0-9\-]{1,63})*)"
)
_KEY = re.compile(r"[\x20-\x7e]{1,255}")
_MAX_TEXT = 255
_HORIZON = timedelta(days=400)
_MIN_BACKOFF = timedelta(milliseconds=10)
_MAX_BACKOFF_INITIAL = timedelta(hours=1)
_MAX_BACKOFF_MAX = timedelta(days=1)
_MIN_DEADLINE = timedelta(milliseconds=100)
_MAX_DEADLINE = timedelta(minutes=10)
_MAX_RETRIES = 100
# Timestamps the proto allows: 0001-01-01 .. 9999-12-31.
_MIN_TS_S, _MAX_TS_S = -62135596800, 253402300799


@dataclass(frozen=True, slots=True)
class Limits:
    """Settings-driven limits and defaults of Schedule."""

    max_payload_bytes: int = 64 * 1024
    max_past: timedelta = timedelta(seconds=60)
    allowed_services: tuple[str, ...] = ("crm.",)
    default_max_retries: int = 5
    default_backoff_initial: timedelta = timedelta(seconds=1)
    default_backoff_max: timedelta = timedelta(minutes=5)
    default_attempt_deadline: timedelta = timedelta(seconds=30)


def _ms(d: timedelta) -> int:
    return d // timedelta(milliseconds=1)


def service_allowed(service: str, allowed: tuple[str, ...]) -> bool:
    for entry in allowed:
        if entry == "*" or entry == service:
            return True
        if entry.endswith(".") and service.startswith(entry):
            return True
    return False


def _duration(v: Validator, field: str, d: duration_pb2.Duration) -> timedelta | None:
    if not -315576000000 <= d.seconds <= 315576000000 or not -999_999_999 <= d.nanos <= 999_999_999:
        v.add(field, "is not a valid duration")
        return None
    if (d.seconds > 0 and d.nanos < 0) or (d.seconds < 0 and d.nanos > 0):
        v.add(field, "is not a valid duration (seconds and nanos differ in sign)")
        return None
    return timedelta(seconds=d.seconds, microseconds=d.nanos // 1000)


def _timestamp(v: Validator, field: str, ts: timestamp_pb2.Timestamp) -> datetime | None:
    if not _MIN_TS_S <= ts.seconds <= _MAX_TS_S or not 0 <= ts.nanos <= 999_999_999:
        v.add(field, "is not a valid timestamp")
        return None
    return from_timestamp(ts)


def _check_target(v: Validator, req: pb.ScheduleRequest, limits: Limits) -> Target | None:
    if not req.HasField("target"):
        v.add("target", "is required")
        return None
    t = req.target
    ok = True
    if not t.method:
        ok = v.require(False, "target.method", "is required")
    elif len(t.method) > _MAX_TEXT or not _METHOD.fullmatch(t.method):
        ok = v.require(False, "target.method", "must be a full method name: /pkg.Service/Method")
    else:
        service = t.method[1:].rpartition("/")[0]
        if not service_allowed(service, limits.allowed_services):
            ok = v.require(
                False,
                "target.method",
                f"service {service} is not an allowed target "
                f"(allowed: {', '.join(limits.allowed_services)})",
            )
    if not t.address:
        ok = v.require(False, "target.address", "is required")
    else:
        host, sep, port = t.address.rpartition(":")
        valid = (
            len(t.address) <= _MAX_TEXT
            and bool(sep)
            and _HOST.fullmatch(host) is not None
            and port.isascii()
            and port.isdigit()
            and len(port) <= 5
            and 0 < int(port) < 65536
        )
        ok = v.require(valid, "target.address", "must be host:port (port 1..65535)") and ok
    if len(t.request) > limits.max_payload_bytes:
        ok = v.require(
            False,
            "target.request",
            f"is {len(t.request)} bytes; at most {limits.max_payload_bytes} are allowed",
        )
    return Target(t.method, t.address, bytes(t.request)) if ok else None


def parse_schedule(req: pb.ScheduleRequest, now: datetime, limits: Limits) -> JobSpec:
    """The validated spec of a Schedule request; raises InvalidArgument."""
    v = Validator()
    name_ok = v.require(
        _NAME.fullmatch(req.name) is not None,
        "name",
        "must be 1..128 characters of A-Z a-z 0-9 . _ - : / starting with a letter or digit",
    )
    target = _check_target(v, req, limits)

    eta: datetime | None = None
    when = ""
    which = req.WhichOneof("when")
    if which is None:
        v.add("eta", "set eta or delay")
    elif which == "eta":
        eta = _timestamp(v, "eta", req.eta)
        if eta is not None:
            if eta < now - limits.max_past:
                v.add(
                    "eta",
                    f"is {rfc3339(eta)}, more than {limits.max_past.total_seconds():g} s "
                    "in the past",
                )
                eta = None
            elif eta > now + _HORIZON:
                v.add("eta", "is more than 400 days ahead")
                eta = None
            else:
                when = f"eta:{eta.isoformat()}"
    else:
        delay = _duration(v, "delay", req.delay)
        if delay is not None:
            if delay < timedelta(0):
                v.add("delay", "must not be negative")
            elif delay > _HORIZON:
                v.add("delay", "must be at most 400 days")
            else:
                eta = now + delay
                when = f"delay:{_ms(delay)}"

    key = req.idempotency_key
    if key:
        v.require(
            _KEY.fullmatch(key) is not None,
            "idempotency_key",
            "must be at most 255 printable ASCII characters",
        )

    max_retries = limits.default_max_retries
    if req.HasField("max_retries"):
        max_retries = req.max_retries
        v.require(0 <= max_retries <= _MAX_RETRIES, "max_retries", f"must be 0..{_MAX_RETRIES}")

    initial, cap = limits.default_backoff_initial, limits.default_backoff_max
    if req.HasField("backoff"):
        b = v.at("backoff")
        if req.backoff.HasField("initial"):
            got = _duration(b, "initial", req.backoff.initial)
            if got is not None:
                if _MIN_BACKOFF <= got <= _MAX_BACKOFF_INITIAL:
                    initial = got
                else:
                    b.add("initial", "must be 10 ms .. 1 h")
        if req.backoff.HasField("max"):
            got = _duration(b, "max", req.backoff.max)
            if got is not None:
                if initial <= got <= _MAX_BACKOFF_MAX:
                    cap = got
                else:
                    b.add("max", "must be at least backoff.initial and at most 1 day")
        else:
            cap = max(cap, initial)

    deadline = limits.default_attempt_deadline
    if req.HasField("attempt_deadline"):
        got = _duration(v, "attempt_deadline", req.attempt_deadline)
        if got is not None:
            if _MIN_DEADLINE <= got <= _MAX_DEADLINE:
                deadline = got
            else:
                v.add("attempt_deadline", "must be 100 ms .. 10 min")

    v.check()
    assert target is not None
    assert eta is not None
    assert name_ok
    return JobSpec(
        name=req.name,
        target=target,
        eta=eta,
        idempotency_key=key or default_idempotency_key(req.name, eta),
        max_retries=max_retries,
        backoff_initial_ms=_ms(initial),
        backoff_max_ms=_ms(cap),
        attempt_deadline_ms=_ms(deadline),
        when=when,
    )


def parse_ref(job_id: str, idempotency_key: str) -> JobRef:
    """Exactly one of ``id`` (a UUID) and ``idempotency_key``; raises InvalidArgument."""
    v = Validator()
    if job_id and idempotency_key:
        v.add("id", "set either id or idempotency_key, not both")
    elif not job_id and not idempotency_key:
        v.add("id", "id or idempotency_key is required")
    elif job_id:
        try:
            canonical = str(uuid.UUID(job_id))
        except ValueError:
            canonical = ""
        v.require(canonical == job_id.lower(), "id", "must be a UUID")
        job_id = canonical
    else:
        v.require(
            _KEY.fullmatch(idempotency_key) is not None,
            "idempotency_key",
            "must be at most 255 printable ASCII characters",
        )
    v.check()
    return JobRef(uid=job_id, idempotency_key=idempotency_key if not job_id else "")


def parse_filter(req: pb.ListRequest) -> tuple[JobFilter, int, int]:
    """``(filter, after_id, page_size)`` of a List request; raises InvalidArgument."""
    v = Validator()
    states: set[JobState] = set()
    for i, s in enumerate(req.states):
        if s == pb.JOB_STATE_UNSPECIFIED:
            continue
        try:
            states.add(JobState(s))
        except ValueError:
            v.add(f"states[{i}]", f"unknown state {s}")
    for field in ("name", "target_method", "target_address"):
        v.require(len(getattr(req, field)) <= _MAX_TEXT, field, "is too long")
    size = req.page.page_size
    v.require(0 <= size <= MAX_PAGE_SIZE, "page.page_size", f"must be 0..{MAX_PAGE_SIZE}")
    f = JobFilter(
        states=frozenset(states),
        name=req.name,
        target_method=req.target_method,
        target_address=req.target_address,
    )
    after = 0
    if req.page.page_token:
        try:
            after = decode_token(req.page.page_token, f)
        except BadPageToken as exc:
            v.add("page.page_token", str(exc))
    v.check()
    return f, after, size or DEFAULT_PAGE_SIZE
