"""``CarIndex``: the in-memory serving index of one replica.

Every car id seen (in the inventory or in an interaction) gets a *slot*, a row of the
column arrays below (slots are never reused; a sold car stays, marked not on sale):

- inventory columns: ``known`` (the car's row was seen), ``on_sale``, ``price``, and the
  numeric features as the float32 rows of ``features`` (``log_price``, ``year``,
  ``log_mileage`` (1 + km) are views of its rows), plus integer codes of brand, series
  (brand + series), body type, city and *variant* (series + body type:
  :meth:`CarIndex.variants` maps a variant code back, so categorical similarity is a
  table lookup per variant);
- ``on_sale_lists``: the cars on sale per city sorted by price (see
  :mod:`~crm_recommendation.index.onsale`), so the hard filters (on sale, city, price
  range) are a slice, not a mask over every car; :meth:`CarIndex.on_sale_columns` gives
  a list's cars with their columns side by side (built on demand, dropped for a city when
  one of its cars changes), so a price range is a view of every column the ranking reads;
- ``logpop``: log of the decayed interaction weight, ``log sum(w * 2^((t - T0) / h))``.
  Normalizing by the best candidate cancels "now", so no clock is involved;
- ``pairs``: item-to-item co-occurrence, ``sum over customers of w_a * w_b`` where ``w`` is
  the strongest kind of the customer's interactions with the car, and ``sq_norm`` (sum of
  ``w^2``), giving the cosine ``C(a, b) / sqrt(N_a N_b)``. Customers with more than
  ``max_customer_cars`` distinct cars (dealers, bots) are left out of co-occurrence;
- ``customers``: each customer's cars and kinds (for history seeds and "already seen").

Changes are applied by one thread (the event loop) in any order and converge: a car row
wins when its change sequence is newer, an interaction is applied once (by sequence),
and every aggregate is order-independent (integer sums, max of kinds). ``watermark`` is
the change sequence up to which every change is applied.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from crm_recommendation.domain.model import (
    KIND_WEIGHT,
    Car,
    CarStatus,
    Interaction,
    kind_mask_weight,
)
from crm_recommendation.index.onsale import MAX_PRICE_KEY, OnSaleColumns, OnSaleLists
from crm_recommendation.index.sparse import CsrBase, CustomerSets, PairWeights

__all__ = ["T0", "CarIndex", "InteractionArrays", "Vocab"]

T = TypeVar("T")
F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
I32 = npt.NDArray[np.int32]

T0 = datetime(2000, 1, 1, tzinfo=UTC).timestamp()
"""Reference time of the popularity exponent."""

_MASK_WEIGHT = np.array([kind_mask_weight(m) for m in range(32)], dtype=np.int64)
_KIND_LOG_WEIGHT = np.array(
    [math.log(KIND_WEIGHT.get(k, 1)) for k in range(5)],  # type: ignore[call-overload]
    dtype=np.float64,
)

InteractionArrays = tuple[I64, I64, npt.NDArray[np.int8], F64]
"""``(customer_id, car_id, kind, occurred_at epoch seconds)`` columns of a bulk load."""


class Vocab:
    """Strings to dense integer codes (in order of first sight; codes never change)."""

    def __init__(self) -> None:
        self.code: dict[str, int] = {}
        self.names: list[str] = []

    def __call__(self, name: str) -> int:
        found = self.code.get(name)
        if found is None:
            found = self.code[name] = len(self.names)
            self.names.append(name)
        return found


def _logaddexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    hi, lo = (a, b) if a >= b else (b, a)
    return hi + math.log1p(math.exp(lo - hi))


class CarIndex:
    """See the module doc. Not thread-safe: one owner thread applies changes and reads."""

    def __init__(self, *, half_life_days: float = 14.0, max_customer_cars: int = 200) -> None:
        if half_life_days <= 0 or max_customer_cars < 2:
            raise ValueError("half_life_days must be > 0 and max_customer_cars >= 2")
        self.decay = math.log(2) / (half_life_days * 86400.0)
        self.max_customer_cars = max_customer_cars
        self.n = 0
        self.slot_of: dict[int, int] = {}
        self.cars: list[Car | None] = []
        self.brands = Vocab()
        self.series_vocab = Vocab()
        self.cities = Vocab()
        cap = 1024
        self.ids: I64 = np.zeros(cap, np.int64)
        self.known = np.zeros(cap, np.bool_)
        self.on_sale = np.zeros(cap, np.bool_)
        self.price: I64 = np.zeros(cap, np.int64)
        self.features: F32 = np.zeros((3, cap), np.float32)
        self.log_price: F32 = self.features[0]
        self.year: F32 = self.features[1]
        self.log_mileage: F32 = self.features[2]
        self.brand: I32 = np.zeros(cap, np.int32)
        self.series: I32 = np.zeros(cap, np.int32)
        self.body: I32 = np.zeros(cap, np.int32)
        self.variant: I32 = np.zeros(cap, np.int32)
        self._variants: dict[tuple[int, int], int] = {}
        self._variant_rows: list[tuple[int, int, int]] = []
        self._variant_arrays: tuple[I32, I32, I32] | None = None
        self._variant_derived: dict[object, object] = {}
        self.city: I32 = np.full(cap, -1, np.int32)
        self.car_seq: I64 = np.zeros(cap, np.int64)
        self.logpop: F64 = np.full(cap, -np.inf, np.float64)
        self.sq_norm: I64 = np.zeros(cap, np.int64)
        self.pairs = PairWeights()
        self.customers = CustomerSets()
        self.watermark = 0
        self._applied: set[int] = set()
        self.on_sale_lists = OnSaleLists()
        self._columns: dict[int | None, OnSaleColumns] = {}
        # each slot's row in the columns of its city's list / of the list of every city
        self._row_in_city: I64 = np.full(cap, -1, np.int64)
        self._row_in_all: I64 = np.full(cap, -1, np.int64)

    # ------------------------------------------------------------------ slots & reads

    def _grow(self, need: int) -> None:
        cap = len(self.ids)
        if need <= cap:
            return
        new = max(need, cap * 2)

        def grown(a: npt.NDArray[np.generic], fill: object = 0) -> npt.NDArray[np.generic]:
            out = np.full((new, *a.shape[1:]), fill, dtype=a.dtype)
            out[:cap] = a
            return out

        self.ids = grown(self.ids)  # type: ignore[assignment]
        self.known = grown(self.known)  # type: ignore[assignment]
        self.on_sale = grown(self.on_sale)  # type: ignore[assignment]
        self.price = grown(self.price)  # type: ignore[assignment]
        features = np.zeros((3, new), np.float32)
        features[:, :cap] = self.features
        self.features = features
        self.log_price, self.year, self.log_mileage = features[0], features[1], features[2]
        self.brand = grown(self.brand)  # type: ignore[assignment]
        self.series = grown(self.series)  # type: ignore[assignment]
        self.body = grown(self.body)  # type: ignore[assignment]
        self.variant = grown(self.variant)  # type: ignore[assignment]
        self.city = grown(self.city, -1)  # type: ignore[assignment]
        self.car_seq = grown(self.car_seq)  # type: ignore[assignment]
        self.logpop = grown(self.logpop, -np.inf)  # type: ignore[assignment]
        self.sq_norm = grown(self.sq_norm)  # type: ignore[assignment]
        self._row_in_city = grown(self._row_in_city, -1)  # type: ignore[assignment]
        self._row_in_all = grown(self._row_in_all, -1)  # type: ignore[assignment]

    def slot(self, car_id: int) -> int:
        """The slot of ``car_id``, allocated on first sight."""
        found = self.slot_of.get(car_id)
        if found is not None:
            return found
        s = self.n
        self._grow(s + 1)
        self.ids[s] = car_id
        self.slot_of[car_id] = s
        self.cars.append(None)
        self.n = s + 1
        return s

    def _variant(self, brand: int, series: int, body: int) -> int:
        found = self._variants.get((series, body))
        if found is None:
            found = self._variants[(series, body)] = len(self._variant_rows)
            self._variant_rows.append((brand, series, body))
            self._variant_arrays = None
            self._variant_derived.clear()
        return found

    def variants(self) -> tuple[I32, I32, I32]:
        """``(brand, series, body)`` codes of every variant code (do not modify)."""
        if self._variant_arrays is None:
            rows = np.array(self._variant_rows, dtype=np.int32).reshape(-1, 3)
            self._variant_arrays = (rows[:, 0].copy(), rows[:, 1].copy(), rows[:, 2].copy())
        return self._variant_arrays

    def variant_derived(self, key: object, make: Callable[[], T]) -> T:
        """``make()``, a value computed from :meth:`variants` only, kept per ``key`` until a
        new variant appears."""
        found = self._variant_derived.get(key)
        if found is None:
            if len(self._variant_derived) >= 8:  # configs changed: drop the old ones
                self._variant_derived.clear()
            found = self._variant_derived[key] = make()
        return found  # type: ignore[return-value]

    def car(self, car_id: int) -> Car | None:
        """The car with ``car_id`` (any status), or None when not in the inventory."""
        s = self.slot_of.get(car_id)
        return None if s is None else self.cars[s]

    def on_sale_slots(self, city: str | None, lo: float | None, hi: float | None) -> I64:
        """Slots of the cars on sale in ``city`` (every city when None) priced in
        ``[lo, hi]`` (None: unbounded), ascending; do not modify."""
        if city is None:
            return self.on_sale_lists.slots(None, lo, hi)
        code = self.cities.code.get(city)
        if code is None:
            return np.zeros(0, np.int64)
        return self.on_sale_lists.slots(code, lo, hi)

    def on_sale_columns(self, city: str | None) -> OnSaleColumns:
        """The cars on sale in ``city`` (every city when None) with their columns, in
        (price, slot) order (see :class:`OnSaleColumns`); do not modify."""
        code = None
        if city is not None:
            code = self.cities.code.get(city)
            if code is None:
                return OnSaleColumns.empty()
        found = self._columns.get(code)
        if found is None:
            keys = self.on_sale_lists.keys(code)
            slots = keys & np.int64(0xFFFFFFFF)
            row_of = self._row_in_all if code is None else self._row_in_city
            row_of[slots] = np.arange(len(slots))
            found = OnSaleColumns(
                keys, slots, self.ids[slots], self.brand[slots],
                self.variant[slots].astype(np.intp), self.features[:, slots], self.price[slots],
                row_of,
            )  # fmt: skip
            self._columns[code] = found
        return found

    def customer_cars(self, customer_id: int) -> Mapping[int, int]:
        """``{slot: kind mask}`` of the customer's interactions."""
        return self.customers.get(customer_id)

    def customer_items(self, customer_id: int) -> tuple[list[int], list[int]]:
        """The slots of the customer's cars and their kind masks (as ``customer_cars``)."""
        return self.customers.items(customer_id)

    def cooccurrence_rows(self, slots: Sequence[int]) -> tuple[I64, I64, F64]:
        """The rows of several slots at once, concatenated in the order given:
        ``(which, nbr, cosine)`` where ``which`` is the position in ``slots`` of the row an
        entry belongs to; within a row, neighbours are unique."""
        which, nbr, weight = self.pairs.rows(slots)
        return which, nbr, self.cosines(np.asarray(slots, np.int64)[which], nbr, weight)

    def cosines(self, a: I64, b: I64, weight: I64) -> F64:
        """The co-occurrence cosines of the pairs ``(a[i], b[i])`` whose weights are
        ``weight`` (entries of their rows)."""
        if len(a) == 0:
            return np.zeros(0, np.float64)
        denom = np.sqrt(self.sq_norm[a].astype(np.float64) * self.sq_norm[b].astype(np.float64))
        cos = np.zeros(len(a))
        np.divide(weight, denom, out=cos, where=denom > 0)
        return cos

    def cosine(self, a: int, b: int) -> float:
        """Co-occurrence cosine of two slots (0 when none)."""
        value = self.pairs.get(a, b)
        denom = math.sqrt(float(self.sq_norm[a]) * float(self.sq_norm[b]))
        return value / denom if value > 0 and denom > 0 else 0.0

    @property
    def nbytes(self) -> int:
        """Approximate memory of the index (arrays, overlays, per-car objects)."""
        arrays = (
            self.ids, self.known, self.on_sale, self.price, self.features, self.brand,
            self.series, self.body, self.variant, self.city, self.car_seq, self.logpop,
            self.sq_norm,
        )  # fmt: skip
        objects = 250 * self.n  # Car object, dict entries
        columns = self._row_in_city.nbytes + self._row_in_all.nbytes + sum(
            c.keys.nbytes + c.slots.nbytes + c.ids.nbytes + c.brand.nbytes + c.variant.nbytes
            + c.features.nbytes + c.price.nbytes + sum(a.nbytes for a in c.derived.values())
            for c in self._columns.values()
        )  # fmt: skip
        return (
            int(sum(a.nbytes for a in arrays))
            + int(columns)
            + objects
            + self.pairs.nbytes
            + self.customers.nbytes
            + self.on_sale_lists.nbytes
        )

    # ------------------------------------------------------------------ cars

    def upsert_car(self, car: Car, sequence: int) -> bool:
        """Applies a car row whose change sequence is ``sequence``; an older row than the
        one held is ignored. Returns whether anything changed. ValueError when the price is
        outside ``0..MAX_PRICE_KEY`` (the api accepts far less)."""
        if not 0 <= car.price_yuan <= MAX_PRICE_KEY:
            raise ValueError(f"car {car.id}: price {car.price_yuan} out of range")
        s = self.slot(car.id)
        if self.known[s] and sequence <= self.car_seq[s]:
            return False
        new_city = self.cities(car.city)
        old = (int(self.city[s]), int(self.price[s])) if self.on_sale[s] else None
        new = (new_city, car.price_yuan) if car.status == CarStatus.ON_SALE else None
        self.on_sale_lists.move(s, old, new)
        if old is not None or new is not None:  # the columns of those lists are stale
            self._columns.pop(None, None)
            if old is not None:
                self._columns.pop(old[0], None)
            if new is not None:
                self._columns.pop(new[0], None)
        self.cars[s] = car
        self.known[s] = True
        self.on_sale[s] = car.status == CarStatus.ON_SALE
        self.price[s] = car.price_yuan
        self.log_price[s] = math.log(max(car.price_yuan, 1))
        self.year[s] = float(car.model_year)
        self.log_mileage[s] = math.log1p(max(car.mileage_km, 0))
        self.brand[s] = self.brands(car.brand)
        self.series[s] = self.series_vocab(f"{car.brand}\x00{car.series}")
        self.body[s] = int(car.body_type)
        self.variant[s] = self._variant(int(self.brand[s]), int(self.series[s]), int(car.body_type))
        self.city[s] = new_city
        self.car_seq[s] = sequence
        return True

    def apply_cars(self, rows: Iterable[tuple[Car, int]]) -> int:
        """Applies ``(car, sequence)`` rows; returns how many changed the index."""
        return sum(1 for car, seq in rows if self.upsert_car(car, seq))

    # ------------------------------------------------------------------ interactions

    def add_interaction(self, it: Interaction) -> bool:
        """Applies one interaction (once per sequence; a sequence of 0 is always applied)."""
        seq = it.sequence
        if seq:
            if seq <= self.watermark or seq in self._applied:
                return False
            self._applied.add(seq)
        s = self.slot(it.car_id)
        t = it.occurred_at.timestamp()
        contribution = math.log(KIND_WEIGHT[it.kind]) + (t - T0) * self.decay
        self.logpop[s] = _logaddexp(float(self.logpop[s]), contribution)
        self._add_interest(it.customer_id, s, 1 << int(it.kind))
        return True

    def apply_interactions(self, rows: Iterable[Interaction]) -> int:
        return sum(1 for it in rows if self.add_interaction(it))

    def _add_interest(self, customer_id: int, s: int, bit: int) -> None:
        cars = self.customers.mutable(customer_id)
        old_mask = cars.get(s, 0)
        new_mask = old_mask | bit
        if new_mask == old_mask:
            return
        cars[s] = new_mask
        limit = self.max_customer_cars
        size = len(cars)
        if size > limit + 1 or (size == limit + 1 and old_mask):
            return  # already left out of co-occurrence
        if size == limit + 1:  # just crossed the limit: withdraw everything it added
            others = [(y, kind_mask_weight(m)) for y, m in cars.items() if y != s]
            for i, (y, wy) in enumerate(others):
                self.sq_norm[y] -= wy * wy
                for z, wz in others[i + 1 :]:
                    self.pairs.add(y, z, -wy * wz)
            return
        old_w, new_w = kind_mask_weight(old_mask), kind_mask_weight(new_mask)
        if new_w == old_w:
            return
        self.sq_norm[s] += new_w * new_w - old_w * old_w
        dw = new_w - old_w
        for y, m in cars.items():
            if y != s:
                self.pairs.add(s, y, dw * kind_mask_weight(m))

    def advance_watermark(self, sequence: int) -> None:
        """Every change up to ``sequence`` is applied now."""
        if sequence > self.watermark:
            self.watermark = sequence
            self._applied = {s for s in self._applied if s > sequence}

    # ------------------------------------------------------------------ bulk

    def bulk_load(
        self,
        cars: Sequence[tuple[Car, int]],
        interactions: InteractionArrays,
        watermark: int,
    ) -> None:
        """Loads a fresh index in one go (vectorized): cars, then interactions given as
        column arrays. Produces the same state as applying them one by one."""
        if self.n or self.watermark:
            raise RuntimeError("bulk_load needs an empty index")
        self.apply_cars(cars)
        customer, car_id, kind, t = interactions
        if len(customer):
            uniq, inverse = np.unique(car_id, return_inverse=True)
            mapped = np.fromiter((self.slot(int(c)) for c in uniq), np.int64, len(uniq))
            slots = mapped[inverse.reshape(-1)]
            n = self.n
            contrib = _KIND_LOG_WEIGHT[kind.astype(np.int64)] + (t - T0) * self.decay
            top = np.full(n, -np.inf)
            np.maximum.at(top, slots, contrib)
            sums = np.bincount(slots, weights=np.exp(contrib - top[slots]), minlength=n)
            with np.errstate(divide="ignore"):
                self.logpop[:n] = np.where(sums > 0, top + np.log(sums), -np.inf)
            self._load_customers(customer, slots, kind)
        self.watermark = watermark

    def _load_customers(self, customer: I64, slots: I64, kind: npt.NDArray[np.int8]) -> None:
        n = self.n
        order = np.lexsort((slots, customer))
        cust, slot = customer[order], slots[order]
        bits = (np.int64(1) << kind[order].astype(np.int64)).astype(np.int64)
        first = np.ones(len(cust), np.bool_)
        first[1:] = (cust[1:] != cust[:-1]) | (slot[1:] != slot[:-1])
        starts = np.flatnonzero(first)
        masks = np.bitwise_or.reduceat(bits, starts)
        cust, slot = cust[starts], slot[starts]
        # customers: CSR over sorted ids
        new_customer = np.ones(len(cust), np.bool_)
        new_customer[1:] = cust[1:] != cust[:-1]
        g_start = np.flatnonzero(new_customer)
        sizes = np.diff(np.append(g_start, len(cust)))
        indptr = np.zeros(len(g_start) + 1, np.int64)
        np.cumsum(sizes, out=indptr[1:])
        self.customers = CustomerSets(
            cust[g_start].astype(np.int64), indptr, slot.astype(np.int64), masks.astype(np.int8)
        )
        # co-occurrence of customers within the limit
        w = _MASK_WEIGHT[masks]
        elem_size = np.repeat(sizes, sizes)
        elem_start = np.repeat(g_start, sizes)
        counted = elem_size <= self.max_customer_cars
        self.sq_norm[:n] = np.rint(
            np.bincount(slot[counted], weights=(w[counted] ** 2).astype(np.float64), minlength=n)
        ).astype(np.int64)
        elems = np.flatnonzero(counted & (elem_size >= 2))
        reps = elem_size[elems]
        a = np.repeat(elems, reps)
        offsets = np.arange(int(reps.sum()), dtype=np.int64) - np.repeat(
            np.cumsum(reps) - reps, reps
        )
        b = elem_start[a] + offsets
        keep = a != b
        a, b = a[keep], b[keep]
        self.pairs = PairWeights(CsrBase.from_triples(slot[a], slot[b], w[a] * w[b], n))
