"""Hybrid ranking over a :class:`~crm_recommendation.index.CarIndex` (pure: no I/O).

1. *Seeds*: the intent cars (weight 1) and, for a known customer, their strongest past
   cars (``history_weight`` x interaction strength / 4).
2. *Hard filters* (never violated): on sale, in the city when given, price inside the
   budget widened by ``budget_tolerance``, not excluded, not a seed intent car, not seen
   by the customer (``exclude_seen``).
3. *Signals*, each 0..1 per candidate:
   content  = max over seeds of ``seed weight x cosine`` of the block-weighted feature
              vectors (one-hot brand / series / body type; RBF-embedded log price, year,
              log mileage, whose cosine has the closed form ``exp(-(d/width)^2/2)``);
   co-interest = sum over seeds of ``seed weight x item-item cosine``, divided by the
              best candidate's;
   popularity = ``sqrt(decayed weight / best candidate's)``.
   score = weighted sum (weights normalized, per business line if configured), times
   ``1 - outside_budget_penalty`` outside the strict budget; rounded to 6 decimals.
4. *Order*: score descending, then car id ascending (equal data -> equal order on every
   replica); at most ``max_per_brand`` cars of a brand unless too few others qualify.
5. *Reasons* are derived from the same data (same series/brand as a named seed, within
   budget, popular in the city, co-interest with a named seed), strongest first.

How it stays cheap per call: the candidates are a price range of the city's
:class:`~crm_recommendation.index.onsale.OnSaleColumns` (views of every column, no
gather, no sort); excluded cars inside the range are not cut out but marked (their
co-interest and popularity do not count in the normalization, their score is -inf and the
selection never takes one); the three numeric blocks of content similarity are one
(seeds x blocks x candidates) pass; co-interest neighbours are found by their on-sale key.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from crm_common.errors import NotFound

from crm_recommendation.config import ContentWeights, RankingConfig
from crm_recommendation.domain.model import (
    KIND_WEIGHT,
    BodyType,
    Car,
    Reason,
    ReasonKind,
    Recommendation,
    Recommendations,
    RecommendQuery,
    fast_constructor,
)
from crm_recommendation.index.car_index import CarIndex
from crm_recommendation.index.onsale import OnSaleColumns

__all__ = ["Seed", "budget_bounds", "candidates", "recommend", "similar_cars"]

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
I32 = npt.NDArray[np.int32]

SCORE_DECIMALS = 6
# the reductions as ufunc methods, called directly: ``a.max()`` / ``np.flatnonzero(a)`` go
# through Python wrappers (~1 us a call, tens of calls per answer); the same C functions
_max = np.maximum.reduce
_min = np.minimum.reduce
_all = np.logical_and.reduce
_any = np.logical_or.reduce


def _nonzero(a: npt.NDArray[np.bool_]) -> I64:
    """``np.flatnonzero`` of a 1-d array, without its wrappers."""
    return a.nonzero()[0]


_MAX_KIND_WEIGHT = 4.0
_SIMILAR_MIN = 0.5  # content similarity from which "similar car" is said
_MASK_WEIGHT = tuple(
    max((w for k, w in KIND_WEIGHT.items() if m & (1 << k)), default=0) for m in range(64)
)
"""``kind_mask_weight`` of every mask (bits 1..4)."""


@dataclass(frozen=True, slots=True)
class Seed:
    """A car the ranking starts from."""

    slot: int
    car: Car
    weight: float
    source: Literal["intent", "history", "similar"]

    def label(self) -> str:
        if self.source == "intent":
            return f"the {self.car.title} asked about"
        if self.source == "history":
            return f"the {self.car.title} seen before"
        return f"the {self.car.title} (car {self.car.id})"


_seed = fast_constructor(Seed)
_recommendation = fast_constructor(Recommendation)
_reason = fast_constructor(Reason)


@dataclass(frozen=True, slots=True)
class _SeedArrays:
    """The seeds as columns (in seed order)."""

    slots: I64
    weight: F64
    features: F32
    """``(3, seeds)``, as ``CarIndex.features``."""
    brand: I32
    series: I32
    body: I32
    variant: I32

    @classmethod
    def of(cls, index: CarIndex, seeds: list[Seed]) -> _SeedArrays:
        slots = np.array([sd.slot for sd in seeds], np.int64)
        return _seed_arrays(
            slots,
            np.array([sd.weight for sd in seeds], np.float64),
            index.features[:, slots],
            index.brand[slots],
            index.series[slots],
            index.body[slots],
            index.variant[slots],
        )


@dataclass(frozen=True, slots=True)
class _Signals:
    """The signals of the candidates that can still make the answer: rows ``at`` of the
    candidate columns (None: every row; see :func:`_signals`)."""

    at: I64 | None
    content: F64
    model: _Content | None
    """The content model of the call (None: content not used), for :meth:`_Content.best_seed`."""
    cooccurrence: F64
    popularity: F64
    score: F64
    """-inf for an excluded candidate (never selected)."""
    cooc_entries: tuple[I64, I64, F64] | None
    """The seeds' co-occurrence entries that are candidates, in seed order: (candidate
    row, seed position, seed weight x cosine); None when co-interest is not used."""


_signals_of = fast_constructor(_Signals)
_seed_arrays = fast_constructor(_SeedArrays)


def budget_bounds(
    budget_min: int, budget_max: int, tolerance: float
) -> tuple[float | None, float | None]:
    """The hard price range: the budget widened by ``tolerance`` (None: unbounded)."""
    lo = budget_min * (1.0 - tolerance) if budget_min > 0 else None
    hi = budget_max * (1.0 + tolerance) if budget_max > 0 else None
    return lo, hi


def candidates(
    index: CarIndex,
    city: str | None,
    lo: float | None,
    hi: float | None,
    excluded: set[int],
) -> I64:
    """Slots passing the hard filters, ascending (the set :func:`recommend` ranks)."""
    found = index.on_sale_slots(city, lo, hi)
    if excluded and len(found):
        gone = np.fromiter(excluded, np.int64, len(excluded))
        at = np.minimum(found.searchsorted(gone), len(found) - 1)
        at = at[found[at] == gone]
        if len(at):
            found = np.delete(found, at)
    return found


def _seeds(
    index: CarIndex, cfg: RankingConfig, q: RecommendQuery
) -> tuple[list[Seed], list[int], list[int]]:
    """Seeds, ignored intent ids, slots the customer has seen."""
    seeds: list[Seed] = []
    ignored: list[int] = []
    taken: set[int] = set()
    slot_of, cars = index.slot_of, index.cars
    for car_id in dict.fromkeys(q.intent_car_ids):
        slot = slot_of.get(car_id)
        car = None if slot is None else cars[slot]
        if slot is None or car is None:
            ignored.append(car_id)
            continue
        seeds.append(_seed(slot, car, 1.0, "intent"))
        taken.add(slot)
    seen: list[int] = []
    if q.customer_id is not None:
        seen, masks = index.customer_items(q.customer_id)
        if seen and cfg.history_weight > 0 and cfg.history_cars > 0:
            past = []
            for slot, mask in zip(seen, masks, strict=True):
                car = cars[slot]
                if car is not None and slot not in taken:
                    past.append((-_MASK_WEIGHT[mask], car.id, slot, car))
            past.sort()
            for neg_w, _, slot, car in past[: cfg.history_cars]:
                weight = cfg.history_weight * (-neg_w) / _MAX_KIND_WEIGHT
                seeds.append(_seed(slot, car, weight, "history"))
    return seeds, ignored, seen


def _signals(
    index: CarIndex,
    cfg: RankingConfig,
    cols: OnSaleColumns,
    excluded: I64,
    seeds: list[Seed],
    weights: tuple[float, float, float],
    budget: tuple[int, int],
    count: int,
    per_brand: int,
) -> _Signals:
    """The signals and scores of the candidates (``cols`` but its ``excluded`` rows) that
    can make the answer.

    Co-interest and popularity are cheap (sparse rows; one gather) and computed for every
    candidate; so is the normalization by the best candidate. Content similarity costs
    seeds x candidates. With many candidates (``_PRUNE_FROM``) it is computed exactly only
    where it can matter: an upper bound of each candidate's score (:func:`_content_bound`)
    ranks them; a brand-diverse sample of the best is scored exactly and selected (brand
    cap included), which gives a cut no higher than the true one (more candidates can only
    raise it); every candidate whose bound reaches that cut is then scored exactly and the
    rest, which cannot make the answer, are left out. The answer is the same as scoring
    every candidate."""
    n = len(cols)
    w_content, w_cooc, w_pop = weights
    sa = _SeedArrays.of(index, seeds) if seeds else None
    zeros = np.zeros(n)  # never modified
    cooc = pop = rest = zeros
    entries: tuple[I64, I64, F64] | None = None
    if sa is not None and w_cooc > 0:
        which, nbr, weight = index.pairs.rows(sa.slots)
        row = cols.rows_of(nbr)
        hit = _nonzero(row >= 0)  # the neighbours that are candidates
        if len(hit):
            row, which = row[hit], which[hit]
            cos = index.cosines(sa.slots[which], nbr[hit], weight[hit])
            contrib = sa.weight[which] * cos
            entries = (row, which, contrib)
            # summed per candidate in seed order (the same float sums on every replica)
            summed = np.bincount(row, weights=contrib, minlength=n)
            if len(excluded):
                summed[excluded] = 0.0
            top = float(_max(summed))
            if top > 0:
                cooc = summed / top
                rest = w_cooc * cooc
    if w_pop > 0:
        logpop = index.logpop[cols.slots]
        if len(excluded):
            logpop[excluded] = -np.inf
        top = float(_max(logpop))
        if np.isfinite(top):
            logpop -= top
            logpop *= 0.5
            # float32: a vectorized exp (the float64 one is scalar), 7 digits are plenty
            pop = np.exp(logpop.astype(np.float32)).astype(np.float64)
            rest = rest + w_pop * pop
    factor: F64 | None = None
    budget_min, budget_max = budget
    if cfg.outside_budget_penalty > 0 and (budget_min > 0 or budget_max > 0):
        # the rows are sorted by price: the ones outside the budget are a prefix and a suffix
        price = cols.price
        below = int(price.searchsorted(budget_min)) if budget_min > 0 else 0
        above = int(price.searchsorted(budget_max, "right")) if budget_max > 0 else n
        if below > 0 or above < n:
            factor = np.ones(n)
            factor[:below] = 1.0 - cfg.outside_budget_penalty
            factor[above:] = 1.0 - cfg.outside_budget_penalty

    def scored(content: F64 | None, at: I64 | None) -> F64:
        if content is None:
            raw = rest.copy() if at is None else rest[at]
        else:
            raw = w_content * content
            raw += rest if at is None else rest[at]
        if factor is not None:
            raw *= factor if at is None else factor[at]
        return raw.round(SCORE_DECIMALS, out=raw)

    if sa is None or w_content <= 0:
        score = scored(None, None)
        if len(excluded):
            score[excluded] = -np.inf
        return _signals_of(None, np.zeros(n), None, cooc, pop, score, entries)
    model = _Content(index, cfg.content, sa, cols)
    keep: I64 | None = None
    if len(seeds) * n > _PRUNE_FROM:
        bound = w_content * _content_bound(index, cfg.content, cols, sa) + rest
        if factor is not None:
            bound *= factor
        if len(excluded):
            bound[excluded] = -np.inf
        # a sample: the best by bound, brand-capped too (else one brand could fill it)
        sample, _ = _select_capped(
            cols.ids, cols.brand, bound, _SAMPLE_COUNT * count, _SAMPLE_PER_BRAND * per_brand,
            rounded=False,
        )  # fmt: skip
        at = np.array(sample, dtype=np.int64)
        content = model.content(at)
        score = scored(content, at)
        chosen, capped = _select_capped(cols.ids[at], cols.brand[at], score, count, per_brand)
        if capped:  # else: no cut (every candidate may be needed)
            cut = float(score[chosen[-1]])
            keep = _nonzero(bound + _BOUND_MARGIN >= cut)
    if keep is None:
        content = model.content(None)
        score = scored(content, None)
        if len(excluded):
            score[excluded] = -np.inf
        return _signals_of(None, content, model, cooc, pop, score, entries)
    # the kept rows hold no excluded one (their bound is -inf)
    content = model.content(keep)
    return _signals_of(keep, content, model, cooc[keep], pop[keep], scored(content, keep), entries)


_PRUNE_FROM = 200_000
"""Seeds x candidates from which the upper bound pays for itself (measured: below, one
exact pass over every candidate is cheaper than the bound, sample and cut)."""
_SAMPLE_COUNT, _SAMPLE_PER_BRAND = 8, 4
_BOUND_MARGIN = 1e-5
"""Float slack between a bound (float64) and an exact content score (float32 sums)."""


@dataclass(frozen=True, slots=True)
class _ContentConstants:
    """What a ContentWeights gives the content model (computed once per config)."""

    total: float
    rows: list[int]
    """Rows of ``CarIndex.features`` of the numeric blocks in use."""
    widths: tuple[float, ...]
    scale: F32
    """``(blocks, 1)``: ``sqrt(1/2) / width``."""
    log_weight: F32
    """``(blocks, 1)``: log of the block's share of the total weight."""
    numeric_max: np.float32
    """The most the numeric blocks give together."""
    categorical: list[tuple[np.float32, int]]
    """``(share of the total weight, variant column: 0 brand, 1 series, 2 body)``."""
    scaled_key: tuple[object, ...]
    """The key of :meth:`scaled` features in ``OnSaleColumns.derive``."""
    table_key: tuple[object, ...]
    """The key of the categorical table in ``CarIndex.variant_derived``."""

    def scaled(self, features: F32) -> F32:
        """The numeric blocks of ``features`` times their ``scale``, ``(blocks, n)``."""
        return np.ascontiguousarray(features[self.rows] * self.scale)


