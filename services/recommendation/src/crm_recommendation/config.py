"""Live ranking configuration: one JSON document in etcd, applied without restart.

Key layout (under the service's config prefix, e.g. ``/crm/config``)::

    <config_prefix>/recommendation/ranking     a RankingConfig (unknown fields rejected)

An absent key means the defaults. The watcher rejects an invalid value (other keys under
``recommendation/`` too) and keeps the last good one. Example::

    {"weights": {"content": 0.6, "cooccurrence": 0.3, "popularity": 0.1},
     "budget_tolerance": 0.1, "max_per_brand": 3,
     "lines": {"FINANCE": {"content": 0.3, "cooccurrence": 0.2, "popularity": 0.5},
               "LEASING": {"code": 4, "content": 0.2, "cooccurrence": 0.2, "popularity": 0.6},
               "5": {"content": 1, "cooccurrence": 0, "popularity": 0}}}

``lines`` is keyed by business line (lines are data, see ``crm_common.lines``): a well-known
name (SALE, AFTER_SALE, FINANCE), a code (``"5"``) or any other line name with its
``code`` (the same name and code as in the assignment config).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated

from crm_common.lines import LINE_NAME, MAX_LINE_CODE, WELL_KNOWN_LINES
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

__all__ = [
    "CONFIG_KEY",
    "ContentWeights",
    "HybridWeights",
    "LineWeights",
    "RankingConfig",
    "line_code",
    "parse",
]

CONFIG_KEY = "ranking"
"""The key (relative to ``<config_prefix>/recommendation/``) of the ranking config."""


def _finite(x: float) -> float:
    if not math.isfinite(x):
        raise ValueError("must be a finite number")
    return x


Weight = Annotated[float, Field(ge=0, le=1000), AfterValidator(_finite)]
Width = Annotated[float, Field(gt=0, le=1000), AfterValidator(_finite)]
Fraction = Annotated[float, Field(ge=0, le=1), AfterValidator(_finite)]
LineKey = Annotated[str, Field(min_length=1, max_length=32)]


class HybridWeights(BaseModel):
    """How the three signals (each 0..1) mix into the score (normalized to sum 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    content: Weight = 0.6
    """Content similarity to the cars asked about (features: price, year, mileage, brand,
    series, body type)."""
    cooccurrence: Weight = 0.3
    """Item-to-item co-interest: customers interested in the same cars."""
    popularity: Weight = 0.1
    """Recent interactions, decayed (half-life is a service setting)."""

    @model_validator(mode="after")
    def _not_all_zero(self) -> HybridWeights:
        if self.content + self.cooccurrence + self.popularity <= 0:
            raise ValueError("at least one weight must be > 0")
        return self

    def normalized(self) -> tuple[float, float, float]:
        total = self.content + self.cooccurrence + self.popularity
        return self.content / total, self.cooccurrence / total, self.popularity / total


class LineWeights(HybridWeights):
    """Signal weights of one business line; ``code`` names a line that is not well known
    and not keyed by its code."""

    code: int | None = Field(default=None, ge=1, le=MAX_LINE_CODE)


def line_code(key: str, weights: LineWeights) -> int:
    """The code the ``lines`` entry ``key`` is for; ValueError when it cannot say."""
    if key.isdigit():
        code = int(key)
        if not 1 <= code <= MAX_LINE_CODE:
            raise ValueError(f"{key}: a line code is 1..{MAX_LINE_CODE}")
    elif key in WELL_KNOWN_LINES:
        code = WELL_KNOWN_LINES[key]
    elif LINE_NAME.fullmatch(key) is None:
        raise ValueError(f"{key}: expected a line code (e.g. 4) or a line name in upper snake case")
    elif weights.code is None:
        raise ValueError(f"{key}: a line other than SALE, AFTER_SALE, FINANCE needs its code")
    else:
        code = weights.code
    if weights.code is not None and weights.code != code:
        raise ValueError(f"{key}: is code {code}, not {weights.code}")
    return code


class ContentWeights(BaseModel):
    """Blocks of the content vector and their weights. Categorical blocks are one-hot
    (cosine 1 when equal, else 0); numeric blocks are Gaussian RBF embeddings whose cosine
    is ``exp(-(d / width)^2 / 2)`` for the distance ``d`` (log price, years, log mileage)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    price: Weight = 1.0
    year: Weight = 0.5
    mileage: Weight = 0.3
    brand: Weight = 1.0
    series: Weight = 1.2
    body_type: Weight = 0.8
    price_width: Width = 0.25
    """Width of the price embedding in log(yuan): 0.25 is about +-28 %."""
    year_width: Width = 2.0
    """Width of the model year embedding, in years."""
    mileage_width: Width = 0.7
    """Width of the mileage embedding in log(1 + km)."""

    @model_validator(mode="after")
    def _not_all_zero(self) -> ContentWeights:
        blocks = (self.price, self.year, self.mileage, self.brand, self.series, self.body_type)
        if sum(blocks) <= 0:
            raise ValueError("at least one block weight must be > 0")
        return self


class RankingConfig(BaseModel):
    """The whole ranking configuration (see the module doc for the etcd key)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: HybridWeights = Field(default_factory=HybridWeights)
    """Default signal weights."""
    lines: dict[LineKey, LineWeights] = Field(default_factory=dict, max_length=1000)
    """Signal weights of a business line that asks with ``business_line`` set, keyed by
    line (see the module doc); a line without an entry uses ``weights``."""
    content: ContentWeights = Field(default_factory=ContentWeights)
    budget_tolerance: Fraction = 0.1
    """Cars up to this fraction outside the budget may be recommended (hard filter)."""
    outside_budget_penalty: Fraction = 0.3
    """A car outside the budget (inside the tolerance) loses this fraction of its score."""
    max_per_brand: int = Field(default=3, ge=1, le=100)
    """Brand diversity: at most this many cars of one brand in a Recommend answer, unless
    there are not enough other candidates."""
    history_weight: Fraction = 0.5
    """A known customer's past cars count as intent cars of this weight (times the
    interaction strength; 0 ignores the history)."""
    history_cars: int = Field(default=10, ge=0, le=100)
    """At most this many past cars (strongest first) are used."""
    exclude_seen: bool = True
    """Never recommend cars the customer already interacted with."""
    popular_threshold: Fraction = 0.5
    """A car gets the "popular" reason when its popularity signal is at least this."""

    _by_code: dict[int, LineWeights] = PrivateAttr(default_factory=dict)

    @field_validator("lines")
    @classmethod
    def _one_entry_per_line(cls, lines: dict[str, LineWeights]) -> dict[str, LineWeights]:
        seen: dict[int, str] = {}
        for key, weights in lines.items():
            code = line_code(key, weights)
            if code in seen:
                raise ValueError(f"{key} and {seen[code]} are both line {code}")
            seen[code] = key
        return lines

    def model_post_init(self, context: object, /) -> None:
        self._by_code.update({line_code(k, w): w for k, w in self.lines.items()})

    @property
    def lines_by_code(self) -> Mapping[int, LineWeights]:
        return self._by_code

    def hybrid(self, line: int | None) -> tuple[float, float, float]:
        """Normalized (content, co-occurrence, popularity) weights for ``line`` (a code)."""
        if line is not None and line in self._by_code:
            return self._by_code[line].normalized()
        return self.weights.normalized()


def parse(key: str, raw: bytes) -> RankingConfig:
    """Parse the value of ``key`` (relative to ``<prefix>/recommendation/``)."""
    if key != CONFIG_KEY:
        raise ValueError(f"unknown config key {key!r}: expected {CONFIG_KEY!r}")
    return RankingConfig.model_validate_json(raw)
