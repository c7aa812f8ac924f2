"""The cars on sale, per city, sorted by price: hard filters become slices.

Each list holds one int64 *key* per car on sale, ``price << 32 | slot``, sorted: the cars of
a price range are the keys between two binary searches, and the slot is the low half of
the key. A change (a car sold, re-priced, moved, put on sale) is recorded as a pending
removal of its old key and insertion of its new one; pending changes are merged into the
sorted array on the next read, in one vectorized pass (``O(len + changes log changes)``),
so a burst of writes costs one merge, not one copy per write.

The lists hold the same keys whatever order the changes arrived in, so replicas that
applied the same data answer the same range queries with the same set of cars.

:class:`OnSaleColumns` is what the ranking reads: one list's cars in key order with their
columns (ids, brand, variant, features, price) copied next to each other, so the cars of a
price range are contiguous views of every column, not gathers from the whole index. The
index builds them on demand and drops a city's columns when one of its cars changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

__all__ = ["MAX_PRICE_KEY", "OnSaleColumns", "OnSaleLists", "SortedKeys"]

I64 = npt.NDArray[np.int64]
I32 = npt.NDArray[np.int32]
F32 = npt.NDArray[np.float32]

_SLOT_BITS = 32
_SLOT_MASK = np.int64((1 << _SLOT_BITS) - 1)
MAX_PRICE_KEY = (1 << 31) - 1
"""The highest price a key holds (the api accepts at most 100,000,000 yuan)."""


def price_key(price: int, slot: int) -> int:
    """The sort key of a car on sale (``0 <= price <= MAX_PRICE_KEY``, ``slot < 2**32``)."""
    if not (0 <= price <= MAX_PRICE_KEY and 0 <= slot <= _SLOT_MASK):
        raise ValueError(f"price {price} or slot {slot} out of the key's range")
    return (price << _SLOT_BITS) | slot


class SortedKeys:
    """A sorted array of unique int64 keys with pending insertions and removals."""

    __slots__ = ("_add", "_by_slot", "_del", "_keys")

    def __init__(self) -> None:
        self._keys: I64 = np.zeros(0, np.int64)
        self._add: set[int] = set()
        self._del: set[int] = set()
        self._by_slot: I64 | None = None

    def __len__(self) -> int:
        return len(self._keys) + len(self._add) - len(self._del)

    @property
    def nbytes(self) -> int:
        cached = 0 if self._by_slot is None else self._by_slot.nbytes
        return int(self._keys.nbytes + cached + 60 * (len(self._add) + len(self._del)))

    def add(self, key: int) -> None:
        if key in self._del:
            self._del.discard(key)
        else:
            self._add.add(key)
        self._by_slot = None

    def remove(self, key: int) -> None:
        if key in self._add:
            self._add.discard(key)
        else:
            self._del.add(key)
        self._by_slot = None

    def keys(self) -> I64:
        """The sorted keys, pending changes merged (do not modify)."""
        if self._add or self._del:
            keys = self._keys
            if self._del:
                gone = np.fromiter(self._del, np.int64, len(self._del))
                at = np.searchsorted(keys, gone)
                at = at[(at < len(keys)) & (keys[np.minimum(at, len(keys) - 1)] == gone)]
                keys = np.delete(keys, at)
            if self._add:
                new = np.sort(np.fromiter(self._add, np.int64, len(self._add)))
                keys = np.insert(keys, np.searchsorted(keys, new), new)
            self._keys = keys
            self._add, self._del = set(), set()
        return self._keys

    def slots_between(self, lo: float | None, hi: float | None) -> I64:
        """Slots of the keys whose price is in ``[lo, hi]`` (None: unbounded), ascending."""
        keys = self.keys()
        if lo is None and hi is None:
            if self._by_slot is None:
                self._by_slot = np.sort(keys & _SLOT_MASK)
            return self._by_slot
        i = 0 if lo is None else _bound(keys, math.ceil(lo))
        j = len(keys) if hi is None else _bound(keys, math.floor(hi) + 1)
        if j <= i:
            return np.zeros(0, np.int64)
        return np.sort(keys[i:j] & _SLOT_MASK)


def _bound(keys: I64, price: int) -> int:
    """Index of the first key whose price is >= ``price``."""
    if price <= 0:
        return 0
    if price > MAX_PRICE_KEY:
        return len(keys)
    return int(keys.searchsorted(np.int64(price << _SLOT_BITS)))


class OnSaleLists:
    """One :class:`SortedKeys` per city code plus one over every city."""

    __slots__ = ("_all", "_city")

    def __init__(self) -> None:
        self._all = SortedKeys()
        self._city: dict[int, SortedKeys] = {}

    @property
    def nbytes(self) -> int:
        return self._all.nbytes + sum(lst.nbytes for lst in self._city.values())

    def move(self, slot: int, old: tuple[int, int] | None, new: tuple[int, int] | None) -> None:
        """A car's ``(city code, price)`` on sale changed from ``old`` to ``new`` (None: not
        on sale)."""
        if old == new:
            return
        if old is not None:
            key = price_key(old[1], slot)
            self._all.remove(key)
            self._city[old[0]].remove(key)
        if new is not None:
            key = price_key(new[1], slot)
            self._all.add(key)
            found = self._city.get(new[0])
            if found is None:
                found = self._city[new[0]] = SortedKeys()
            found.add(key)

    def keys(self, city: int | None) -> I64:
        """The sorted keys of ``city`` (every city when None); do not modify."""
        if city is None:
            return self._all.keys()
        found = self._city.get(city)
        return np.zeros(0, np.int64) if found is None else found.keys()

    def slots(self, city: int | None, lo: float | None, hi: float | None) -> I64:
        """Slots of the cars on sale in ``city`` (every city when None) priced in
        ``[lo, hi]``, ascending (do not modify)."""
        if city is None:
            return self._all.slots_between(lo, hi)
        found = self._city.get(city)
        if found is None:
            return np.zeros(0, np.int64)
        return found.slots_between(lo, hi)


@dataclass(frozen=True, slots=True)
class OnSaleColumns:
    """The cars of one on-sale list in key order (price, then slot) with their columns;
    row ``i`` of every column is the car of ``keys[i]``. Read-only.

    ``row_of`` maps a slot to its row in the whole list (kept by the index; an entry of a
    slot not in the list may hold anything, so :meth:`rows_of` checks it); ``offset`` is
    the first row of this range in the whole list, ``whole`` the whole list's features."""

    keys: I64
    slots: I64
    ids: I64
    brand: I32
    variant: I64
    """(as ``intp``: an index array as it is)"""
    features: F32
    """``(3, rows)``: log price, model year, log(1 + mileage) (see ``CarIndex``)."""
    price: I64
    row_of: I64
    offset: int = 0
    whole: F32 | None = None
    """The whole list's ``features`` (None: these are the whole list's)."""
    derived: dict[object, F32] = field(default_factory=dict)
    """Arrays computed from the whole list's columns (see :meth:`derive`), shared by its
    ranges."""

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def empty(cls) -> OnSaleColumns:
        i64, i32 = np.zeros(0, np.int64), np.zeros(0, np.int32)
        return cls(i64, i64, i64, i32, i64, np.zeros((3, 0), np.float32), i64, i64)

    def between(self, lo: float | None, hi: float | None) -> OnSaleColumns:
        """The rows priced in ``[lo, hi]`` (None: unbounded): views, no copy."""
        keys = self.keys
        i = 0 if lo is None else _bound(keys, math.ceil(lo))
        j = len(keys) if hi is None else _bound(keys, math.floor(hi) + 1)
        if i == 0 and j == len(keys):
            return self
        j = max(i, j)
        return OnSaleColumns(
            keys[i:j], self.slots[i:j], self.ids[i:j], self.brand[i:j], self.variant[i:j],
            self.features[:, i:j], self.price[i:j], self.row_of, self.offset + i,
            self.features if self.whole is None else self.whole, self.derived,
        )  # fmt: skip

    def derive(self, key: object, make: Callable[[F32], F32]) -> F32:
        """``make(features of the whole list)`` (a ``(blocks, rows)`` array), computed once
        per ``key`` for the whole list; this range's columns of it."""
        found = self.derived.get(key)
        if found is None:
            if len(self.derived) >= 4:  # configs changed: drop the old ones
                self.derived.clear()
            found = self.derived[key] = make(self.features if self.whole is None else self.whole)
        return found[:, self.offset : self.offset + len(self.keys)]

    def rows_of(self, slots: I64) -> I64:
        """The row of each slot in this range, -1 for a slot not in it."""
        n = len(self.keys)
        if n == 0 or len(slots) == 0:
            return np.full(len(slots), -1, np.int64)
        at = self.row_of[slots]
        at -= self.offset
        # rows outside 0..n-1 clamped to n-1 in one unsigned minimum (a negative row wraps
        # to a huge one); the slot check then rejects them: row n-1 holding this very slot
        # would mean it is in the range, at that row
        np.minimum(at.view(np.uint64), np.uint64(n - 1), out=at.view(np.uint64))
        at[self.slots[at] != slots] = -1
        return at