def _constants(cw: ContentWeights) -> _ContentConstants:
    """The constants of ``cw``: found by the object first (the live config is one object
    until it changes; hashing a pydantic model hashes every field, ~10 us), then by value."""
    found = _CONSTANTS_OF.get(id(cw))
    if found is not None and found[0] is cw:
        return found[1]
    if len(_CONSTANTS_OF) >= 16:
        _CONSTANTS_OF.clear()
    made = _constants_by_value(cw)
    _CONSTANTS_OF[id(cw)] = (cw, made)  # (holding cw: its id is not reused meanwhile)
    return made


_CONSTANTS_OF: dict[int, tuple[ContentWeights, _ContentConstants]] = {}


@functools.lru_cache(maxsize=16)
def _constants_by_value(cw: ContentWeights) -> _ContentConstants:
    total = cw.price + cw.year + cw.mileage + cw.brand + cw.series + cw.body_type
    blocks = [
        b for b in ((0, cw.price, cw.price_width), (1, cw.year, cw.year_width),
                    (2, cw.mileage, cw.mileage_width))
        if b[1] > 0
    ]  # fmt: skip
    rows = [b[0] for b in blocks]
    widths = tuple(b[2] for b in blocks)
    categorical = [
        (np.float32(weight / total), column)
        for column, weight in enumerate((cw.brand, cw.series, cw.body_type))
        if weight > 0
    ]
    return _ContentConstants(
        total,
        rows,
        widths,
        np.array([math.sqrt(0.5) / b[2] for b in blocks], np.float32).reshape(-1, 1),
        np.array([math.log(b[1] / total) for b in blocks], np.float32).reshape(-1, 1),
        np.float32(sum(b[1] for b in blocks) / total),
        categorical,
        ("content", tuple(rows), widths),
        ("categorical", tuple(categorical)),
    )


