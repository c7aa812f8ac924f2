"""Client channel policy shared by every service that calls another: gRPC's own retry
support, configured through the channel's service config.

A call that fails with one of :attr:`RetryPolicy.codes` before the server produced any
response (UNAVAILABLE: the peer is restarting, a connection was reset) is retried by
gRPC itself, with exponential backoff, within the call's deadline. Only UNAVAILABLE is
retried by default: every RPC our services call on each other is either a read or
carries an idempotency key (Schedule, CreateClue, LogBatch events), so a retry cannot
apply an effect twice. DEADLINE_EXCEEDED is never retried here: the caller's deadline
is the budget, and a caller that degrades (recommendations on a task detail) must get
its answer within it.

``crm_common.interceptors.insecure_channel`` applies :data:`DEFAULT_RETRY`; pass
``retry=None`` to switch retries off (e.g. the scheduler's worker, whose job-level
retries with backoff are the policy).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_RETRY", "RetryPolicy", "channel_options", "service_config"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """gRPC retry policy (see gRFC A6); applies to every method of the channel."""

    max_attempts: int = 3
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 0.5
    multiplier: float = 2.0
    codes: tuple[str, ...] = ("UNAVAILABLE",)

    def __post_init__(self) -> None:
        if not 2 <= self.max_attempts <= 5:
            raise ValueError("max_attempts must be 2..5 (gRPC caps it at 5)")
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError("backoffs must satisfy 0 < initial <= max")
        if self.multiplier <= 0 or not self.codes:
            raise ValueError("multiplier must be > 0 and codes non-empty")


DEFAULT_RETRY = RetryPolicy()


def service_config(retry: RetryPolicy | None = DEFAULT_RETRY) -> str:
    """The JSON service config of a channel (every service and method: ``name: [{}]``)."""
    method: dict[str, Any] = {"name": [{}]}
    if retry is not None:
        method["retryPolicy"] = {
            "maxAttempts": retry.max_attempts,
            "initialBackoff": f"{retry.initial_backoff_s:.3f}s",
            "maxBackoff": f"{retry.max_backoff_s:.3f}s",
            "backoffMultiplier": retry.multiplier,
            "retryableStatusCodes": list(retry.codes),
        }
    return json.dumps({"methodConfig": [method]})


def channel_options(
    retry: RetryPolicy | None = DEFAULT_RETRY, extra: Sequence[tuple[str, Any]] = ()
) -> list[tuple[str, Any]]:
    """Channel options carrying the retry policy (``extra`` options come last and win)."""
    return [
        ("grpc.enable_retries", 1 if retry is not None else 0),
        ("grpc.service_config", service_config(retry)),
        *extra,
    ]
