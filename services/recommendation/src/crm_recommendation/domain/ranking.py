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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from crm_common.errors import NotFound

from crm_recommendation.config import RankingConfig
from crm_recommendation.domain.model import (
    BodyType,
    Car,
    Reason,
    ReasonKind,
    Recommendation,
    Recommendations,
    RecommendQuery,
    kind_mask_weight,
)
from crm_recommendation.index.car_index import CarIndex

__all__ = ["Seed", "budget_bounds", "candidates", "recommend", "similar_cars"]

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

SCORE_DECIMALS = 6
_MAX_KIND_WEIGHT = 4.0
_SIMILAR_MIN = 0.5  # content similarity from which "similar car" is said


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


@dataclass(frozen=True, slots=True)
class _Signals:
    """The signals of the candidates that can still make the answer (``cands``: every
    candidate, or those whose upper bound reaches the cut; see :func:`_signals`)."""

    cands: I64
    content: F64
    sims: npt.NDArray[np.float32] | None
    """Weighted content similarity of each seed (rows) to each candidate (columns)."""
    cooccurrence: F64
    popularity: F64
    score: F64
    cooc_entries: tuple[I64, I64, F64] | None
    """The seeds' co-occurrence rows concatenated: (seed position, neighbour slot, seed
    weight x cosine); None when co-interest is not used."""


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
    """Slots passing the hard filters, ascending: a slice of the city's price-sorted list
    of cars on sale, minus ``excluded``."""
    found = index.on_sale_slots(city, lo, hi)
    if excluded and len(found):
        gone = np.fromiter(excluded, np.int64, len(excluded))
        at = np.minimum(np.searchsorted(found, gone), len(found) - 1)
        at = at[found[at] == gone]
        if len(at):
            found = np.delete(found, at)
    return found


def _seeds(
    index: CarIndex, cfg: RankingConfig, q: RecommendQuery
) -> tuple[list[Seed], list[int], set[int]]:
    """Seeds, ignored intent ids, slots the customer has seen."""
    seeds: list[Seed] = []
    ignored: list[int] = []
    taken: set[int] = set()
    for car_id in dict.fromkeys(q.intent_car_ids):
        car = index.car(car_id)
        if car is None:
            ignored.append(car_id)
            continue
        slot = index.slot_of[car_id]
        seeds.append(Seed(slot, car, 1.0, "intent"))
        taken.add(slot)
    seen: set[int] = set()
    if q.customer_id is not None:
        history = index.customer_cars(q.customer_id)
        seen = set(history)
        if cfg.history_weight > 0 and cfg.history_cars > 0:
            past = []
            for slot, mask in history.items():
                car = index.cars[slot]
                if car is not None and slot not in taken:
                    past.append((-kind_mask_weight(mask), car.id, slot, car))
            past.sort()
            for neg_w, _, slot, car in past[: cfg.history_cars]:
                weight = cfg.history_weight * (-neg_w) / _MAX_KIND_WEIGHT
                seeds.append(Seed(slot, car, weight, "history"))
    return seeds, ignored, seen