def _numeric_blocks(cw: ContentWeights) -> list[tuple[int, float, float]]:
    """``(row of CarIndex.features, weight, width)`` of the numeric blocks in use."""
    blocks = (
        (0, cw.price, cw.price_width), (1, cw.year, cw.year_width),
        (2, cw.mileage, cw.mileage_width),
    )  # fmt: skip
    return [b for b in blocks if b[1] > 0]


def _content_bound(
    index: CarIndex, cw: ContentWeights, cols: OnSaleColumns, sa: _SeedArrays
) -> F64:
    """An upper bound of :func:`_content` per candidate, in O(candidates x blocks):

    - numeric blocks: each block's similarity to the *nearest* seed value of that block
      (binary search over the sorted seed values), which no single seed can beat;
    - categorical blocks: tables over brand / series / body type codes hold, per code,
      the largest seed weight and weighted categorical similarity a seed sharing that
      code can give (series implies brand; body type counted as shared where it may be);
      looked up by each candidate's variant.
    """
    total = _constants(cw).total
    n = len(cols)
    numeric = np.zeros(n)
    for row, weight, width in _numeric_blocks(cw):
        values = np.unique(sa.features[row]).astype(np.float64)
        x = cols.features[row].astype(np.float64)
        at = values.searchsorted(x)
        below = x - values[np.maximum(at - 1, 0)]
        above = values[np.minimum(at, len(values) - 1)] - x
        d = np.minimum(np.abs(below), np.abs(above)) * (1.0 / width)
        numeric += (weight / total) * np.exp(-0.5 * d * d)
    brand, series, body = cw.brand / total, cw.series / total, cw.body_type / total
    weights = sa.weight
    bound: F64 = weights.max() * numeric
    v_brand, v_series, v_body = index.variants()
    for seed_codes, of_variant, size, same in (
        (sa.series, v_series, len(index.series_vocab.names), brand + series + body),
        (sa.brand, v_brand, len(index.brands.names), brand + body),
        (sa.body, v_body, int(max(BodyType)) + 1, body),
    ):
        top_weight = np.zeros(size)
        np.maximum.at(top_weight, seed_codes, weights)
        top_same = np.zeros(size)
        np.maximum.at(top_same, seed_codes, weights * same)
        code = of_variant[cols.variant]
        np.maximum(bound, top_weight[code] * numeric + top_same[code], out=bound)
    return bound


