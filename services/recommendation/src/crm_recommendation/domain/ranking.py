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
    content: F64
    content_seed: npt.NDArray[np.intp]
    cooccurrence: F64
    popularity: F64
    score: F64
    rows: list[tuple[I64, F64]]
    """Each seed's co-occurrence row (neighbour slots ascending, cosines)."""


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
    """Slots passing the hard filters, ascending."""
    base = index.city_slots(city)
    keep = index.on_sale[base]
    if lo is not None:
        keep &= index.price[base] >= lo
    if hi is not None:
        keep &= index.price[base] <= hi
    found = base[keep]
    if excluded and len(found):
        found = found[~np.isin(found, np.fromiter(excluded, np.int64, len(excluded)))]
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
) -> _Signals:
    n = len(cands)
    w_content, w_cooc, w_pop = weights
    content = np.zeros(n)
    content_seed = np.zeros(n, np.intp)
    if seeds and w_content > 0 and n:
        # all seeds at once, float32: (seeds x candidates) matrices
        cw = cfg.content
        total = cw.price + cw.year + cw.mileage + cw.brand + cw.series + cw.body_type
        widths = np.array([cw.price_width, cw.year_width, cw.mileage_width])
        slots = np.fromiter((sd.slot for sd in seeds), np.int64, len(seeds))
        feats = (index.features[cands] / widths).astype(np.float32)
        anchor = (index.features[slots] / widths).astype(np.float32)
        sims = np.zeros((len(seeds), n), np.float32)
        for k, block in enumerate((cw.price, cw.year, cw.mileage)):
            if block > 0:
                d = feats[:, k][None, :] - anchor[:, k][:, None]
                sims += np.float32(block / total) * np.exp(np.float32(-0.5) * d * d)
        for weight, column in (
            (cw.brand, index.brand), (cw.series, index.series), (cw.body_type, index.body)
        ):  # fmt: skip
            if weight > 0:
                values = column[cands]
                sims += np.float32(weight / total) * (values[None, :] == column[slots][:, None])
        sims *= np.array([sd.weight for sd in seeds], np.float32)[:, None]
        content_seed = np.argmax(sims, axis=0)
        content = sims[content_seed, np.arange(n)].astype(np.float64)
    cooc = np.zeros(n)
    rows: list[tuple[I64, F64]] = []
    if seeds and w_cooc > 0 and n:
        acc = np.zeros(index.n)
        for seed in seeds:
            nbr, cos = index.cooccurrence(seed.slot)
            rows.append((nbr, cos))
            if len(nbr):
                acc[nbr] += seed.weight * cos  # neighbours are unique
        cooc = acc[cands]
        top = float(cooc.max())
        cooc = cooc / top if top > 0 else np.zeros(n)
    pop = np.zeros(n)
    if w_pop > 0 and n:
        logpop = index.logpop[cands]
        top = float(logpop.max())
        if np.isfinite(top):
            pop = np.exp(0.5 * (logpop - top))
    score = w_content * content + w_cooc * cooc + w_pop * pop
    budget_min, budget_max = budget
    if cfg.outside_budget_penalty > 0 and (budget_min > 0 or budget_max > 0):
        price = index.price[cands]
        outside = np.zeros(n, np.bool_)
        if budget_min > 0:
            outside |= price < budget_min
        if budget_max > 0:
            outside |= price > budget_max
        score = np.where(outside, score * (1.0 - cfg.outside_budget_penalty), score)
    return _Signals(content, content_seed, cooc, pop, np.round(score, SCORE_DECIMALS), rows)


def _cooc_seeds(sig: _Signals, seeds: list[Seed], result_slots: I64) -> list[int]:
    """For each result slot, the index of the seed contributing most co-interest (-1: none)."""
    if not sig.rows or len(result_slots) == 0:
        return [-1] * len(result_slots)
    contrib = np.zeros((len(seeds), len(result_slots)))
    for i, (nbr, cos) in enumerate(sig.rows):
        if len(nbr):
            at = np.minimum(np.searchsorted(nbr, result_slots), len(nbr) - 1)
            hit = nbr[at] == result_slots
            contrib[i] = np.where(hit, cos[at] * seeds[i].weight, 0.0)
    arg = np.argmax(contrib, axis=0)  # first maximum: the earlier seed wins ties
    found = contrib[arg, np.arange(len(result_slots))] > 0
    picked: list[int] = np.where(found, arg, -1).tolist()
    return picked


