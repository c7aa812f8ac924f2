"""Rendering: aligned tables for people, JSON for scripts (``-o json``)."""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import IO, Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

__all__ = ["Out", "fmt_time", "proto_dict", "table"]


def proto_dict(msg: Message) -> dict[str, Any]:
    """A message as JSON-ready dict (proto field names, defaults included)."""
    return MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def fmt_time(t: Timestamp | datetime.datetime | None, *, has: bool = True) -> str:
    """``2026-11-23 11:47:25`` (UTC), or ``-`` when unset."""
    if t is None or not has:
        return "-"
    if isinstance(t, Timestamp):
        if t.seconds == 0 and t.nanos == 0:
            return "-"
        t = t.ToDatetime(tzinfo=datetime.UTC)
    return t.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _cell(value: object) -> str:
    if value is None or value == "":
        return "-"
    return str(value).replace("\n", " ")


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Columns aligned on the widest cell, headers upper-cased (like kubectl)."""
    cells = [[h.upper() for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


class Out:
    """Where a command writes: ``json`` mode prints one JSON document, table mode text."""

    def __init__(self, stream: IO[str], mode: str) -> None:
        self.stream = stream
        self.json = mode == "json"

    def line(self, text: str = "") -> None:
        self.stream.write(text + "\n")

    def doc(self, data: object) -> None:
        self.stream.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")

    def fields(self, pairs: Sequence[tuple[str, object]]) -> None:
        """``Name:   value`` lines."""
        width = max((len(k) for k, _ in pairs), default=0) + 1
        for k, v in pairs:
            self.line(f"{(k + ':').ljust(width)}  {_cell(v)}")

    def table(self, headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
        rows = list(rows)
        if rows:
            self.line(table(headers, rows))
        else:
            self.line("(none)")

    def mapping(self, data: Mapping[str, Any]) -> None:
        self.line(json.dumps(data, indent=2, sort_keys=True))