def _signals(
    index: CarIndex,
    cfg: RankingConfig,
    cands: I64,
    seeds: list[Seed],
    weights: tuple[float, float, float],
    budget: tuple[int, int],
    count: int,
    per_brand: int,
) -> _Signals:
    """The signals and scores of the candidates that can make the answer.

    Co-interest and popularity are cheap (sparse rows; one gather) and computed for every
    candidate; so is the normalization by the best candidate. Content similarity costs
    seeds x candidates. With many candidates (``_PRUNE_FROM``) it is computed exactly only
    where it can matter: an upper bound of each candidate's score (:func:`_content_bound`)
    ranks them; a brand-diverse sample of the best is scored exactly and selected (brand
    cap included), which gives a cut no higher than the true one (more candidates can only
    raise it); every candidate whose bound reaches that cut is then scored exactly and the
    rest, which cannot make the answer, are left out. The answer is the same as scoring
    every candidate."""
    n = len(cands)
    w_content, w_cooc, w_pop = weights
    cooc = np.zeros(n)
    entries: tuple[I64, I64, F64] | None = None
    if seeds and w_cooc > 0 and n:
        which, nbr, cos = index.cooccurrence_rows([sd.slot for sd in seeds])
        contrib = np.array([sd.weight for sd in seeds], np.float64)[which] * cos
        entries = (which, nbr, contrib)
        if len(nbr):
            # candidates are ascending: find each neighbour among them, sum per candidate
            # in seed order (the same float sums on every replica)
            at = np.minimum(np.searchsorted(cands, nbr), n - 1)
            hit = cands[at] == nbr
            cooc = np.bincount(at[hit], weights=contrib[hit], minlength=n).astype(np.float64)
        top = float(cooc.max())
        cooc = cooc / top if top > 0 else np.zeros(n)
    pop = np.zeros(n)
    if w_pop > 0 and n:
        logpop = index.logpop[cands]
        top = float(logpop.max())
        if np.isfinite(top):
            pop = np.exp(0.5 * (logpop - top))
    rest = w_cooc * cooc + w_pop * pop
    factor: F64 | None = None
    budget_min, budget_max = budget
    if cfg.outside_budget_penalty > 0 and (budget_min > 0 or budget_max > 0):
        price = index.price[cands]
        outside = np.zeros(n, np.bool_)
        if budget_min > 0:
            outside |= price < budget_min
        if budget_max > 0:
            outside |= price > budget_max
        if outside.any():
            factor = np.where(outside, 1.0 - cfg.outside_budget_penalty, 1.0)

    def scored(content: F64, at: I64 | slice) -> F64:
        raw = w_content * content + rest[at]
        if factor is not None:
            raw = raw * factor[at]
        return np.round(raw, SCORE_DECIMALS)

    if not (seeds and w_content > 0 and n):
        zeros = np.zeros(n)
        return _Signals(cands, zeros, None, cooc, pop, scored(zeros, slice(None)), entries)
    keep: I64 | None = None
    if len(seeds) * n > _PRUNE_FROM:
        bound = w_content * _content_bound(index, cfg, cands, seeds) + rest
        if factor is not None:
            bound *= factor
        # a sample: the best by bound, brand-capped too (else one brand could fill it)
        sample, _ = _select_capped(
            index, cands, bound, _SAMPLE_COUNT * count, _SAMPLE_PER_BRAND * per_brand
        )
        at = np.array(sample, dtype=np.intp)
        score = scored(_content(index, cfg, cands[at], seeds)[0], at)
        chosen, capped = _select_capped(index, cands[at], score, count, per_brand)
        if capped:  # else: no cut (every candidate may be needed)
            cut = float(score[chosen[-1]])
            keep = np.flatnonzero(bound + _BOUND_MARGIN >= cut)
    if keep is not None:
        cands, cooc, pop = cands[keep], cooc[keep], pop[keep]
    content, sims = _content(index, cfg, cands, seeds)
    score = scored(content, slice(None) if keep is None else keep)
    return _Signals(cands, content, sims, cooc, pop, score, entries)


_PRUNE_FROM = 100_000
"""Seeds x candidates from which the upper bound pays for itself (measured: below, one
exact pass over every candidate is cheaper than the bound, sample and cut)."""
_SAMPLE_COUNT, _SAMPLE_PER_BRAND = 8, 4
_BOUND_MARGIN = 1e-5
"""Float slack between a bound (float64) and an exact content score (float32 sums)."""


def _content_bound(index: CarIndex, cfg: RankingConfig, cands: I64, seeds: list[Seed]) -> F64:
    """An upper bound of :func:`_content` per candidate, in O(candidates x blocks):

    - numeric blocks: each block's similarity to the *nearest* seed value of that block
      (binary search over the sorted seed values), which no single seed can beat;
    - categorical blocks: tables over brand / series / body type codes hold, per code,
      the largest seed weight and weighted categorical similarity a seed sharing that
      code can give (series implies brand; body type counted as shared where it may be).
    """
    cw = cfg.content
    total = cw.price + cw.year + cw.mileage + cw.brand + cw.series + cw.body_type
    slots = np.fromiter((sd.slot for sd in seeds), np.int64, len(seeds))
    weights = np.array([sd.weight for sd in seeds])
    numeric = np.zeros(len(cands))
    for feature, weight, width in (
        (index.log_price, cw.price, cw.price_width),
        (index.year, cw.year, cw.year_width),
        (index.log_mileage, cw.mileage, cw.mileage_width),
    ):
        if weight > 0:
            values = np.unique(feature[slots]).astype(np.float64)
            x = feature[cands].astype(np.float64)
            at = np.searchsorted(values, x)
            below = x - values[np.maximum(at - 1, 0)]
            above = values[np.minimum(at, len(values) - 1)] - x
            d = np.minimum(np.abs(below), np.abs(above)) * (1.0 / width)
            numeric += (weight / total) * np.exp(-0.5 * d * d)
    brand, series, body = cw.brand / total, cw.series / total, cw.body_type / total
    bound: F64 = weights.max() * numeric
    for column, size, same in (
        (index.series, len(index.series_vocab.names), brand + series + body),
        (index.brand, len(index.brands.names), brand + body),
        (index.body, int(max(BodyType)) + 1, body),
    ):
        codes = column[slots]
        top_weight = np.zeros(size)
        np.maximum.at(top_weight, codes, weights)
        top_same = np.zeros(size)
        np.maximum.at(top_same, codes, weights * same)
        of_cand = column[cands]
        np.maximum(bound, top_weight[of_cand] * numeric + top_same[of_cand], out=bound)
    return bound


