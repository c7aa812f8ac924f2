"""Business lines are data: a line is a code (an int >= 1, ``crm.common.v1.BusinessLine``)
plus a name given by its configuration.

The proto enum declares the three well-known lines (1 SALE, 2 AFTER_SALE, 3 FINANCE); proto3
enums are open, so any other positive code travels unchanged and is a line once a service's
configuration declares it (the assignment service: ``<config_prefix>/assignment/<NAME>``
with ``"code": N``). 0 (``BUSINESS_LINE_UNSPECIFIED``) and negative codes are never lines.

This module is pure: the value type, the well-known names, and a label for any code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar

__all__ = [
    "LINE_NAME",
    "MAX_LINE_CODE",
    "WELL_KNOWN_LINES",
    "BusinessLine",
    "default_name",
]

MAX_LINE_CODE = 2**31 - 1
"""Proto enums are int32."""

WELL_KNOWN_LINES: Mapping[str, int] = MappingProxyType({"SALE": 1, "AFTER_SALE": 2, "FINANCE": 3})
"""Name -> code of the lines the proto enum declares (they need no ``code`` in config)."""

_WELL_KNOWN_NAMES: Mapping[int, str] = MappingProxyType({c: n for n, c in WELL_KNOWN_LINES.items()})

LINE_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,31}")
"""A line's name: upper snake case, 1..32 characters (it is an etcd key and a metric label)."""


class BusinessLine(int):
    """A business line's code: an ``int`` >= 1 (``BusinessLine(0)`` raises ValueError).

    ``BusinessLine.SALE`` etc. are the well-known lines; ``name`` is the well-known name or
    ``LINE_<code>`` (a configured name lives in the service's config, not here).
    """

    __slots__ = ()

    SALE: ClassVar[BusinessLine]
    AFTER_SALE: ClassVar[BusinessLine]
    FINANCE: ClassVar[BusinessLine]

    def __new__(cls, code: int) -> BusinessLine:
        if isinstance(code, bool) or not isinstance(code, int):
            raise TypeError(f"a business line code is an int, not {type(code).__name__}")
        if not 1 <= code <= MAX_LINE_CODE:
            raise ValueError(f"{code} is not a business line code (1..{MAX_LINE_CODE})")
        return super().__new__(cls, code)

    @property
    def name(self) -> str:
        return default_name(self)

    @property
    def well_known(self) -> bool:
        return int(self) in _WELL_KNOWN_NAMES

    def __repr__(self) -> str:
        return f"BusinessLine({int(self)})"

    __str__ = int.__repr__

    @classmethod
    def well_known_lines(cls) -> tuple[BusinessLine, ...]:
        return tuple(cls(c) for c in WELL_KNOWN_LINES.values())


BusinessLine.SALE = BusinessLine(1)
BusinessLine.AFTER_SALE = BusinessLine(2)
BusinessLine.FINANCE = BusinessLine(3)


def default_name(code: int) -> str:
    """The well-known name of ``code``, else ``LINE_<code>`` (a label that never fails)."""
    return _WELL_KNOWN_NAMES.get(code, f"LINE_{code}")
