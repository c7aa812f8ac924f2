"""Aware datetimes <-> ``google.protobuf.Timestamp``, at the microsecond precision the
services store (MySQL ``DATETIME(6)``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp

__all__ = ["EPOCH", "from_timestamp", "timestamp"]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp(dt: datetime) -> Timestamp:
    """An aware datetime as a Timestamp (microsecond precision)."""
    delta = dt - EPOCH
    micros = (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds
    seconds, rest = divmod(micros, 1_000_000)
    return Timestamp(seconds=seconds, nanos=rest * 1000)


def from_timestamp(ts: Timestamp) -> datetime:
    """A Timestamp (validated to be in range) as an aware UTC datetime, truncated to µs."""
    return EPOCH + timedelta(seconds=ts.seconds, microseconds=ts.nanos // 1000)
