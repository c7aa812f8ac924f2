"""Live routing configuration, one JSON document per business line in etcd.

Key layout (under the service's config prefix, e.g. ``/crm/config``)::

    <config_prefix>/assignment/SALE
    <config_prefix>/assignment/AFTER_SALE
    <config_prefix>/assignment/FINANCE

Each value is a :class:`LineConfig` (unknown fields are rejected); an absent key means the
defaults, or, with the service setting ``require_line_config``, that the line is closed
(it takes no clues and its agents get no offers). ``"enabled": false`` closes a line in
either mode. The watcher rejects an invalid value and keeps the last good one of that key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from crm_assignment.domain.model import BusinessLine

__all__ = ["CONFIG_SUBPREFIX", "LineConfig", "RoutingConfig", "RoutingWeights", "parse"]

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


_DEFAULT_LINE = LineConfig()


def parse(key: str, raw: bytes) -> LineConfig:
    """Parse the value of ``key`` (relative to ``<prefix>/assignment/``): the key must name
    a business line (``SALE``, ``AFTER_SALE``, ``FINANCE``) and the value a LineConfig."""
    if key not in BusinessLine.__members__:
        raise ValueError(
            f"unknown config key {key!r}: expected one of {', '.join(BusinessLine.__members__)}"
        )
    return LineConfig.model_validate_json(raw)


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """The effective configuration: one LineConfig per line (defaults where absent), the
    etcd revision it was applied at (0: nothing loaded yet) and whether a line needs its
    key to be open (``require_line_config``)."""

    lines: Mapping[BusinessLine, LineConfig] = field(default_factory=lambda: MappingProxyType({}))
    version: int = 0
    require_line_config: bool = False

    def line(self, line: BusinessLine) -> LineConfig:
        return self.lines.get(line, _DEFAULT_LINE)

    def is_open(self, line: BusinessLine) -> bool:
        """Whether the line takes clues and dispatches (see module doc)."""
        cfg = self.lines.get(line)
        if cfg is None:
            return not self.require_line_config
        return cfg.enabled

    @classmethod
    def from_values(
        cls,
        values: Mapping[str, LineConfig],
        version: int,
        *,
        require_line_config: bool = False,
    ) -> RoutingConfig:
        """From a watcher snapshot's values (keys are line names)."""
        lines = {BusinessLine[k]: v for k, v in values.items() if k in BusinessLine.__members__}
        return cls(
            lines=MappingProxyType(lines),
            version=version,
            require_line_config=require_line_config,
        )