class _Content:
    """Content similarity of the candidates (rows of ``cols``) to the seeds for one call.
    float32, element-wise only (a candidate's value does not depend on the other
    candidates), blocks added in the same order for every candidate:

    - categorical blocks: a (seeds x variants) table of brand / series / body type
      similarity, gathered by each candidate's variant (series + body type);
    - numeric blocks: ``exp(log(block weight) - (distance / width)^2 / 2)``, every block
      of every seed in one (seeds x blocks x candidates) pass, on the list's features
      scaled once per config (``OnSaleColumns.derive``).

    :meth:`content` is the max over seeds of ``seed weight x similarity``. The seeds come
    strongest first; the *leading* ones (the weight of the first) are scored against every
    candidate, the others only where they can beat that: a weaker seed gives at most its
    weight x (categorical similarity + every numeric block's weight), a per-variant table.
    Exact: a seed skipped for a candidate could not have been its max."""

    __slots__ = (
        "_c", "_categorical", "_last", "_lead", "_lead_ones", "_seed_x", "_table", "_variant",
        "_weight", "_x",
    )  # fmt: skip

    def __init__(
        self, index: CarIndex, cw: ContentWeights, sa: _SeedArrays, cols: OnSaleColumns
    ) -> None:
        c = self._c = _constants(cw)
        variants = index.variants()
        of_seed = (sa.brand, sa.series, sa.body)
        self._categorical = [
            (weight, of_seed[column], variants[column]) for weight, column in c.categorical
        ]
        self._table: F32 | None = None
        if len(variants[0]) <= _MAX_VARIANT_TABLE:  # rows of the variant x variant table
            self._table = _variant_table(index, c)[sa.variant]
        elif len(variants[0]) <= 2 * len(cols):  # else: a large vocabulary, few candidates
            table = np.zeros((len(sa.slots), len(variants[0])), np.float32)
            for weight, seed_codes, of_variant in self._categorical:
                table += (of_variant[None, :] == seed_codes[:, None]) * weight
            self._table = table
        self._variant = cols.variant
        self._x = cols.derive(c.scaled_key, c.scaled)  # (blocks, n)
        seed_x = (sa.features if len(c.rows) == 3 else sa.features[c.rows]) * c.scale
        self._seed_x = np.ascontiguousarray(seed_x.T)[:, :, None]  # (seeds, blocks, 1)
        w = self._weight = sa.weight.astype(np.float32)
        same = w == w[0]
        self._lead = len(w) if _all(same) else int(same.argmin())  # the leading seeds
        self._lead_ones = bool(w[0] == 1.0)
        self._last: tuple[I64 | None, int, F32, I64 | None, F32 | None] | None = None

    def sims(self, at: I64 | None, first: int = 0, last: int | None = None) -> F32:
        """The (seeds ``first:last`` x candidates ``at``) weighted similarities (``at``
        None: every candidate)."""
        seeds = slice(first, last)
        variant = self._variant if at is None else self._variant[at]
        if self._table is not None:
            sims = self._table[seeds].take(variant, axis=1)
        else:  # compare directly (the same sums as the table's)
            sims = np.zeros((len(self._weight[seeds]), len(variant)), np.float32)
            for weight, seed_codes, of_variant in self._categorical:
                sims += (of_variant[variant][None, :] == seed_codes[seeds][:, None]) * weight
        blocks = len(self._c.rows)
        if blocks:
            x = self._x if at is None else self._x[:, at]
            d = np.subtract(x[None], self._seed_x[seeds], order="C")  # (seeds, blocks, n)
            np.multiply(d, d, out=d)
            np.subtract(self._c.log_weight, d, out=d)
            np.exp(d, out=d)
            for b in range(blocks):
                sims += d[:, b]
        if first == 0 and self._lead_ones and (last is None or last <= self._lead):
            return sims  # seeds of weight 1 (times 1 changes nothing)
        seed_weight = self._weight[seeds]
        if not _all(seed_weight == 1.0):  # (times 1 changes nothing)
            sims *= seed_weight[:, None]
        return sims

    def content(self, at: I64 | None) -> F64:
        """Each candidate's (``at``; None: all) max over seeds of weighted similarity (see
        the class doc); :meth:`best_seed` then tells which seed gave it."""
        weight = self._weight
        lead = self._lead
        if lead < len(weight) and self._table is None:  # few candidates: all in one pass
            lead = len(weight)
        sims = self.sims(at, 0, lead)
        best: F32 = sims.max(axis=0)
        need: I64 | None = None
        rest: F32 | None = None
        if lead < len(weight) and self._table is not None:
            variant = self._variant if at is None else self._variant[at]
            reach = (self._table[lead:] + self._c.numeric_max) * weight[lead:, None]
            need = _nonzero(_max(reach, axis=0)[variant] + _SEED_MARGIN >= best)
            if len(need):
                rest = self.sims(need if at is None else at[need], lead)
                best[need] = np.maximum(best[need], _max(rest, axis=0))
        self._last = (at, lead, sims, need, rest)
        out: F64 = best.astype(np.float64)
        return out

    def best_seed(self, positions: I64) -> list[int]:
        """The seed giving the max of :meth:`content`'s last call at these positions of its
        candidates (the earlier seed on ties, as ``argmax`` over every seed)."""
        if self._last is None:
            raise RuntimeError("best_seed before content")
        _, lead, sims, need, rest = self._last
        sub = sims[:, positions]
        best = _max(sub, axis=0)
        seed = sub.argmax(axis=0)
        if need is not None and rest is not None and len(need):
            at = np.minimum(need.searchsorted(positions), len(need) - 1)
            there = need[at] == positions
            if _any(there):
                other = rest[:, at[there]]
                better = _max(other, axis=0) > best[there]
                seed[_nonzero(there)[better]] = other.argmax(axis=0)[better] + lead
        return seed.tolist()  # type: ignore[no-any-return]


