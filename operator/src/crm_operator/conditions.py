"""Status conditions the kubectl way (pure functions, no I/O).

One ``Ready`` condition (True/False/Unknown) instead of Strimzi's ``NotReady`` set to True;
every condition has type, status, CamelCase reason, message, lastTransitionTime and
observedGeneration. lastTransitionTime moves only when the status changes, so a status
rewritten with the same facts is byte-for-byte the same and is not patched at all.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

__all__ = ["Status", "condition", "find", "merge", "now"]

Status = Literal["True", "False", "Unknown"]


def now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(
    type_: str, status: Status, reason: str, message: str, generation: int | None
) -> dict[str, Any]:
    """A condition without its lastTransitionTime (merge() sets it)."""
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message[:1000],
        "observedGeneration": generation,
    }


def find(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any] | None:
    for c in conditions or ():
        if c.get("type") == type_:
            return c
    return None


def merge(
    old: Sequence[Mapping[str, Any]] | None,
    new: Iterable[Mapping[str, Any]],
    at: str | None = None,
) -> list[dict[str, Any]]:
    """``new`` conditions with lastTransitionTime kept from ``old`` where the status did
    not change (and ``at``, default now, where it did); conditions of types not in ``new``
    are kept as they were."""
    at = at or now()
    out: dict[str, dict[str, Any]] = {str(c.get("type")): dict(c) for c in old or ()}
    for c in new:
        before = out.get(c["type"])
        same = before is not None and before.get("status") == c["status"]
        ltt = before.get("lastTransitionTime") if same and before is not None else at
        out[c["type"]] = {**c, "lastTransitionTime": ltt}
    order = {"Ready": 0}
    return sorted(out.values(), key=lambda c: (order.get(str(c["type"]), 1), str(c["type"])))
