"""Field-level differences between two JSON values (pure)."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

__all__ = ["Change", "ChangeKind", "diff", "to_json"]


class ChangeKind(enum.Enum):
    ADDED = "added"
    REMOVED = "removed"
    CHANGED = "changed"


@dataclass(frozen=True, slots=True)
class Change:
    """One field that differs: ``path`` is dotted (``weights.star``); ``old``/``new`` are
    the values (None when added / removed)."""

    path: str
    kind: ChangeKind
    old: Any = None
    new: Any = None


def to_json(value: Any) -> str:
    """Canonical JSON of a value (sorted keys, no spaces)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def diff(old: Any, new: Any, path: str = "") -> list[Change]:
    """The changes from ``old`` to ``new``: objects are compared field by field (recursively),
    anything else (lists, numbers, strings) as a whole. Sorted by path."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[Change] = []
        for name in sorted(set(old) | set(new), key=str):
            sub = f"{path}.{name}" if path else str(name)
            if name not in old:
                out.append(Change(sub, ChangeKind.ADDED, None, new[name]))
            elif name not in new:
                out.append(Change(sub, ChangeKind.REMOVED, old[name], None))
            else:
                out.extend(diff(old[name], new[name], sub))
        return out
    if old == new and type(old) is type(new):
        return []
    return [Change(path, ChangeKind.CHANGED, old, new)]
