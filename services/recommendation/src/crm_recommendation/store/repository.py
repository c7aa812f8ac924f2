"""``RecommendationStore``: every database operation of the service (synchronous; run it in
the blocking executor).

Writes take change sequence numbers from the ``change_sequence`` row first (its row lock
serializes writers, so sequence order is commit order; see ``schema``); readers follow
with :meth:`RecommendationStore.changes` and load everything with
:meth:`RecommendationStore.load_all`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
from crm_common.db import TransactionRunner
from crm_common.errors import NotFound
from sqlalchemy import Engine, select, text, update
from sqlalchemy.dialects.mysql import insert as mysql_insert
from sqlalchemy.orm import Session

from crm_recommendation.domain.model import Car, Interaction, InteractionKind
from crm_recommendation.index.car_index import InteractionArrays
from crm_recommendation.store.schema import (
    SEQUENCE_NAME,
    CarRow,
    ChangeSequenceRow,
    InteractionRow,
)

__all__ = ["Changes", "RecommendationStore", "Snapshot", "UpsertResult"]

_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_KIND_BY_NAME = {k.name: int(k) for k in InteractionKind}
_REPLACED_COLUMNS = (
    "brand", "series", "model_year", "mileage_km", "price_yuan", "city", "body_type",
    "status", "seq", "updated_at",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class UpsertResult:
    created: int
    updated: int
    rows: tuple[tuple[Car, int], ...]
    """The written cars with their change sequence numbers."""


@dataclass(frozen=True, slots=True)
class Changes:
    """Rows with ``after < seq <= upto``: every change in that range (cars in their
    latest state, which may carry a later sequence and then show up again later)."""

    upto: int
    cars: tuple[tuple[Car, int], ...]
    interactions: tuple[Interaction, ...]
    latest: int
    """The newest committed sequence when read (``upto < latest``: more to read)."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything up to ``sequence``: cars (latest state) and interaction columns."""

    sequence: int
    cars: list[tuple[Car, int]]
    interactions: InteractionArrays


def _car(row: CarRow) -> Car:
    return Car(
        id=row.id,
        brand=row.brand,
        series=row.series,
        model_year=row.model_year,
        mileage_km=row.mileage_km,
        price_yuan=row.price_yuan,
        city=row.city,
        body_type=row.body_type,
        status=row.status,
    )