def _select(index: CarIndex, cands: I64, score: F64, count: int, per_brand: int) -> list[int]:
    """Positions (into ``cands``) of the answer: score desc, car id asc, brand-capped."""
    n = len(cands)
    ids = index.ids[cands]
    brands = index.brand[cands]
    depth = min(n, max(count * 8, count + 64))
    while True:
        if depth < n:
            kth = -np.partition(-score, depth - 1)[depth - 1]
            pool = np.flatnonzero(score >= kth)  # every tie at the cut is kept
        else:
            pool = np.arange(n)
        order = pool[np.lexsort((ids[pool], -score[pool]))]
        chosen: list[int] = []
        deferred: list[int] = []
        per: dict[int, int] = {}
        for pos in order.tolist():
            b = int(brands[pos])
            if per.get(b, 0) < per_brand:
                per[b] = per.get(b, 0) + 1
                chosen.append(pos)
                if len(chosen) == count:
                    return chosen
            else:
                deferred.append(pos)
        if len(pool) >= n:  # not enough other brands: fill up in rank order
            return chosen + deferred[: count - len(chosen)]
        depth = n


def _reasons(
    car: Car,
    pos: int,
    cooc_seed: int,
    seeds: list[Seed],
    sig: _Signals,
    weights: tuple[float, float, float],
    budget: tuple[int, int],
    tolerance: float,
    popular_threshold: float,
) -> tuple[Reason, ...]:
    w_content, w_cooc, w_pop = weights
    scored: list[tuple[float, Reason]] = []
    if seeds and w_content > 0:
        reason = _content_reason(car, seeds, seeds[int(sig.content_seed[pos])], sig, pos)
        if reason is not None:
            scored.append((w_content * float(sig.content[pos]), reason))
    if cooc_seed >= 0 and w_cooc > 0:
        best = seeds[cooc_seed]
        text = f"customers interested in the {best.car.title} were also interested in this car"
        reason = Reason(ReasonKind.ALSO_INTERESTED, text, best.car.id)
        scored.append((w_cooc * float(sig.cooccurrence[pos]), reason))
    if w_pop > 0 and sig.popularity[pos] >= popular_threshold and sig.popularity[pos] > 0:
        reason = Reason(ReasonKind.POPULAR, f"popular in {car.city}")
        scored.append((w_pop * float(sig.popularity[pos]), reason))
    scored.sort(key=lambda item: -item[0])
    reasons = [r for _, r in scored]
    reasons.extend(_budget_reasons(car, budget, tolerance))
    if not reasons:
        reasons.append(Reason(ReasonKind.ON_SALE, f"on sale in {car.city}"))
    return tuple(reasons)


def _content_reason(
    car: Car, seeds: list[Seed], best: Seed, sig: _Signals, pos: int
) -> Reason | None:
    for seed in seeds:
        if seed.car.brand == car.brand and seed.car.series == car.series:
            return Reason(ReasonKind.SAME_SERIES, f"same series as {seed.label()}", seed.car.id)
    for seed in seeds:
        if seed.car.brand == car.brand:
            return Reason(ReasonKind.SAME_BRAND, f"same brand as {seed.label()}", seed.car.id)
    if best.car.body_type == car.body_type and sig.content[pos] >= _SIMILAR_MIN * best.weight:
        body = _BODY_NAMES[car.body_type]
        return Reason(
            ReasonKind.SIMILAR_CAR,
            f"{body} of similar price and age to {best.label()}",
            best.car.id,
        )
    return None


def _budget_reasons(car: Car, budget: tuple[int, int], tolerance: float) -> list[Reason]:
    budget_min, budget_max = budget
    if budget_min <= 0 and budget_max <= 0:
        return []
    price = car.price_yuan
    if budget_max > 0 and price > budget_max:
        pct = round(100 * (price - budget_max) / budget_max)
        return [Reason(ReasonKind.NEAR_BUDGET, f"{max(pct, 1)}% over the budget")]
    if budget_min > 0 and price < budget_min:
        pct = round(100 * (budget_min - price) / budget_min)
        return [Reason(ReasonKind.NEAR_BUDGET, f"{max(pct, 1)}% under the budget")]
    return [Reason(ReasonKind.WITHIN_BUDGET, f"within budget ({_budget_text(budget)})")]


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
    sig = _signals(index, cfg, cands, seeds, weights, budget)
    chosen = _select(index, cands, sig.score, count, per_brand)
    result_slots = cands[np.array(chosen, dtype=np.intp)] if chosen else cands[:0]
    cooc_seeds = _cooc_seeds(sig, seeds, result_slots)
    out = []
    for pos, slot, cooc_seed in zip(chosen, result_slots.tolist(), cooc_seeds, strict=True):
        car = index.cars[slot]
        assert car is not None
        reasons = _reasons(
            car, pos, cooc_seed, seeds, sig, weights, budget,
            cfg.budget_tolerance, cfg.popular_threshold,
        )  # fmt: skip
        out.append(Recommendation(car, float(sig.score[pos]), reasons))
    return tuple(out)


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
