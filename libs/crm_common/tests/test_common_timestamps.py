"""crm_common.timestamps: datetimes <-> protobuf Timestamps, as the services store them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from crm_common.timestamps import EPOCH, from_timestamp, timestamp
from google.protobuf.timestamp_pb2 import Timestamp


def test_round_trip_keeps_microseconds_and_the_instant() -> None:
    for dt in (
        datetime(2026, 11, 23, 21, 30, 5, 123456, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),  # before the epoch
        datetime(2026, 1, 1, 8, 0, tzinfo=timezone(timedelta(hours=8))),  # another zone
    ):
        ts = timestamp(dt)
        assert 0 <= ts.nanos < 1_000_000_000
        assert from_timestamp(ts) == dt
        assert from_timestamp(ts).tzinfo is UTC


def test_agrees_with_protobuf_and_truncates_nanos() -> None:
    dt = datetime(2025, 6, 1, 12, 0, 0, 250, tzinfo=UTC)
    reference = Timestamp()
    reference.FromDatetime(dt)
    assert timestamp(dt) == reference
    assert from_timestamp(Timestamp(seconds=0, nanos=1999)) == EPOCH + timedelta(microseconds=1)