def _content(
    index: CarIndex, cfg: RankingConfig, cands: I64, seeds: list[Seed]
) -> tuple[F64, npt.NDArray[np.float32]]:
    """Content similarity of every candidate to its best seed (times the seed's weight),
    and the (seeds x candidates) matrix of weighted similarities. float32, element-wise
    only (a candidate's value does not depend on the other candidates):

    - categorical blocks: a (seeds x variants) table of brand / series / body type
      similarity, gathered by each candidate's variant (series + body type);
    - numeric blocks: ``exp(log(block weight) - (distance / width)^2 / 2)``.
    """
    cw = cfg.content
    total = cw.price + cw.year + cw.mileage + cw.brand + cw.series + cw.body_type
    slots = np.fromiter((sd.slot for sd in seeds), np.int64, len(seeds))
    n = len(cands)
    blocks = (
        (cw.brand, index.brand), (cw.series, index.series), (cw.body_type, index.body)
    )  # fmt: skip
    variants = index.variants()
    if len(variants[0]) <= 2 * n:
        table = np.zeros((len(seeds), len(variants[0])), np.float32)
        for (weight, column), of_variant in zip(blocks, variants, strict=True):
            if weight > 0:
                same = of_variant[None, :] == column[slots][:, None]
                table += same * np.float32(weight / total)
        sims = np.take(table, index.variant[cands], axis=1)
    else:  # a large vocabulary and few candidates: compare directly (the same sums)
        sims = np.zeros((len(seeds), n), np.float32)
        for weight, column in blocks:
            if weight > 0:
                same = column[cands][None, :] == column[slots][:, None]
                sims += same * np.float32(weight / total)
    for feature, weight, width in (
        (index.log_price, cw.price, cw.price_width),
        (index.year, cw.year, cw.year_width),
        (index.log_mileage, cw.mileage, cw.mileage_width),
    ):
        if weight > 0:
            scale = np.float32(math.sqrt(0.5) / width)
            d = (feature[cands] * scale)[None, :] - (feature[slots] * scale)[:, None]
            np.multiply(d, d, out=d)
            np.subtract(np.float32(math.log(weight / total)), d, out=d)
            np.exp(d, out=d)
            sims += d
    sims *= np.array([sd.weight for sd in seeds], np.float32)[:, None]
    return sims.max(axis=0).astype(np.float64), sims


def _cooc_seeds(sig: _Signals, result_slots: I64) -> list[int]:
    """For each result slot, the index of the seed contributing most co-interest (-1: none;
    the earlier seed on ties)."""
    k = len(result_slots)
    if sig.cooc_entries is None or k == 0 or len(sig.cooc_entries[1]) == 0:
        return [-1] * k
    which, nbr, contrib = sig.cooc_entries
    hit = np.isin(nbr, result_slots)
    position = {slot: i for i, slot in enumerate(result_slots.tolist())}
    picked = [-1] * k
    best = [0.0] * k
    for seed, slot, value in zip(
        which[hit].tolist(), nbr[hit].tolist(), contrib[hit].tolist(), strict=True
    ):  # in seed order
        i = position[slot]
        if value > best[i]:
            best[i] = value
            picked[i] = seed
    return picked


def _top(index: CarIndex, cands: I64, score: F64, pool: I64 | None, m: int) -> I64:
    """The best ``m`` positions of ``pool`` (every position when None) in rank order
    (score desc, car id asc)."""
    values = score if pool is None else score[pool]
    if len(values) > m:
        kth = np.partition(values, len(values) - m)[len(values) - m]
        picked = np.flatnonzero(values >= kth)  # every tie at the cut, then ordered by id
        if pool is not None:
            picked = pool[picked]
    else:
        picked = np.arange(len(values)) if pool is None else pool
    order = np.lexsort((index.ids[cands[picked]], -score[picked]))
    return picked[order[:m]]


