"""Sparse-ish structures without scipy: a CSR base in numpy arrays plus dict overlays.

:class:`PairWeights` holds symmetric integer weights between car slots (the item-to-item
co-occurrence); :class:`CustomerSets` holds each customer's cars with the kinds of
interaction seen (a bit mask). Both are built in bulk from numpy arrays, take incremental
changes into a dict overlay, and :class:`PairWeights` can fold its overlay back into a
new base off the event loop (``begin_compaction`` / ``merged`` / ``finish_compaction``).

All weights are integers: sums are exact, so the order changes arrive in does not matter.
Only the owner's thread mutates; ``merged`` only reads the base and a frozen overlay.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["CsrBase", "CustomerSets", "PairWeights"]

I64 = npt.NDArray[np.int64]
I32 = npt.NDArray[np.int32]
I8 = npt.NDArray[np.int8]
Overlay = dict[int, dict[int, int]]


@dataclass(frozen=True, slots=True)
class CsrBase:
    """Rows ``0..rows-1``; row ``a`` holds ``nbr[indptr[a]:indptr[a+1]]`` (sorted) and
    their ``weight``."""

    indptr: I64
    nbr: I32
    weight: I64

    @property
    def rows(self) -> int:
        return len(self.indptr) - 1

    @property
    def nbytes(self) -> int:
        return int(self.indptr.nbytes + self.nbr.nbytes + self.weight.nbytes)

    @classmethod
    def empty(cls) -> CsrBase:
        return cls(np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64))

    @classmethod
    def from_triples(cls, a: I64, b: I64, w: I64, rows: int) -> CsrBase:
        """Sums duplicate ``(a, b)`` weights; zero sums are dropped."""
        if len(a) == 0:
            return cls(np.zeros(rows + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64))
        key = a.astype(np.int64) * np.int64(rows) + b.astype(np.int64)
        uniq, inverse = np.unique(key, return_inverse=True)
        # float64 sums of integers are exact below 2**53 (far above any real total)
        sums = np.rint(np.bincount(inverse, weights=w.astype(np.float64))).astype(np.int64)
        keep = sums != 0
        uniq, sums = uniq[keep], sums[keep]
        row = uniq // rows
        indptr = np.zeros(rows + 1, np.int64)
        np.cumsum(np.bincount(row, minlength=rows), out=indptr[1:])
        return cls(indptr, (uniq % rows).astype(np.int32), sums)

    def row(self, a: int) -> tuple[I32, I64]:
        if a >= self.rows:
            return np.zeros(0, np.int32), np.zeros(0, np.int64)
        lo, hi = int(self.indptr[a]), int(self.indptr[a + 1])
        return self.nbr[lo:hi], self.weight[lo:hi]

    def get(self, a: int, b: int) -> int:
        nbr, weight = self.row(a)
        i = int(np.searchsorted(nbr, b))
        if i < len(nbr) and int(nbr[i]) == b:
            return int(weight[i])
        return 0


def _overlay_triples(overlay: Mapping[int, Mapping[int, int]]) -> tuple[I64, I64, I64]:
    count = sum(len(r) for r in overlay.values())
    a = np.empty(count, np.int64)
    b = np.empty(count, np.int64)
    w = np.empty(count, np.int64)
    i = 0
    for x, row in overlay.items():
        n = len(row)
        a[i : i + n] = x
        b[i : i + n] = np.fromiter(row.keys(), np.int64, n)
        w[i : i + n] = np.fromiter(row.values(), np.int64, n)
        i += n
    return a, b, w


class PairWeights:
    """Symmetric integer weights between slots: CSR base + overlays (see module doc)."""

    def __init__(self, base: CsrBase | None = None) -> None:
        self._base = base or CsrBase.empty()
        self._frozen: Overlay = {}
        self._delta: Overlay = {}
        self._delta_entries = 0

    @property
    def delta_entries(self) -> int:
        """Entries in the active overlay (compaction is due when this grows large)."""
        return self._delta_entries

    @property
    def nbytes(self) -> int:
        """Approximate memory: the base arrays plus ~100 bytes per overlay entry."""
        overlay = sum(len(r) for r in self._frozen.values()) + self._delta_entries
        return self._base.nbytes + 100 * overlay

    def add(self, a: int, b: int, dw: int) -> None:
        """Adds ``dw`` to the weight of ``(a, b)`` and ``(b, a)``."""
        if dw == 0 or a == b:
            return
        for x, y in ((a, b), (b, a)):
            row = self._delta.get(x)
            if row is None:
                row = self._delta[x] = {}
            value = row.get(y, 0) + dw
            if value:
                if y not in row:
                    self._delta_entries += 1
                row[y] = value
            elif y in row:
                del row[y]
                self._delta_entries -= 1

    def row(self, a: int) -> tuple[I64, I64]:
        """Neighbours of ``a`` (sorted, unique) and their non-zero weights. The sums are
        integers, so the answer does not depend on how changes were split between the
        base and the overlays."""
        nbr, weight = self._base.row(a)
        extra = [layer[a] for layer in (self._frozen, self._delta) if a in layer]
        if not extra:
            return nbr.astype(np.int64), weight
        keys = [nbr.astype(np.int64)]
        vals = [weight]
        for row in extra:
            keys.append(np.fromiter(row.keys(), np.int64, len(row)))
            vals.append(np.fromiter(row.values(), np.int64, len(row)))
        uniq, inverse = np.unique(np.concatenate(keys), return_inverse=True)
        sums = np.rint(
            np.bincount(inverse, weights=np.concatenate(vals).astype(np.float64))
        ).astype(np.int64)
        keep = sums != 0
        return uniq[keep], sums[keep]

    def rows(self, slots: Sequence[int] | I64) -> tuple[I64, I64, I64]:
        """The rows of ``slots`` concatenated in the order given: ``(which, nbr, weight)``,
        ``which`` being the position in ``slots`` of each entry's row."""
        base = self._base
        wanted = np.asarray(slots, np.int64)
        if len(wanted) == 0:
            empty = np.zeros(0, np.int64)
            return empty, empty, empty
        overlaid = bool(self._frozen or self._delta) and any(
            s in self._frozen or s in self._delta for s in wanted.tolist()
        )
        if not overlaid:  # the common case: every row in the base, one vectorized gather
            inside = np.minimum(wanted, base.rows)  # a slot past the base: an empty row
            lo = base.indptr[inside]
            lengths = base.indptr[np.minimum(inside + 1, base.rows)] - lo
            total = int(np.add.reduce(lengths))  # (ufunc and array methods called
            # directly: the np.* wrappers cost ~1 us a call)
            which = np.arange(len(wanted), dtype=np.int64).repeat(lengths)
            at = np.arange(total, dtype=np.int64) + (lo - (lengths.cumsum() - lengths)).repeat(
                lengths
            )
            return which, base.nbr[at].astype(np.int64), base.weight[at]
        nbrs: list[npt.NDArray[np.signedinteger[Any]]] = []
        weights: list[I64] = []
        lengths_: list[int] = []
        for s in wanted.tolist():
            nbr, weight = self.row(s)
            nbrs.append(nbr)
            weights.append(weight)
            lengths_.append(len(nbr))
        which = np.repeat(np.arange(len(lengths_), dtype=np.int64), lengths_)
        return which, np.concatenate(nbrs).astype(np.int64), np.concatenate(weights)

    def get(self, a: int, b: int) -> int:
        value = self._base.get(a, b)
        for layer in (self._frozen, self._delta):
            row = layer.get(a)
            if row is not None:
                value += row.get(b, 0)
        return value

    # -- compaction: begin (owner thread), merged (any thread), finish (owner thread) ----

    def begin_compaction(self) -> tuple[CsrBase, Overlay] | None:
        """Freezes the active overlay; None when a compaction is already under way."""
        if self._frozen:
            return None
        self._frozen, self._delta, self._delta_entries = self._delta, {}, 0
        return self._base, self._frozen

    @staticmethod
    def merged(base: CsrBase, frozen: Overlay, rows: int) -> CsrBase:
        """A new base holding ``base + frozen`` (pure; safe in a worker thread)."""
        rows = max(
            rows,
            base.rows,
            *(k + 1 for k in frozen),
            *(max(r) + 1 for r in frozen.values() if r),
            1,
        )
        base_rows = np.repeat(np.arange(base.rows, dtype=np.int64), np.diff(base.indptr))
        oa, ob, ow = _overlay_triples(frozen)
        return CsrBase.from_triples(
            np.concatenate([base_rows, oa]),
            np.concatenate([base.nbr.astype(np.int64), ob]),
            np.concatenate([base.weight, ow]),
            rows,
        )

    def finish_compaction(self, base: CsrBase) -> None:
        self._base, self._frozen = base, {}