def _variant_table(index: CarIndex, c: _ContentConstants) -> F32:
    """The categorical similarity of every variant to every variant (the same float32
    sums as a seed's row), kept by the index until a variant appears."""

    def make() -> F32:
        variants = index.variants()
        table = np.zeros((len(variants[0]), len(variants[0])), np.float32)
        for weight, column in c.categorical:
            codes = variants[column]
            table += (codes[None, :] == codes[:, None]) * weight
        return table

    return index.variant_derived(c.table_key, make)


_MAX_VARIANT_TABLE = 1024
"""Variants up to which the variant x variant table is kept (4 MB)."""
_SEED_MARGIN = np.float32(1e-5)
"""Float slack between a seed's reach (float32) and its exact similarity (float32 sums)."""


def _top(ids: I64, score: F64, pool: I64 | None, m: int, rounded: bool = True) -> I64:
    """The best ``m`` positions of ``pool`` (every position when None) in rank order
    (score desc, car id asc); ``rounded``: the scores are an answer's (see
    :func:`_rank_order`)."""
    if pool is None and rounded and len(score) > m:
        key = _packed_key(ids, score)
        if key is not None:  # one int64 key per car, all distinct: no tie at the cut
            picked = key.argpartition(m - 1)[:m]
            return picked[key[picked].argsort()]
    values = score if pool is None else score[pool]
    if len(values) > m:
        kth = np.partition(values, len(values) - m)[len(values) - m]
        picked = _nonzero(values >= kth)  # every tie at the cut, then ordered by id
        if pool is not None:
            picked = pool[picked]
    else:
        picked = np.arange(len(values)) if pool is None else pool
    return picked[_rank_order(ids[picked], score[picked], rounded)[:m]]


