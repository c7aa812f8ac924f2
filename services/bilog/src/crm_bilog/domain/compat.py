"""Avro schema evolution checks (Confluent's compatibility levels) over the ``avro``
package's ``ReaderWriterCompatibilityChecker``; used by the dev registry and
``tools/crm_tools/schemas_check.py``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import avro.schema
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType

__all__ = [
    "LEVELS",
    "CompatibilityResult",
    "InvalidSchema",
    "check_compatibility",
    "parse_avro",
    "reader_can_read",
]

LEVELS: tuple[str, ...] = (
    "NONE",
    "BACKWARD",
    "BACKWARD_TRANSITIVE",
    "FORWARD",
    "FORWARD_TRANSITIVE",
    "FULL",
    "FULL_TRANSITIVE",
)


class InvalidSchema(ValueError):
    """The text is not a valid Avro schema."""


def parse_avro(text: str) -> Any:
    """The ``avro`` package's schema object for ``text``; raises :class:`InvalidSchema`."""
    try:
        json.loads(text)
        return avro.schema.parse(text)
    except (ValueError, TypeError, KeyError, AttributeError, avro.errors.AvroException) as exc:
        raise InvalidSchema(f"invalid Avro schema: {exc}") from exc


@dataclass(frozen=True, slots=True)
class CompatibilityResult:
    """Whether a schema may follow others, and why not."""

    compatible: bool
    messages: tuple[str, ...] = ()


def reader_can_read(reader: Any, writer: Any) -> CompatibilityResult:
    """Whether data written with ``writer`` can be read with ``reader``."""
    checker = ReaderWriterCompatibilityChecker()  # type: ignore[no-untyped-call]
    result = checker.get_compatibility(reader, writer)
    if result.compatibility is SchemaCompatibilityType.compatible:
        return CompatibilityResult(True)
    kinds = ", ".join(dict.fromkeys(str(k.value) for k in result.incompatibilities or ()))
    details = "; ".join(sorted(str(m) for m in result.messages or ()))
    where = ", ".join(sorted(str(loc) for loc in result.locations or ()))
    messages = [f"{kinds or 'incompatible'}: {details} (at {where})"]
    return CompatibilityResult(False, tuple(messages) or ("incompatible",))


def check_compatibility(new: Any, previous: Sequence[Any], level: str) -> CompatibilityResult:
    """Whether ``new`` may follow ``previous`` (oldest first) under ``level``.

    BACKWARD: new reads data of the latest; FORWARD: the latest reads data of new; FULL:
    both; the ``_TRANSITIVE`` variants check every previous version, not just the latest.
    """
    level = level.upper()
    if level not in LEVELS:
        raise ValueError(f"unknown compatibility level {level!r}")
    if level == "NONE" or not previous:
        return CompatibilityResult(True)
    against = list(previous) if level.endswith("_TRANSITIVE") else [previous[-1]]
    base = level.removesuffix("_TRANSITIVE")
    messages: list[str] = []
    for old in against:
        checks = []
        if base in ("BACKWARD", "FULL"):
            checks.append(reader_can_read(new, old))
        if base in ("FORWARD", "FULL"):
            checks.append(reader_can_read(old, new))
        for res in checks:
            messages.extend(res.messages)
    if messages:
        return CompatibilityResult(False, tuple(dict.fromkeys(messages)))
    return CompatibilityResult(True)