def _select(index: CarIndex, cands: I64, score: F64, count: int, per_brand: int) -> list[int]:
    """Positions (into ``cands``) of the answer: the rank order (score desc, car id asc)
    walked with at most ``per_brand`` cars of a brand; when the candidates run out, the
    passed-over cars fill the answer up in rank order."""
    chosen, capped = _select_capped(index, cands, score, count, per_brand)
    if capped or len(chosen) == len(cands):
        return chosen
    # every candidate walked or of a full brand: fill up with the passed-over cars
    rest = np.ones(len(cands), np.bool_)
    rest[np.array(chosen, dtype=np.intp)] = False
    fill: list[int] = _top(index, cands, score, np.flatnonzero(rest), count - len(chosen)).tolist()
    return chosen + fill


def _select_capped(
    index: CarIndex, cands: I64, score: F64, count: int, per_brand: int
) -> tuple[list[int], bool]:
    """The brand-capped walk of :func:`_select` without the fill-up: the positions chosen
    and whether they are ``count`` (then the last one's score is the answer's cut).

    The walk goes in chunks over the best cars not yet walked whose brand is not full:
    the cars of a full brand would be passed over anyway, so leaving them out gives the
    same answer without walking (or sorting) every candidate."""
    chosen: list[int] = []
    per: dict[int, int] = {}
    pool: I64 | None = None
    walked = brands = full = None
    while True:
        need = count - len(chosen)
        chunk = _top(index, cands, score, pool, 4 * need + 32)
        if len(chunk) == 0:
            return chosen, False
        for pos, b in zip(chunk.tolist(), index.brand[cands[chunk]].tolist(), strict=True):
            taken = per.get(b, 0)
            if taken < per_brand:
                per[b] = taken + 1
                chosen.append(pos)
                if len(chosen) == count:
                    return chosen, True
        if walked is None or brands is None or full is None:
            walked = np.zeros(len(cands), np.bool_)
            brands = index.brand[cands]
            full = np.zeros(len(index.brands.names) + 1, np.bool_)
        walked[chunk] = True
        for b, taken in per.items():
            full[b] = taken >= per_brand
        pool = np.flatnonzero(~walked & ~full[brands])


def _explain(
    index: CarIndex,
    cfg: RankingConfig,
    seeds: list[Seed],
    sig: _Signals,
    chosen: list[int],
    weights: tuple[float, float, float],
    budget: tuple[int, int],
) -> tuple[Recommendation, ...]:
    """The chosen cars with their scores and reasons, strongest first:

    - content: same series as the first seed of that series, else same brand as the first
      seed of that brand, else "similar" to the seed contributing most content similarity
      when it has the same body type and gives at least half its weight;
    - co-interest: the seed contributing most co-occurrence;
    - popularity: at or above the configured threshold;
    - budget: within, or how far outside; "on sale" when nothing else applies.

    Reasons are immutable values: one object serves every car of the answer it applies to.
    """
    if not chosen:
        return ()
    w_content, w_cooc, w_pop = weights
    at = np.array(chosen, dtype=np.intp)
    slots = sig.cands[at]
    content = sig.content[at].tolist()
    cooc = sig.cooccurrence[at].tolist()
    pop = sig.popularity[at].tolist()
    scores = sig.score[at].tolist()
    cooc_seeds = _cooc_seeds(sig, slots) if w_cooc > 0 else [-1] * len(at)
    content_seeds: list[int] = [-1] * len(at)
    by_series: dict[tuple[str, str], int] = {}
    by_brand: dict[str, int] = {}
    if seeds and w_content > 0 and sig.sims is not None:
        content_seeds = np.argmax(sig.sims[:, at], axis=0).tolist()  # earlier seed on ties
        for i, seed in enumerate(seeds):
            by_series.setdefault((seed.car.brand, seed.car.series), i)
            by_brand.setdefault(seed.car.brand, i)
    made: dict[_ReasonKey, Reason] = {}

    def reason(key: _ReasonKey) -> Reason:
        found = made.get(key)
        if found is None:
            found = made[key] = _make_reason(key, seeds, budget)
        return found

    popular = cfg.popular_threshold
    has_budget = budget[0] > 0 or budget[1] > 0
    out = []
    for i, slot in enumerate(slots.tolist()):
        car = index.cars[slot]
        assert car is not None
        scored: list[tuple[float, Reason]] = []
        best = content_seeds[i]
        if best >= 0:
            key = _content_reason_key(car, by_series, by_brand, seeds[best], best, content[i])
            if key is not None:
                scored.append((w_content * content[i], reason(key)))
        if cooc_seeds[i] >= 0:
            key = (ReasonKind.ALSO_INTERESTED, cooc_seeds[i], "")
            scored.append((w_cooc * cooc[i], reason(key)))
        if w_pop > 0 and pop[i] >= popular and pop[i] > 0:
            scored.append((w_pop * pop[i], reason((ReasonKind.POPULAR, 0, car.city))))
        if len(scored) > 1:
            scored.sort(key=lambda item: -item[0])
        reasons = [r for _, r in scored]
        if has_budget:
            reasons.append(reason(_budget_reason_key(car.price_yuan, budget)))
        if not reasons:
            reasons.append(reason((ReasonKind.ON_SALE, 0, car.city)))
        out.append(Recommendation(car, scores[i], tuple(reasons)))
    return tuple(out)