def _packed_key(ids: I64, score: F64) -> I64 | None:
    """For rounded scores (multiples of 1e-6 in [0, 1], or -inf) and ids in [0, 2**43):
    one int64 per car ordering as (score desc, car id asc), -inf last; None for other
    ids."""
    if len(ids) == 0 or _min(ids) < 0 or _max(ids) >= _MAX_PACKED_ID:
        return None
    ticks = np.rint(score * _SCORE_SCALE)
    np.maximum(ticks, -1.0, out=ticks)  # -inf: one tick below 0, after every score
    key: I64 = (_SCORE_SCALE - ticks.astype(np.int64)) << _ID_BITS
    key |= ids
    return key


def _rank_order(ids: I64, score: F64, rounded: bool) -> I64:
    """The order of these cars by score desc, then car id asc. ``rounded``: the scores
    are an answer's, multiples of 1e-6 in [0, 1] (or -inf): with ids below 2**43, score
    ticks and id then make one int64 key, one sort instead of a two-key lexsort."""
    if rounded:
        key = _packed_key(ids, score)
        if key is not None:
            return key.argsort()
    return np.lexsort((ids, -score))


_SCORE_SCALE = 10**SCORE_DECIMALS
_ID_BITS = 43
_MAX_PACKED_ID = 1 << _ID_BITS


def _select(ids: I64, brands: I32, score: F64, count: int, per_brand: int) -> list[int]:
    """Positions of the answer among candidates with these ``ids``, ``brands`` and
    ``score`` (-inf: not a candidate): the rank order (score desc,
    car id asc) walked with at most ``per_brand`` cars of a brand; when the candidates run
    out, the passed-over cars fill the answer up in rank order."""
    chosen, capped = _select_capped(ids, brands, score, count, per_brand)
    if capped:
        return chosen
    # every candidate walked or of a full brand: fill up with the passed-over cars
    rest = score > -np.inf
    rest[np.array(chosen, dtype=np.intp)] = False
    pool = _nonzero(rest)
    if len(pool) == 0:
        return chosen
    fill: list[int] = _top(ids, score, pool, count - len(chosen)).tolist()
    return chosen + fill


def _select_capped(
    ids: I64, brands: I32, score: F64, count: int, per_brand: int, rounded: bool = True
) -> tuple[list[int], bool]:
    """The brand-capped walk of :func:`_select` without the fill-up: the positions chosen
    and whether they are ``count`` (then the last one's score is the answer's cut).

    The walk takes a car when fewer than ``per_brand`` cars of its brand were taken. It is
    online, so walking a prefix of the rank order takes the same cars as walking all of
    it: the prefix (a partition, then a sort of that prefix only) grows until the walk
    has ``count`` cars or the candidates (scores above -inf) run out."""
    n = len(score)
    if n == 0 or count <= 0:
        return [], False
    m = min(n, max(24 * count, 512))
    while True:
        prefix = _top(ids, score, None, m, rounded)  # the first m of the rank order
        chosen: list[int] = []
        last = len(prefix)
        if score[prefix[-1]] == -np.inf:  # the candidates end inside the prefix
            last = int((score[prefix] == -np.inf).argmax())
        codes = brands[prefix[:last]]  # brand codes: small ints >= 0
        per = [0] * (int(_max(codes)) + 1 if last else 1)  # cars taken per brand code
        for pos, brand in zip(prefix[:last].tolist(), codes.tolist(), strict=True):
            if per[brand] < per_brand:
                per[brand] += 1
                chosen.append(pos)
                if len(chosen) == count:
                    return chosen, True
        if m >= n or last < len(prefix):
            return chosen, False
        m = min(n, 4 * m)


def _cooc_seeds(sig: _Signals, rows: I64) -> list[int]:
    """For each candidate row of the answer (``rows``), the index of the seed contributing
    most co-interest (-1: none; the earlier seed on ties)."""
    k = len(rows)
    picked = [-1] * k
    if sig.cooc_entries is None or k == 0 or len(sig.cooc_entries[0]) == 0:
        return picked
    row, which, contrib = sig.cooc_entries
    order = rows.argsort()
    ordered = rows[order]
    at = np.minimum(ordered.searchsorted(row), k - 1)
    hit = _nonzero(ordered[at] == row)  # the entries of answer cars, in seed order
    best = [0.0] * k
    for i, seed, value in zip(
        order[at[hit]].tolist(), which[hit].tolist(), contrib[hit].tolist(), strict=True
    ):  # in seed order: the first of equal contributions stays
        if value > best[i]:
            best[i] = value
            picked[i] = seed
    return picked


# the reason kinds as module constants (an enum attribute lookup costs ~10x a global's)
_SAME_SERIES = ReasonKind.SAME_SERIES
_SAME_BRAND = ReasonKind.SAME_BRAND
_SIMILAR_CAR = ReasonKind.SIMILAR_CAR
_WITHIN_BUDGET = ReasonKind.WITHIN_BUDGET
_NEAR_BUDGET = ReasonKind.NEAR_BUDGET
_POPULAR = ReasonKind.POPULAR
_ALSO_INTERESTED = ReasonKind.ALSO_INTERESTED
_ON_SALE = ReasonKind.ON_SALE


