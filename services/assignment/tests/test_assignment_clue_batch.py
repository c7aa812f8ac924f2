"""CreateClue group commit: the pure batch planner, the store's batch path against
MariaDB, and many concurrent CreateClue calls (with duplicates) through the server."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from assignment_testlib import SALE, ManualClock, Service, new_clue
from crm.assignment.v1 import assignment_pb2 as pb
from crm_assignment.api.clue_batcher import ClueBatcher
from crm_assignment.config import LineConfig
from crm_assignment.domain.clue_batch import BatchItem, StoredClue, plan_batch
from crm_assignment.domain.model import (
    BusinessLine,
    Category,
    Clue,
    ClueResult,
    Customer,
    EventKind,
    NewClue,
    ProtectedPhone,
    Status,
    Task,
)
from crm_assignment.store import AssignmentStore
from crm_assignment.store.schema import ClueRow, TaskEventRow, TaskRow
from crm_common.aio import BlockingExecutor
from crm_common.errors import AlreadyExists, CrmError, Unavailable
from sqlalchemy import Engine, func, select

NOW = datetime(2025, 11, 23, 9, 0, tzinfo=UTC)
DAY = 86400


def _phone(n: int) -> ProtectedPhone:
    return ProtectedPhone(hash_hex=f"h{n}", encrypted=b"e", masked=f"m{n}")


def _new(
    key: str,
    phone: int = 1,
    *,
    h: str | None = None,
    line: BusinessLine = BusinessLine.SALE,
    brands: tuple[str, ...] = (),
) -> NewClue:
    return NewClue(
        idempotency_key=key,
        phone=_phone(phone),
        business_line=line,
        source="app",
        city="beijing",
        intent_car_ids=(),
        brands=brands,
        budget_min_yuan=0,
        budget_max_yuan=0,
        priority=0,
        request_hash=h or f"hash-{key}-{phone}",
    )


def _item(new: NewClue, window: int = DAY, priority: int = 5, now: datetime = NOW) -> BatchItem:
    return BatchItem(clue=new, now=now, merge_window_s=window, priority=priority)


CUSTOMERS = {f"h{n}": Customer(id=100 + n, masked_phone=f"m{n}", star=n == 3) for n in range(5)}


def _task(**kw: object) -> Task:
    base = {
        "id": 7,
        "business_line": BusinessLine.SALE,
        "category": Category.NEW_CLUE,
        "status": Status.UNASSIGNED,
        "customer_id": 101,
        "city": "beijing",
        "priority": 5,
        "star": False,
        "agent_id": None,
        "preferred_agent_id": None,
        "last_lost_agent_id": None,
        "parent_task_id": None,
        "brands": ("BMW",),
        "created_at": NOW - timedelta(hours=1),
        "due_at": NOW + timedelta(hours=2),
        "offer_deadline": None,
        "recycle_count": 0,
        "clue_count": 1,
        "updated_at": NOW - timedelta(hours=1),
    }
    base.update(kw)
    return Task(**base)  # type: ignore[arg-type]


def _ok(o: ClueResult | CrmError) -> ClueResult:
    assert isinstance(o, ClueResult), o
    return o


# --------------------------------------------------------------------------- planner


def test_plan_new_tasks_in_request_order_with_provisional_ids() -> None:
    items = [_item(_new("a", 1)), _item(_new("b", 2), priority=8), _item(_new("c", 3))]
    plan = plan_batch(items, CUSTOMERS, {}, {}, {})
    assert [t.id for t in plan.new_tasks] == [-1, -2, -3]
    assert [t.customer_id for t in plan.new_tasks] == [101, 102, 103]
    assert [t.priority for t in plan.new_tasks] == [5, 8, 5]
    assert [t.star for t in plan.new_tasks] == [False, False, True]  # the customer's flag
    assert plan.merged_tasks == []
    assert [(e.task_id, e.clue_id, e.kind, e.from_status) for e in plan.events] == [
        (-1, -1, EventKind.CREATED, None),
        (-2, -2, EventKind.CREATED, None),
        (-3, -3, EventKind.CREATED, None),
    ]
    out = [_ok(o) for o in plan.resolve([11, 12, 13], [21, 22, 23])]
    assert [(o.task.id, o.clue.id, o.clue.task_id, o.merged) for o in out] == [
        (11, 21, 11, False),
        (12, 22, 12, False),
        (13, 23, 13, False),
    ]
    with pytest.raises(ValueError, match="one id per"):
        plan.resolve([11], [21, 22, 23])


def test_plan_same_key_twice_is_a_replay_of_the_first() -> None:
    items = [_item(_new("k", 1)), _item(_new("k", 1)), _item(_new("k", 1, h="other"))]
    plan = plan_batch(items, CUSTOMERS, {}, {}, {})
    assert len(plan.new_tasks) == 1
    assert len(plan.clues) == 1
    assert len(plan.events) == 1
    first, again, reused = plan.resolve([50], [60])
    first, again = _ok(first), _ok(again)
    assert not first.replayed
    assert again.replayed
    assert (again.task.id, again.clue.id, again.merged) == (50, 60, False)
    assert isinstance(reused, AlreadyExists)
    assert reused.reason == "IDEMPOTENCY_KEY_REUSED"


def test_plan_key_reuse_of_a_stored_clue() -> None:
    task = _task(id=9, clue_count=2)
    stored_clue = Clue(
        id=40, task_id=9, source="app", city="beijing", intent_car_ids=(), brands=(),
        budget_min_yuan=0, budget_max_yuan=0, merged=True, created_at=NOW,
    )  # fmt: skip
    stored = {"k": StoredClue(stored_clue, "hash-k-1")}
    items = [_item(_new("k", 1)), _item(_new("k", 2)), _item(_new("x", 2))]
    plan = plan_batch(items, CUSTOMERS, stored, {9: task}, {})
    replay, reused, created = plan.resolve([70], [80])
    replay = _ok(replay)
    assert replay.replayed
    assert replay.merged  # as first answered
    assert (replay.task, replay.clue) == (task, stored_clue)
    assert isinstance(reused, AlreadyExists)  # other phone: another request
    assert _ok(created).task.id == 70
    assert [d.new.idempotency_key for d in plan.clues] == ["x"]


def test_plan_same_customer_twice_merges_into_the_new_task() -> None:
    items = [
        _item(_new("a", 1, brands=("BMW",))),
        _item(_new("b", 1, brands=("Audi", "bmw")), priority=8),
        _item(_new("c", 1, line=BusinessLine.FINANCE)),  # another line: its own task
        _item(_new("d", 1), window=0),  # this line asks for no merging
    ]
    plan = plan_batch(items, CUSTOMERS, {}, {}, {})
    assert [t.id for t in plan.new_tasks] == [-1, -2, -3]
    final = plan.new_tasks[0]  # what is inserted: the state after both clues
    assert final.clue_count == 2
    assert final.brands == ("BMW", "Audi")
    assert final.priority == 8
    a, b, c, d = (_ok(o) for o in plan.resolve([5, 6, 7], [1, 2, 3, 4]))
    assert (a.task.id, a.task.clue_count, a.merged) == (5, 1, False)  # as it was then
    assert (b.task.id, b.task.clue_count, b.merged) == (5, 2, True)
    assert b.clue.task_id == 5
    assert (c.task.id, d.task.id) == (6, 7)
    assert [e.kind for e in plan.events] == [
        EventKind.CREATED,
        EventKind.MERGED,
        EventKind.CREATED,
        EventKind.CREATED,
    ]
    assert plan.events[1].from_status is Status.UNASSIGNED


def test_plan_merges_into_an_existing_task_and_replays_see_its_state() -> None:
    existing = _task(id=7, customer_id=101, due_at=NOW + timedelta(hours=2))
    old_clue = Clue(
        id=30, task_id=7, source="app", city="beijing", intent_car_ids=(), brands=(),
        budget_min_yuan=0, budget_max_yuan=0, merged=False, created_at=NOW,
    )  # fmt: skip
    items = [
        _item(_new("m1", 1, brands=("Audi",)), priority=3),
        _item(_new("m2", 1)),
        _item(_new("old", 1)),  # a retry of the clue that created task 7
    ]
    plan = plan_batch(
        items,
        CUSTOMERS,
        {"old": StoredClue(old_clue, "hash-old-1")},
        {7: existing},
        {(101, BusinessLine.SALE): existing},
    )
    assert plan.new_tasks == []
    assert len(plan.merged_tasks) == 1
    final = plan.merged_tasks[0]
    assert (final.id, final.clue_count, final.brands) == (7, 3, ("BMW", "Audi"))
    assert final.priority == 5
    assert final.due_at == NOW  # asked again: due now, not at the revisit
    m1, m2, old = (_ok(o) for o in plan.resolve([], [91, 92]))
    assert (m1.task.clue_count, m2.task.clue_count) == (2, 3)
    assert m1.merged
    assert m2.merged
    assert old.replayed
    assert not old.merged
    assert old.task.clue_count == 3  # the task's current state
    assert [(e.task_id, e.kind) for e in plan.events] == [
        (7, EventKind.MERGED),
        (7, EventKind.MERGED),
    ]


def test_plan_respects_the_merge_window_per_request() -> None:
    old = _task(id=7, customer_id=101, created_at=NOW - timedelta(seconds=100))
    items = [_item(_new("a", 1), window=50), _item(_new("b", 1), window=200)]
    plan = plan_batch(items, CUSTOMERS, {}, {}, {(101, BusinessLine.SALE): old})
    a, b = (_ok(o) for o in plan.resolve([8], [1, 2]))
    assert (a.task.id, a.merged) == (8, False)  # task 7 is older than a's window
    assert (b.task.id, b.merged) == (8, True)  # the newest open task: the one a created


# --------------------------------------------------------------------------- store


def _real(key: str, phone: str, h: str | None = None) -> NewClue:
    return new_clue(key, phone, h or f"h-{key}", intent_car_ids=(1,), brands=("BMW",))


def test_store_batch_matches_one_by_one(store: AssignmentStore, engine: Engine) -> None:
    cfg = LineConfig()
    first = store.create_clue(_real("s0", "13800000000"), NOW, cfg)
    out = store.create_clues(
        [
            (_real("s1", "13800000001"), NOW, cfg),
            (_real("s2", "13800000001"), NOW, cfg),  # merges into s1's new task
            (_real("s0", "13800000000"), NOW, cfg),  # replay of a stored clue
            (_real("s3", "13800000000"), NOW, cfg),  # merges into s0's stored task
            (_real("s1", "13800000001"), NOW, cfg),  # replay of s1 (in this batch)
            (_real("s1", "13800000001", h="x"), NOW, cfg),  # key reuse
            (_real("s4", "13800000004"), NOW, cfg),
        ]
    )
    assert isinstance(out[5], AlreadyExists)
    s1, s2, s0, s3, s1b, _, s4 = out
    assert isinstance(s1, ClueResult)
    assert isinstance(s2, ClueResult)
    assert isinstance(s0, ClueResult)
    assert isinstance(s3, ClueResult)
    assert isinstance(s1b, ClueResult)
    assert isinstance(s4, ClueResult)
    assert s2.merged
    assert s2.task.id == s1.task.id
    assert s2.task.clue_count == 2
    assert s0.replayed
    assert s0.clue == first.clue
    assert s0.task.id == first.task.id
    assert s3.merged
    assert s3.task.id == first.task.id
    assert s3.task.clue_count == 2
    assert s1b.replayed
    assert s1b.clue == s1.clue
    assert s1b.task.clue_count == 2
    assert s1.clue.id < s2.clue.id < s3.clue.id < s4.clue.id
    assert len({s1.task.id, first.task.id, s4.task.id}) == 3
    # what a reader sees afterwards equals what the batch answered
    for r in (s2, s3, s4):
        d = store.get_task(r.task.id)
        assert d.task == r.task
        assert r.clue in d.clues
    d = store.get_task(s1.task.id)
    assert [(e.kind, e.reason) for e in d.history] == [
        (EventKind.CREATED, f"clue {s1.clue.id}"),
        (EventKind.MERGED, f"clue {s2.clue.id}"),
    ]
    # retried one by one afterwards: replays
    again = store.create_clue(_real("s2", "13800000001"), NOW, cfg)
    assert again.replayed
    assert again.clue == s2.clue


def test_store_batch_falls_back_one_by_one(
    store: AssignmentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = LineConfig()
    store.create_clue(_real("f0", "13800000010"), NOW, cfg)

    def broken(*args: object) -> object:
        raise RuntimeError("batch path broken")

    monkeypatch.setattr(store, "_create_clues", broken)
    out = store.create_clues(
        [
            (_real("f1", "13800000011"), NOW, cfg),
            (_real("f0", "13800000010", h="other"), NOW, cfg),  # bad: key reuse
            (_real("f2", "13800000011"), NOW, cfg),
        ]
    )
    assert isinstance(out[1], AlreadyExists)
    f1, f2 = out[0], out[2]
    assert isinstance(f1, ClueResult)
    assert isinstance(f2, ClueResult)
    assert f2.merged
    assert f2.task.id == f1.task.id


def test_store_batch_unavailable_fails_every_request(
    store: AssignmentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(*args: object) -> object:
        raise Unavailable("the database is unavailable", reason="DB_UNAVAILABLE")

    monkeypatch.setattr(store._tx, "run_core", down)
    out = store.create_clues([(_real("u1", "13800000020"), NOW, LineConfig())] * 2)
    assert all(isinstance(o, Unavailable) for o in out)


# --------------------------------------------------------------------------- batcher


class _SlowWriter:
    """Records batch sizes; the first batch waits for a signal."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.release = threading.Event()

    def create_clues(self, requests: list[tuple[NewClue, datetime, LineConfig]]) -> list[object]:
        self.sizes.append(len(requests))
        self.release.wait(10)
        out: list[object] = []
        for new, now, _ in requests:
            if new.idempotency_key.startswith("bad"):
                out.append(AlreadyExists("no", reason="IDEMPOTENCY_KEY_REUSED"))
            else:
                clue = Clue(1, 1, "app", "x", (), (), 0, 0, False, now)
                out.append(ClueResult(task=_task(id=1), clue=clue, merged=False))
        return out


