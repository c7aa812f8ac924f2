"""Live ranking configuration: one JSON document in etcd, applied without restart.

Key layout (under the service's config prefix, e.g. ``/crm/config``)::

    <config_prefix>/recommendation/ranking     a RankingConfig (unknown fields rejected)

An absent key means the defaults. The watcher rejects an invalid value (other keys under
``recommendation/`` too) and keeps the last good one. Example::

    {"weights": {"content": 0.6, "cooccurrence": 0.3, "popularity": 0.1},
     "budget_tolerance": 0.1, "max_per_brand": 3,
     "lines": {"FINANCE": {"content": 0.3, "cooccurrence": 0.2, "popularity": 0.5}}}
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from crm_recommendation.domain.model import BusinessLine

__all__ = ["CONFIG_KEY", "ContentWeights", "HybridWeights", "RankingConfig", "parse"]

CONFIG_KEY = "ranking"
"""The key (relative to ``<config_prefix>/recommendation/``) of the ranking config."""


def _finite(x: float) -> float:
    if not math.isfinite(x):
        raise ValueError("must be a finite number")
    return x


Weight = Annotated[float, Field(ge=0, le=1000), AfterValidator(_finite)]
Width = Annotated[float, Field(gt=0, le=1000), AfterValidator(_finite)]
Fraction = Annotated[float, Field(ge=0, le=1), AfterValidator(_finite)]
LineName = Literal["SALE", "AFTER_SALE", "FINANCE"]


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
    lines: dict[LineName, HybridWeights] = Field(default_factory=dict)
    """Signal weights of a business line that asks with ``business_line`` set."""
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

    def hybrid(self, line: BusinessLine | None) -> tuple[float, float, float]:
        """Normalized (content, co-occurrence, popularity) weights for ``line``."""
        if line is not None and line.name in self.lines:
            return self.lines[line.name].normalized()  # type: ignore[index,unused-ignore]
        return self.weights.normalized()


def parse(key: str, raw: bytes) -> RankingConfig:
    """Parse the value of ``key`` (relative to ``<prefix>/recommendation/``)."""
    if key != CONFIG_KEY:
        raise ValueError(f"unknown config key {key!r}: expected {CONFIG_KEY!r}")
    return RankingConfig.model_validate_json(raw)
