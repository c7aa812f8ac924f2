"""Which attempt failures are retried, and how long to wait (pure).

Retryable gRPC codes (the call may succeed later): ``UNAVAILABLE``,
``DEADLINE_EXCEEDED``, ``RESOURCE_EXHAUSTED``, ``ABORTED``, ``INTERNAL``, ``UNKNOWN``,
``CANCELLED`` (the connection went away mid-call), plus our own ``LEASE_EXPIRED`` (the
worker died during the attempt). Every other code is final and makes the job DEAD at
once: ``INVALID_ARGUMENT``, ``NOT_FOUND``, ``FAILED_PRECONDITION``, ``ALREADY_EXISTS``,
``PERMISSION_DENIED``, ``UNAUTHENTICATED``, ``UNIMPLEMENTED``, ``OUT_OF_RANGE``,
``DATA_LOSS``: retrying them would fail the same way. A target that sees a key it has
already applied must answer OK, not ALREADY_EXISTS.

Backoff is exponential with full jitter: retry ``n`` (after the n-th failed attempt of
the run) waits ``uniform(0, min(max, initial * 2**(n-1)))``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from crm_scheduler.domain.model import JobState

__all__ = [
    "FINAL_CODES",
    "LEASE_EXPIRED",
    "RETRYABLE_CODES",
    "AttemptOutcome",
    "backoff_ms",
    "is_retryable",
    "outcome_of_failure",
]

LEASE_EXPIRED = "LEASE_EXPIRED"
"""The code recorded when a RUNNING job's lease expired (its worker died or hung)."""

RETRYABLE_CODES = frozenset(
    {
        "UNAVAILABLE",
        "DEADLINE_EXCEEDED",
        "RESOURCE_EXHAUSTED",
        "ABORTED",
        "INTERNAL",
        "UNKNOWN",
        "CANCELLED",
        LEASE_EXPIRED,
    }
)
FINAL_CODES = frozenset(
    {
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "FAILED_PRECONDITION",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "UNIMPLEMENTED",
        "OUT_OF_RANGE",
        "DATA_LOSS",
    }
)


def is_retryable(code: str) -> bool:
    """Whether a failed attempt with this status code name may be retried."""
    return code in RETRYABLE_CODES


def backoff_ms(retry: int, initial_ms: int, max_ms: int, rng: random.Random) -> int:
    """Full-jitter delay before retry number ``retry`` (1 for the first retry)."""
    if retry < 1:
        raise ValueError("retry counts from 1")
    cap = min(max_ms, initial_ms * 2 ** min(retry - 1, 62))
    return int(rng.uniform(0, cap))


@dataclass(frozen=True, slots=True)
class AttemptOutcome:
    """What a failed attempt leads to: RETRY_WAIT until ``due_at``, or DEAD."""

    state: JobState
    due_at: datetime | None


def outcome_of_failure(
    code: str,
    run_attempt: int,
    max_retries: int,
    backoff_initial_ms: int,
    backoff_max_ms: int,
    now: datetime,
    rng: random.Random,
) -> AttemptOutcome:
    """The next state after attempt ``run_attempt`` (1-based) of the run failed."""
    if not is_retryable(code) or run_attempt > max_retries:
        return AttemptOutcome(JobState.DEAD, None)
    delay = backoff_ms(run_attempt, backoff_initial_ms, backoff_max_ms, rng)
    return AttemptOutcome(JobState.RETRY_WAIT, now + timedelta(milliseconds=delay))