class RecommendationStore:
    """Cars, interactions and the change sequence in MySQL/MariaDB."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._tx = TransactionRunner(engine)

    def ping(self) -> None:
        self._tx.ping()

    @staticmethod
    def _allocate(session: Session, count: int) -> int:
        """Takes ``count`` sequence numbers (locking the row until commit); the first."""
        where = ChangeSequenceRow.name == SEQUENCE_NAME
        session.execute(
            update(ChangeSequenceRow).where(where).values(value=ChangeSequenceRow.value + count)
        )
        last = session.execute(select(ChangeSequenceRow.value).where(where)).scalar_one()
        return int(last) - count + 1

    # ------------------------------------------------------------------ writes

    def upsert_cars(self, cars: Sequence[Car], now: datetime) -> UpsertResult:
        """Creates or replaces ``cars`` (ids unique) in one transaction."""

        def tx(session: Session) -> UpsertResult:
            first = self._allocate(session, len(cars))
            ids = [c.id for c in cars]
            existing = set(session.scalars(select(CarRow.id).where(CarRow.id.in_(ids))))
            values = [
                {
                    "id": c.id,
                    "brand": c.brand,
                    "series": c.series,
                    "model_year": c.model_year,
                    "mileage_km": c.mileage_km,
                    "price_yuan": c.price_yuan,
                    "city": c.city,
                    "body_type": c.body_type,
                    "status": c.status,
                    "seq": first + i,
                    "created_at": now,
                    "updated_at": now,
                }
                for i, c in enumerate(cars)
            ]
            stmt = mysql_insert(CarRow)
            stmt = stmt.on_duplicate_key_update(
                {name: stmt.inserted[name] for name in _REPLACED_COLUMNS}
            )
            session.execute(stmt, values)
            rows = tuple((c, first + i) for i, c in enumerate(cars))
            created = len(set(ids) - existing)
            return UpsertResult(created, len(cars) - created, rows)

        return self._tx.run(tx)

    def record_interaction(self, it: Interaction, now: datetime) -> Interaction:
        """Stores ``it``; NotFound when its car is not in the inventory."""

        def tx(session: Session) -> Interaction:
            seq = self._allocate(session, 1)
            if session.execute(select(CarRow.id).where(CarRow.id == it.car_id)).first() is None:
                raise NotFound(f"car {it.car_id} is not in the inventory", reason="CAR_NOT_FOUND")
            session.add(
                InteractionRow(
                    seq=seq,
                    customer_id=it.customer_id,
                    car_id=it.car_id,
                    kind=it.kind,
                    occurred_at=it.occurred_at,
                    recorded_at=now,
                )
            )
            return Interaction(it.customer_id, it.car_id, it.kind, it.occurred_at, seq)

        return self._tx.run(tx)

    # ------------------------------------------------------------------ reads

    def current_sequence(self) -> int:
        with Session(self.engine) as session:
            return int(
                session.execute(
                    select(ChangeSequenceRow.value).where(ChangeSequenceRow.name == SEQUENCE_NAME)
                ).scalar_one()
            )

    def get_car(self, car_id: int) -> Car | None:
        with Session(self.engine) as session:
            row = session.get(CarRow, car_id)
            return None if row is None else _car(row)

    def changes(self, after: int, limit: int = 5000) -> Changes:
        """Changes after ``after``, at most ``limit`` rows of each table (see Changes)."""
        with Session(self.engine) as session:
            latest = int(
                session.execute(
                    select(ChangeSequenceRow.value).where(ChangeSequenceRow.name == SEQUENCE_NAME)
                ).scalar_one()
            )
            if latest <= after:
                return Changes(after, (), (), latest)
            car_rows = session.scalars(
                select(CarRow)
                .where(CarRow.seq > after, CarRow.seq <= latest)
                .order_by(CarRow.seq)
                .limit(limit)
            ).all()
            int_rows = session.scalars(
                select(InteractionRow)
                .where(InteractionRow.seq > after, InteractionRow.seq <= latest)
                .order_by(InteractionRow.seq)
                .limit(limit)
            ).all()
            upto = latest
            if len(car_rows) == limit:
                upto = min(upto, car_rows[-1].seq)
            if len(int_rows) == limit:
                upto = min(upto, int_rows[-1].seq)
            cars = tuple((_car(r), r.seq) for r in car_rows if r.seq <= upto)
            interactions = tuple(
                Interaction(r.customer_id, r.car_id, r.kind, r.occurred_at, r.seq)
                for r in int_rows
                if r.seq <= upto
            )
            return Changes(upto, cars, interactions, latest)

    def load_all(self, batch: int = 50_000) -> Snapshot:
        """Every car and every interaction up to the current sequence, streamed (the
        interactions as numpy columns, without building a Python object per row)."""
        sequence = self.current_sequence()
        cars: list[tuple[Car, int]] = []
        columns = (
            CarRow.id, CarRow.brand, CarRow.series, CarRow.model_year, CarRow.mileage_km,
            CarRow.price_yuan, CarRow.city, CarRow.body_type, CarRow.status, CarRow.seq,
        )  # fmt: skip
        with self.engine.connect() as conn:
            result = conn.execution_options(stream_results=True).execute(select(*columns))
            for part in result.partitions(batch):
                cars.extend((Car(*row[:9]), row[9]) for row in part)
        parts = list(self._interaction_columns(sequence, batch))
        if parts:
            customer = np.concatenate([c[0] for c in parts])
            car_id = np.concatenate([c[1] for c in parts])
            kind = np.concatenate([c[2] for c in parts])
            t = np.concatenate([c[3] for c in parts])
        else:
            customer, car_id = np.zeros(0, np.int64), np.zeros(0, np.int64)
            kind, t = np.zeros(0, np.int8), np.zeros(0, np.float64)
        return Snapshot(sequence, cars, (customer, car_id, kind, t))

    def _interaction_columns(self, upto: int, batch: int) -> Iterator[InteractionArrays]:
        # Microseconds since 2000-01-01 as an integer: no datetime object per row.
        sql = text(
            "SELECT customer_id, car_id, kind, "
            "TIMESTAMPDIFF(MICROSECOND, '2000-01-01 00:00:00', occurred_at) "
            "FROM interaction WHERE seq <= :upto"
        )
        base = _EPOCH.timestamp()
        kinds = _KIND_BY_NAME
        with self.engine.connect() as conn:
            result = conn.execution_options(stream_results=True).execute(sql, {"upto": upto})
            for part in result.partitions(batch):
                customer = np.fromiter((r[0] for r in part), np.int64, len(part))
                car_id = np.fromiter((r[1] for r in part), np.int64, len(part))
                kind = np.fromiter((kinds[r[2]] for r in part), np.int8, len(part))
                micros = np.fromiter((r[3] for r in part), np.int64, len(part))
                yield customer, car_id, kind, base + micros / 1e6
