"""Live routing configuration, one JSON document per business line in etcd.

Key layout (under the service's config prefix, e.g. ``/crm/config``)::

    <config_prefix>/assignment/SALE          the well-known lines (codes 1, 2, 3)
    <config_prefix>/assignment/AFTER_SALE
    <config_prefix>/assignment/FINANCE
    <config_prefix>/assignment/LEASING       any other line: {"code": 4, ...}

A line is data: the key is its name (upper snake case), the value a :class:`LineConfig`
(unknown fields are rejected) whose ``code`` is the number requests carry in
``business_line`` (``crm.common.v1.BusinessLine`` is an open enum). The well-known lines
need no ``code``; any other name must give one (>= 4), and adding its key adds the line
(requests naming its code become valid, its agents get offers), removing the key removes
it again (INVALID_ARGUMENT). Two names with one code: the name sorting first wins.

An absent well-known key means the defaults, or, with the service setting
``require_line_config``, that the line is closed (it takes no clues and its agents get no
offers). ``"enabled": false`` closes a line in either mode. The watcher rejects an invalid
value and keeps the last good one of that key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Annotated

from crm_common.lines import LINE_NAME, MAX_LINE_CODE, WELL_KNOWN_LINES
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)

from crm_assignment.domain.model import BusinessLine

__all__ = [
    "CONFIG_SUBPREFIX",
    "LineConfig",
    "RoutingConfig",
    "RoutingWeights",
    "line_code",
    "parse",
]

CONFIG_SUBPREFIX = "assignment/"
"""The watcher watches ``<config_prefix>/assignment/``."""

MAX_MERGE_WINDOW_S = 30 * 86400


def _finite(x: float) -> float:
    if not math.isfinite(x):
        raise ValueError("must be a finite number")
    return x


Weight = Annotated[float, Field(ge=-1_000_000, le=1_000_000), AfterValidator(_finite)]
Priority = Annotated[int, Field(ge=0, le=9)]


class RoutingWeights(BaseModel):
    """Dispatch score weights (see ``crm_assignment.domain.dispatch``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    priority: Weight = 100.0
    star: Weight = 50.0
    wait_per_minute: Weight = 1.0
    brand_match: Weight = 10.0
    same_agent: Weight = 30.0
    recently_lost: Weight = -200.0


class LineConfig(BaseModel):
    """Routing configuration of one business line."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    code: int | None = Field(default=None, ge=1, le=MAX_LINE_CODE, validate_default=True)
    """The line's number in ``business_line`` of requests and events. Optional for SALE (1),
    AFTER_SALE (2) and FINANCE (3), which must keep theirs; required for any other name,
    and not one of those three."""
    enabled: bool = True
    """False closes the line: CreateClue answers FAILED_PRECONDITION, agents get no offers."""
    accept_timeout_s: int = Field(default=30, ge=1, le=3600)
    """Seconds an agent has to accept an offer before the task is recycled."""
    merge_window_s: int = Field(default=86400, ge=0, le=MAX_MERGE_WINDOW_S)
    """A clue joins an open task of the same customer created at most this long ago."""
    default_priority: Priority = 5
    """Priority of a clue that asks for none and whose source has none configured."""
    source_priority: dict[Annotated[str, Field(min_length=1, max_length=64)], Priority] = Field(
        default_factory=dict, max_length=1000
    )
    """Priority by clue source (e.g. ``{"400-hotline": 8}``)."""
    revisit_same_agent_window_s: int = Field(default=300, ge=0, le=86400)
    """A revisit is kept for its preferred agent this long after it is due."""
    candidate_limit: int = Field(default=50, ge=1, le=500)
    """How many waiting tasks one dispatch scores."""
    weights: RoutingWeights = Field(default_factory=RoutingWeights)

    @field_validator("code")
    @classmethod
    def _code_of_key(cls, code: int | None, info: ValidationInfo) -> int | None:
        """With the key as context (``parse``): the code agrees with the line's name."""
        key = (info.context or {}).get("key")
        if key is None:
            return code
        known = WELL_KNOWN_LINES.get(key)
        if known is not None:
            if code is not None and code != known:
                raise ValueError(f"{key} is code {known}: omit code or set it to {known}")
            return code
        if code is None:
            raise ValueError(f"a line other than {_WELL_KNOWN} needs its code (>= 4)")
        if code in WELL_KNOWN_LINES.values():
            raise ValueError(f"code {code} is reserved for a well-known line ({_WELL_KNOWN})")
        return code


_WELL_KNOWN = ", ".join(f"{n} = {c}" for n, c in WELL_KNOWN_LINES.items())
_DEFAULT_LINE = LineConfig()


def parse(key: str, raw: bytes) -> LineConfig:
    """Parse the value of ``key`` (relative to ``<prefix>/assignment/``): the key is a line's
    name (upper snake case, e.g. ``SALE`` or ``LEASING``) and the value a LineConfig whose
    ``code`` agrees with it (see the module doc)."""
    if LINE_NAME.fullmatch(key) is None:
        raise ValueError(
            f"config key {key!r} is not a business line name: expected upper snake case "
            f"(A-Z, 0-9, _; 1..32 characters), e.g. {', '.join(WELL_KNOWN_LINES)} or LEASING"
        )
    return LineConfig.model_validate_json(raw, context={"key": key})


def line_code(key: str, cfg: LineConfig) -> int:
    """The code of the line configured under ``key`` (a value ``parse`` accepted)."""
    if cfg.code is not None:
        return cfg.code
    return WELL_KNOWN_LINES[key]


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """The effective configuration: one LineConfig per configured line (defaults where a
    well-known line has none), each line's name, the etcd revision it was applied at (0:
    nothing loaded yet) and whether a line needs its key to be open
    (``require_line_config``)."""

    lines: Mapping[BusinessLine, LineConfig] = field(default_factory=lambda: MappingProxyType({}))
    version: int = 0
    require_line_config: bool = False
    names: Mapping[BusinessLine, str] = field(default_factory=lambda: MappingProxyType({}))
    """Configured line -> its name (its key)."""
    conflicts: tuple[str, ...] = ()
    """Keys ignored because a name sorting before them has the same code."""

    def line(self, line: BusinessLine) -> LineConfig:
        return self.lines.get(line, _DEFAULT_LINE)

    def known(self, code: int) -> bool:
        """Whether ``code`` is a line: a well-known one or a configured one."""
        return code in _WELL_KNOWN_CODES or code in self.lines

    def name(self, line: int) -> str:
        """The line's configured (or well-known) name; ``LINE_<code>`` if it has none."""
        return self.names.get(BusinessLine(line), BusinessLine(line).name)

    def all_lines(self) -> tuple[BusinessLine, ...]:
        """The well-known lines and the configured ones, by code."""
        return tuple(sorted({*BusinessLine.well_known_lines(), *self.lines}))

    def describe_lines(self) -> str:
        """``SALE = 1, AFTER_SALE = 2, FINANCE = 3, LEASING = 4`` (for error messages)."""
        return ", ".join(f"{self.name(b)} = {int(b)}" for b in self.all_lines())

    def is_open(self, line: BusinessLine) -> bool:
        """Whether the line takes clues and dispatches (see module doc)."""
        cfg = self.lines.get(line)
        if cfg is None:
            return not self.require_line_config and line in _WELL_KNOWN_CODES
        return cfg.enabled

    @classmethod
    def from_values(
        cls,
        values: Mapping[str, LineConfig],
        version: int,
        *,
        require_line_config: bool = False,
    ) -> RoutingConfig:
        """From a watcher snapshot's values (keys are line names, values parsed by
        ``parse``)."""
        lines: dict[BusinessLine, LineConfig] = {}
        names: dict[BusinessLine, str] = {}
        conflicts: list[str] = []
        for key in sorted(values):
            if LINE_NAME.fullmatch(key) is None:
                continue
            try:
                code = BusinessLine(line_code(key, values[key]))
            except (KeyError, ValueError):
                conflicts.append(key)  # not parsed by ``parse`` (a test's hand-made value)
                continue
            if code in lines:
                conflicts.append(key)
                continue
            lines[code] = values[key]
            names[code] = key
        return cls(
            lines=MappingProxyType(lines),
            version=version,
            require_line_config=require_line_config,
            names=MappingProxyType(names),
            conflicts=tuple(conflicts),
        )


_WELL_KNOWN_CODES = frozenset(WELL_KNOWN_LINES.values())
