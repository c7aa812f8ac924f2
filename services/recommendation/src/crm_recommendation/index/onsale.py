"""The cars on sale, per city, sorted by price: hard filters become slices.

Each list holds one int64 *key* per car on sale, ``price << 32 | slot``, sorted: the cars of
a price range are the keys between two binary searches, and the slot is the low half of
the key. A change (a car sold, re-priced, moved, put on sale) is recorded as a pending
removal of its old key and insertion of its new one; pending changes are merged into the
sorted array on the next read, in one vectorized pass (``O(len + changes log changes)``),
so a burst of writes costs one merge, not one copy per write.

The lists hold the same keys whatever order the changes arrived in, so replicas that
applied the same data answer the same range queries with the same set of cars.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = ["MAX_PRICE_KEY", "OnSaleLists", "SortedKeys"]

I64 = npt.NDArray[np.int64]

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
    return int(np.searchsorted(keys, np.int64(price << _SLOT_BITS)))


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

    def slots(self, city: int | None, lo: float | None, hi: float | None) -> I64:
        """Slots of the cars on sale in ``city`` (every city when None) priced in
        ``[lo, hi]``, ascending (do not modify)."""
        if city is None:
            return self._all.slots_between(lo, hi)
        found = self._city.get(city)
        if found is None:
            return np.zeros(0, np.int64)
        return found.slots_between(lo, hi)