def _explain(
    index: CarIndex,
    cfg: RankingConfig,
    seeds: list[Seed],
    cols: OnSaleColumns,
    sig: _Signals,
    chosen: list[int],
    weights: tuple[float, float, float],
    budget: tuple[int, int],
) -> tuple[Recommendation, ...]:
    """The chosen cars with their scores and reasons, strongest first:

    - content: same series as the first seed of that series, else same brand as the first
      seed of that brand, else "similar" to the seed contributing most content similarity
      (the earlier seed on ties) when it has the same body type and gives at least half
      its weight;
    - co-interest: the seed contributing most co-occurrence;
    - popularity: at or above the configured threshold;
    - budget: within, or how far outside; "on sale" when nothing else applies.

    Reasons are immutable values: one object serves every car of the answer it applies to.
    """
    if not chosen:
        return ()
    w_content, w_cooc, w_pop = weights
    at = np.array(chosen, dtype=np.int64)
    rows = at if sig.at is None else sig.at[at]
    slots = cols.slots[rows]
    k = len(at)
    cars = index.cars
    answer = [cars[s] for s in slots.tolist()]
    scores = sig.score[at].tolist()
    made: dict[_ReasonKey, Reason] = {}

    def reason(key: _ReasonKey) -> Reason:
        found = made.get(key)
        if found is None:
            found = made[key] = _make_reason(key, seeds, budget)
        return found

    # the content reason of each car (None: none), with its strength
    content_keys: list[_ReasonKey | None] = [None] * k
    content: list[float] = [0.0] * k
    if seeds and w_content > 0 and sig.model is not None:
        content = sig.content[at].tolist()
        by_series: dict[int, int] = {}
        by_brand: dict[int, int] = {}
        seed_slots = [sd.slot for sd in seeds]
        for i, code in enumerate(index.series[seed_slots].tolist()):
            by_series.setdefault(code, i)
        for i, code in enumerate(index.brand[seed_slots].tolist()):
            by_brand.setdefault(code, i)
        unmatched: list[int] = []
        for i, (series, brand) in enumerate(
            zip(index.series[slots].tolist(), index.brand[slots].tolist(), strict=True)
        ):
            found = by_series.get(series)
            if found is not None:
                content_keys[i] = (_SAME_SERIES, found, "")
                continue
            found = by_brand.get(brand)
            if found is not None:
                content_keys[i] = (_SAME_BRAND, found, "")
            else:
                unmatched.append(i)
        if unmatched and sig.model is not None:  # the seed contributing most: "similar"
            best_seeds = sig.model.best_seed(at[unmatched])
            for i, best in zip(unmatched, best_seeds, strict=True):
                seed, car = seeds[best], answer[i]
                assert car is not None
                if seed.car.body_type == car.body_type and content[i] >= _SIMILAR_MIN * seed.weight:
                    content_keys[i] = (_SIMILAR_CAR, best, _BODY_NAMES[car.body_type])
    cooc_seeds = _cooc_seeds(sig, rows) if w_cooc > 0 else [-1] * k
    cooc = (w_cooc * sig.cooccurrence[at]).tolist() if w_cooc > 0 else [0.0] * k
    pop = sig.popularity[at].tolist() if w_pop > 0 else [0.0] * k
    popular = cfg.popular_threshold
    budget_min, budget_max = budget
    has_budget = budget_min > 0 or budget_max > 0
    within: Reason | None = None
    # the reasons an answer shares, made on first use: per seed, per city, per budget text
    by_seed: dict[int, Reason] = {}
    by_city: dict[str, Reason] = {}
    last: Reason | None
    out = []
    for i, car in enumerate(answer):
        assert car is not None
        # (strength, reason) of content, co-interest, popularity, strongest first; equal
        # strengths keep this order (as a stable sort)
        key = content_keys[i]
        first = None if key is None else made.get(key) or reason(key)
        s1 = w_content * content[i]
        second: Reason | None = None
        s2 = 0.0
        cooc_seed = cooc_seeds[i]
        if cooc_seed >= 0:
            shared = by_seed.get(cooc_seed)
            if shared is None:
                shared = by_seed[cooc_seed] = reason((_ALSO_INTERESTED, cooc_seed, ""))
            s2 = cooc[i]
            if first is None:
                first, s1 = shared, s2
            elif s2 > s1:
                first, second, s1, s2 = shared, first, s2, s1
            else:
                second = shared
        third: Reason | None = None
        p = pop[i]
        if p >= popular and p > 0:
            city = car.city
            shared = by_city.get(city)
            if shared is None:
                shared = by_city[city] = reason((_POPULAR, 0, city))
            s3 = w_pop * p
            if first is None:
                first = shared
            elif second is None:
                if s3 > s1:
                    first, second = shared, first
                else:
                    second = shared
            elif s3 > s1:
                first, second, third = shared, first, second
            elif s3 > s2:
                second, third = shared, second
            else:
                third = shared
        if has_budget:
            price = car.price_yuan
            if (budget_max > 0 and price > budget_max) or (budget_min > 0 and price < budget_min):
                key = _budget_reason_key(price, budget)
                last = made.get(key) or reason(key)
            else:
                if within is None:
                    within = reason((_WITHIN_BUDGET, 0, ""))
                last = within
        elif first is None:
            last = reason((_ON_SALE, 0, car.city))
        else:
            last = None
        if first is None:
            reasons: tuple[Reason, ...] = () if last is None else (last,)
        elif second is None:
            reasons = (first,) if last is None else (first, last)
        elif third is None:
            reasons = (first, second) if last is None else (first, second, last)
        else:
            reasons = (first, second, third) if last is None else (first, second, third, last)
        out.append(_recommendation(car, scores[i], reasons))
    return tuple(out)