class CustomerSets:
    """Each customer's cars (slots) with the interaction kinds seen (bit ``1 << kind``).

    The bulk-loaded part is a CSR over sorted customer ids; a customer touched later is
    copied into a dict overlay that then holds all of their cars.
    """

    def __init__(
        self,
        customers: I64 | None = None,
        indptr: I64 | None = None,
        slots: I64 | None = None,
        masks: I8 | None = None,
    ) -> None:
        self._customers = customers if customers is not None else np.zeros(0, np.int64)
        self._indptr = indptr if indptr is not None else np.zeros(1, np.int64)
        self._slots = slots if slots is not None else np.zeros(0, np.int64)
        self._masks = masks if masks is not None else np.zeros(0, np.int8)
        self._overlay: dict[int, dict[int, int]] = {}

    @property
    def nbytes(self) -> int:
        base = self._customers.nbytes + self._indptr.nbytes + self._slots.nbytes
        overlay = sum(200 + 100 * len(r) for r in self._overlay.values())
        return int(base + self._masks.nbytes + overlay)

    def _base(self, customer: int) -> dict[int, int]:
        i = int(self._customers.searchsorted(customer))
        if i >= len(self._customers) or int(self._customers[i]) != customer:
            return {}
        lo, hi = int(self._indptr[i]), int(self._indptr[i + 1])
        return dict(zip(self._slots[lo:hi].tolist(), self._masks[lo:hi].tolist(), strict=True))

    def items(self, customer: int) -> tuple[list[int], list[int]]:
        """The slots of a customer's cars and their kind masks (as :meth:`get`)."""
        found = self._overlay.get(customer)
        if found is not None:
            return list(found), list(found.values())
        customers = self._customers
        i = int(customers.searchsorted(customer))
        if i >= len(customers) or customers[i] != customer:
            return [], []
        lo, hi = self._indptr[i : i + 2].tolist()
        return self._slots[lo:hi].tolist(), self._masks[lo:hi].tolist()

    def get(self, customer: int) -> Mapping[int, int]:
        """``{slot: kind mask}`` of a customer (empty when unknown); do not modify."""
        found = self._overlay.get(customer)
        return found if found is not None else self._base(customer)

    def mutable(self, customer: int) -> dict[int, int]:
        """The customer's dict, for the owner to update in place."""
        found = self._overlay.get(customer)
        if found is None:
            found = self._overlay[customer] = self._base(customer)
        return found