_ReasonKey = tuple[ReasonKind, int, str]
"""What a reason says: (kind, seed position or percentage, city / body / "over" ...)."""


def _content_reason_key(
    car: Car,
    by_series: dict[tuple[str, str], int],
    by_brand: dict[str, int],
    best: Seed,
    best_at: int,
    content: float,
) -> _ReasonKey | None:
    found = by_series.get((car.brand, car.series))
    if found is not None:
        return (ReasonKind.SAME_SERIES, found, "")
    found = by_brand.get(car.brand)
    if found is not None:
        return (ReasonKind.SAME_BRAND, found, "")
    if best.car.body_type == car.body_type and content >= _SIMILAR_MIN * best.weight:
        return (ReasonKind.SIMILAR_CAR, best_at, _BODY_NAMES[car.body_type])
    return None


def _budget_reason_key(price: int, budget: tuple[int, int]) -> _ReasonKey:
    budget_min, budget_max = budget
    if budget_max > 0 and price > budget_max:
        return (
            ReasonKind.NEAR_BUDGET,
            max(round(100 * (price - budget_max) / budget_max), 1),
            "over",
        )
    if budget_min > 0 and price < budget_min:
        return (
            ReasonKind.NEAR_BUDGET,
            max(round(100 * (budget_min - price) / budget_min), 1),
            "under",
        )
    return (ReasonKind.WITHIN_BUDGET, 0, "")


def _make_reason(key: _ReasonKey, seeds: list[Seed], budget: tuple[int, int]) -> Reason:
    kind, number, text = key
    if kind in (ReasonKind.SAME_SERIES, ReasonKind.SAME_BRAND):
        seed = seeds[number]
        what = "series" if kind == ReasonKind.SAME_SERIES else "brand"
        return Reason(kind, f"same {what} as {seed.label()}", seed.car.id)
    if kind == ReasonKind.SIMILAR_CAR:
        seed = seeds[number]
        return Reason(kind, f"{text} of similar price and age to {seed.label()}", seed.car.id)
    if kind == ReasonKind.ALSO_INTERESTED:
        seed = seeds[number]
        said = f"customers interested in the {seed.car.title} were also interested in this car"
        return Reason(kind, said, seed.car.id)
    if kind == ReasonKind.POPULAR:
        return Reason(kind, f"popular in {text}")
    if kind == ReasonKind.NEAR_BUDGET:
        return Reason(kind, f"{number}% {text} the budget")
    if kind == ReasonKind.WITHIN_BUDGET:
        return Reason(kind, f"within budget ({_budget_text(budget)})")
    return Reason(ReasonKind.ON_SALE, f"on sale in {text}")


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
    cands: I64,
    seeds: list[Seed],
    weights: tuple[float, float, float],
    count: int,
    per_brand: int,
    budget: tuple[int, int],
) -> tuple[Recommendation, ...]:
    if len(cands) == 0:
        return ()
    sig = _signals(index, cfg, cands, seeds, weights, budget, count, per_brand)
    chosen = _select(index, sig.cands, sig.score, count, per_brand)
    return _explain(index, cfg, seeds, sig, chosen, weights, budget)


def recommend(index: CarIndex, cfg: RankingConfig, q: RecommendQuery) -> Recommendations:
    """Ranked cars for ``q`` (see the module doc)."""
    seeds, ignored, seen = _seeds(index, cfg, q)
    excluded = {s.slot for s in seeds if s.source == "intent"}
    excluded.update(index.slot_of[c] for c in q.exclude_car_ids if c in index.slot_of)
    if cfg.exclude_seen:
        excluded |= seen
    lo, hi = budget_bounds(q.budget_min_yuan, q.budget_max_yuan, cfg.budget_tolerance)
    cands = candidates(index, q.city, lo, hi, excluded)
    budget = (q.budget_min_yuan, q.budget_max_yuan)
    items = _rank(
        index, cfg, cands, seeds, cfg.hybrid(q.business_line), q.count,
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
    cands = candidates(index, None, None, None, {slot})
    items = _rank(index, cfg, cands, seeds, cfg.hybrid(None), count, count, (0, 0))
    return Recommendations(items, index.watermark)