_ReasonKey = tuple[ReasonKind, int, str]
"""What a reason says: (kind, seed position or percentage, city / body / "over" ...)."""


def _budget_reason_key(price: int, budget: tuple[int, int]) -> _ReasonKey:
    budget_min, budget_max = budget
    if budget_max > 0 and price > budget_max:
        return (
            _NEAR_BUDGET,
            max(round(100 * (price - budget_max) / budget_max), 1),
            "over",
        )
    if budget_min > 0 and price < budget_min:
        return (
            _NEAR_BUDGET,
            max(round(100 * (budget_min - price) / budget_min), 1),
            "under",
        )
    return (_WITHIN_BUDGET, 0, "")


def _make_reason(key: _ReasonKey, seeds: list[Seed], budget: tuple[int, int]) -> Reason:
    kind, number, text = key
    if kind in (_SAME_SERIES, _SAME_BRAND):
        seed = seeds[number]
        what = "series" if kind == _SAME_SERIES else "brand"
        return _reason(kind, f"same {what} as {seed.label()}", seed.car.id)
    if kind == _SIMILAR_CAR:
        seed = seeds[number]
        return _reason(kind, f"{text} of similar price and age to {seed.label()}", seed.car.id)
    if kind == _ALSO_INTERESTED:
        seed = seeds[number]
        said = f"customers interested in the {seed.car.title} were also interested in this car"
        return _reason(kind, said, seed.car.id)
    if kind == _POPULAR:
        return _reason(kind, f"popular in {text}", 0)
    if kind == _NEAR_BUDGET:
        return _reason(kind, f"{number}% {text} the budget", 0)
    if kind == _WITHIN_BUDGET:
        return _reason(kind, f"within budget ({_budget_text(budget)})", 0)
    return _reason(_ON_SALE, f"on sale in {text}", 0)


def _budget_text(budget: tuple[int, int]) -> str:
    lo, hi = budget
    if lo > 0 and hi > 0:
        return f"{lo:,}-{hi:,} yuan"
    if hi > 0:
        return f"up to {hi:,} yuan"
    return f"from {lo:,} yuan"


_BODY_NAMES = {
    BodyType.SEDAN: "sedan",
    BodyType.SUV: "SUV",
    BodyType.MPV: "MPV",
    BodyType.HATCHBACK: "hatchback",
    BodyType.COUPE: "coupe",
    BodyType.WAGON: "wagon",
    BodyType.PICKUP: "pickup",
    BodyType.CONVERTIBLE: "convertible",
}


def _rank(
    index: CarIndex,
    cfg: RankingConfig,
    cols: OnSaleColumns,
    excluded: list[int],
    seeds: list[Seed],
    weights: tuple[float, float, float],
    count: int,
    per_brand: int,
    budget: tuple[int, int],
) -> tuple[Recommendation, ...]:
    if len(cols) == 0:
        return ()
    rows = np.zeros(0, np.int64)
    if excluded:
        rows = cols.rows_of(np.array(excluded, np.int64))
        rows = rows[rows >= 0]
    sig = _signals(index, cfg, cols, rows, seeds, weights, budget, count, per_brand)
    ids, brands = cols.ids, cols.brand
    if sig.at is not None:
        ids, brands = ids[sig.at], brands[sig.at]
    chosen = _select(ids, brands, sig.score, count, per_brand)
    return _explain(index, cfg, seeds, cols, sig, chosen, weights, budget)


def recommend(index: CarIndex, cfg: RankingConfig, q: RecommendQuery) -> Recommendations:
    """Ranked cars for ``q`` (see the module doc)."""
    seeds, ignored, seen = _seeds(index, cfg, q)
    excluded = [s.slot for s in seeds if s.source == "intent"]
    if q.exclude_car_ids:
        slot_of = index.slot_of
        excluded.extend(slot_of[c] for c in q.exclude_car_ids if c in slot_of)
    if cfg.exclude_seen:
        excluded.extend(seen)
    lo, hi = budget_bounds(q.budget_min_yuan, q.budget_max_yuan, cfg.budget_tolerance)
    cols = index.on_sale_columns(q.city).between(lo, hi)
    budget = (q.budget_min_yuan, q.budget_max_yuan)
    items = _rank(
        index, cfg, cols, excluded, seeds, cfg.hybrid(q.business_line), q.count,
        cfg.max_per_brand, budget,
    )  # fmt: skip
    return Recommendations(items, index.watermark, tuple(ignored))


def similar_cars(index: CarIndex, cfg: RankingConfig, car_id: int, count: int) -> Recommendations:
    """Cars on sale similar to ``car_id`` (any city, no brand cap); NotFound when the car
    is not in the inventory."""
    car = index.car(car_id)
    if car is None:
        raise NotFound(f"car {car_id} is not in the inventory", reason="CAR_NOT_FOUND")
    slot = index.slot_of[car_id]
    seeds = [Seed(slot, car, 1.0, "similar")]
    cols = index.on_sale_columns(None)
    items = _rank(index, cfg, cols, [slot], seeds, cfg.hybrid(None), count, count, (0, 0))
    return Recommendations(items, index.watermark)