async def test_batcher_groups_queued_calls_and_isolates_errors() -> None:
    writer = _SlowWriter()
    executor = BlockingExecutor(2)
    batcher = ClueBatcher(writer, executor, max_batch=4)  # type: ignore[arg-type]
    try:
        first = asyncio.create_task(batcher.submit(_new("k0"), NOW, LineConfig()))
        await asyncio.sleep(0.05)  # the first batch (of one) is being written
        keys = ["k1", "bad2", "k3", "k4", "k5", "k6"]
        calls = [asyncio.create_task(batcher.submit(_new(k), NOW, LineConfig())) for k in keys]
        cancelled = asyncio.create_task(batcher.submit(_new("k7"), NOW, LineConfig()))
        await asyncio.sleep(0.05)
        cancelled.cancel()  # while queued: dropped, never written
        writer.release.set()
        assert isinstance(await first, ClueResult)
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert [type(r).__name__ for r in results] == [
            "ClueResult",
            "AlreadyExists",
            "ClueResult",
            "ClueResult",
            "ClueResult",
            "ClueResult",
        ]
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert writer.sizes == [1, 4, 2]  # no delay for the first; then up to max_batch
        await batcher.aclose()
        with pytest.raises(Unavailable):
            await batcher.submit(_new("late"), NOW, LineConfig())
    finally:
        await executor.aclose()


