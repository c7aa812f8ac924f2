"""Pure rules: backoff with full jitter, retryable codes, keys, page tokens, messages."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from crm_scheduler.domain.model import (
    Dispatch,
    JobFilter,
    JobSpec,
    JobState,
    Target,
    default_idempotency_key,
    job_uuid,
)
from crm_scheduler.domain.paging import BadPageToken, decode_token, encode_token
from crm_scheduler.domain.retry import (
    FINAL_CODES,
    RETRYABLE_CODES,
    backoff_ms,
    is_retryable,
    outcome_of_failure,
)

T0 = datetime(2025, 11, 23, 9, 0, tzinfo=UTC)


def test_backoff_is_full_jitter_under_an_exponential_cap() -> None:
    rng = random.Random(7)
    for retry, cap in [(1, 100), (2, 200), (3, 400), (4, 800), (5, 1000), (40, 1000)]:
        samples = [backoff_ms(retry, 100, 1000, rng) for _ in range(300)]
        assert min(samples) >= 0
        assert max(samples) <= cap
        assert max(samples) > cap * 0.8  # spread over the whole range (full jitter)
        assert min(samples) < cap * 0.2
    with pytest.raises(ValueError, match="retry counts from 1"):
        backoff_ms(0, 100, 1000, rng)


def test_retryable_and_final_codes() -> None:
    for code in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED"):
        assert is_retryable(code)
    for code in ("INTERNAL", "UNKNOWN", "LEASE_EXPIRED"):
        assert is_retryable(code)
    for code in ("INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "ALREADY_EXISTS"):
        assert not is_retryable(code)
    for code in ("PERMISSION_DENIED", "UNIMPLEMENTED", "UNAUTHENTICATED"):
        assert not is_retryable(code)
    assert not RETRYABLE_CODES & FINAL_CODES


def test_failure_outcomes() -> None:
    rng = random.Random(1)
    retry = outcome_of_failure("UNAVAILABLE", 1, 2, 100, 1000, T0, rng)
    assert retry.state is JobState.RETRY_WAIT
    assert retry.due_at is not None
    assert T0 <= retry.due_at <= T0 + timedelta(milliseconds=100)
    assert outcome_of_failure("UNAVAILABLE", 2, 2, 100, 1000, T0, rng).state is (
        JobState.RETRY_WAIT
    )
    exhausted = outcome_of_failure("UNAVAILABLE", 3, 2, 100, 1000, T0, rng)
    assert exhausted.state is JobState.DEAD
    assert exhausted.due_at is None
    final = outcome_of_failure("NOT_FOUND", 1, 5, 100, 1000, T0, rng)
    assert final.state is JobState.DEAD


def test_default_key_is_name_and_rfc3339_eta() -> None:
    eta = datetime(2025, 11, 23, 17, 0, 0, 123456, tzinfo=UTC)
    assert default_idempotency_key("recycle", eta) == "recycle@2025-11-23T17:00:00.123Z"
    assert job_uuid("k") == job_uuid("k")
    assert job_uuid("k") != job_uuid("k2")


def _spec(**kw: object) -> JobSpec:
    base: dict[str, object] = {
        "name": "n",
        "target": Target("/crm.x.v1.S/M", "h:1", b"abc"),
        "eta": T0,
        "idempotency_key": "k",
        "max_retries": 3,
        "backoff_initial_ms": 10,
        "backoff_max_ms": 100,
        "attempt_deadline_ms": 1000,
        "when": "eta:x",
    }
    base.update(kw)
    return JobSpec(**base)  # type: ignore[arg-type]


def test_spec_hash_ignores_the_key_only() -> None:
    assert _spec().spec_hash() == _spec(idempotency_key="other").spec_hash()
    assert _spec().spec_hash() != _spec(max_retries=4).spec_hash()
    assert _spec().spec_hash() != _spec(target=Target("/crm.x.v1.S/M", "h:1", b"abd")).spec_hash()
    assert _spec().spec_hash() != _spec(when="delay:5").spec_hash()


def test_page_token_round_trip_and_binding() -> None:
    f = JobFilter(states=frozenset({JobState.DEAD}), name="a")
    token = encode_token(42, f)
    assert decode_token(token, f) == 42
    with pytest.raises(BadPageToken, match="other filters"):
        decode_token(token, JobFilter())
    for bad in ("???", "e30=", "x" * 300, encode_token(1, f)[:-3]):
        with pytest.raises(BadPageToken):
            decode_token(bad, f)


def test_dispatch_message_round_trip() -> None:
    d = Dispatch(
        job_id=1,
        uid=job_uuid("k"),
        name="n",
        idempotency_key="k",
        method="/crm.x.v1.S/M",
        address="h:1",
        request=b"\x00\xff",
        attempt=3,
        run_attempt=1,
        max_retries=2,
        backoff_initial_ms=10,
        backoff_max_ms=20,
        attempt_deadline_ms=1000,
        due_at=T0,
    )
    assert Dispatch.from_message(d.to_message()) == d
    broken = d.to_message()
    broken["attempt"] = "3"
    with pytest.raises(TypeError):
        Dispatch.from_message(broken)
    with pytest.raises(ValueError, match="version"):
        Dispatch.from_message({"v": 2})