async def test_batcher_resolves_every_future_when_its_drain_is_cancelled() -> None:
    writer = _SlowWriter()
    executor = BlockingExecutor(1)
    batcher = ClueBatcher(writer, executor)  # type: ignore[arg-type]
    try:
        calls = [
            asyncio.create_task(batcher.submit(_new(f"c{i}"), NOW, LineConfig())) for i in range(3)
        ]
        await asyncio.sleep(0.05)
        (lane,) = batcher._lanes
        lane.cancel()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, Unavailable) for r in results)
        await asyncio.sleep(0)
        assert not batcher._lanes
    finally:
        writer.release.set()
        await executor.aclose()


# --------------------------------------------------------------------------- RPC level


def test_many_concurrent_create_clues_with_duplicates(service: Service, clock: ManualClock) -> None:
    """~200 concurrent calls: each key sent 1-3 times at once, phones shared by several
    keys. Each key -> one clue; retries get the same answer; one task per phone; audit:
    one CREATED per task, one MERGED per merged clue."""
    n_keys, n_phones = 136, 30
    sends = [k for k in range(n_keys) for _ in range(1 + (k % 3 == 0) + (k % 7 == 0))]
    assert 190 <= len(sends) <= 210
    results: list[tuple[int, pb.CreateClueResponse]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    n_threads = 16
    barrier = threading.Barrier(n_threads)

    def sender(offset: int) -> None:
        channel, stub = service.new_stub()
        try:
            barrier.wait()
            futures = [
                (
                    k,
                    stub.CreateClue.future(
                        pb.CreateClueRequest(
                            idempotency_key=f"load-{k}",
                            phone=f"1390000{k % n_phones:04d}",
                            business_line=SALE,
                            source="app",
                            city="beijing",
                            brands=[f"B{k % 5}"],
                        ),
                        timeout=60,
                    ),
                )
                for k in sends[offset::n_threads]
            ]
            for k, f in futures:
                r = f.result()
                with lock:
                    results.append((k, r))
        except BaseException as exc:
            errors.append(exc)
        finally:
            channel.close()

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    assert len(results) == len(sends)
    assert service.app.servicer.clues.batches < len(sends)  # calls were grouped

    by_key: dict[int, list[pb.CreateClueResponse]] = {}
    for k, r in results:
        by_key.setdefault(k, []).append(r)
    for k, rs in by_key.items():
        assert len({r.clue.id for r in rs}) == 1, f"key {k}: one clue"
        assert len({r.task.id for r in rs}) == 1, f"key {k}: retries get the same task"
        assert len({r.merged for r in rs}) == 1
    task_of_phone: dict[int, set[int]] = {}
    for k, rs in by_key.items():
        task_of_phone.setdefault(k % n_phones, set()).add(rs[0].task.id)
    assert all(len(tasks) == 1 for tasks in task_of_phone.values()), "one task per phone"

    engine = service.app.engine
    with engine.connect() as conn:
        clue_keys = conn.execute(select(ClueRow.idempotency_key)).scalars().all()
        tasks = conn.execute(select(TaskRow.id, TaskRow.clue_count)).all()
        events = conn.execute(select(TaskEventRow.task_id, TaskEventRow.kind)).all()
        merged_clues = conn.scalar(
            select(func.count()).select_from(ClueRow).where(ClueRow.merged.is_(True))
        )
    assert Counter(clue_keys) == Counter({f"load-{k}": 1 for k in range(n_keys)})
    assert len(tasks) == n_phones
    assert sum(c for _, c in tasks) == n_keys
    kinds = Counter(str(kind) for _, kind in events)
    assert kinds == Counter({"CREATED": n_phones, "MERGED": n_keys - n_phones})
    assert merged_clues == n_keys - n_phones
    created_per_task = Counter(t for t, kind in events if str(kind) == "CREATED")
    assert set(created_per_task.values()) == {1}
    for _, rs in by_key.items():  # a retry afterwards replays, one by one
        assert rs[0].task.id in {t for t, _ in tasks}
    again = service.clue("load-0", "13900000000", brands=["B0"])
    assert again.clue.id == by_key[0][0].clue.id


def test_concurrent_key_reuse_is_refused(service: Service) -> None:
    """The same key sent at once with two different requests: one wins, the other gets
    ALREADY_EXISTS; nothing else is affected."""
    channel, stub = service.new_stub()
    try:
        futures = [
            stub.CreateClue.future(
                pb.CreateClueRequest(
                    idempotency_key="reuse" if i % 4 == 0 else f"ok-{i}",
                    phone=f"1370000{i:04d}",
                    business_line=SALE,
                    source="app",
                    city="beijing",
                ),
                timeout=60,
            )
            for i in range(24)
        ]
        codes: Counter[str] = Counter()
        for f in futures:
            try:
                f.result()
                codes["OK"] += 1
            except grpc.RpcError as exc:
                codes[exc.code().name] += 1
    finally:
        channel.close()
    assert codes == Counter({"OK": 24 - 5, "ALREADY_EXISTS": 5})
