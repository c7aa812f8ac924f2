"""ConfigWatcher against real etcd processes (one per test, in tmp_path)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aetcd
import pytest
from crm_common import config_watch
from crm_common.config_watch import (
    STOP_TIMEOUT,
    ConfigSnapshot,
    ConfigWatcher,
    ConfigWatchError,
    delete_key,
    put_json,
)
from crm_devstack.stack import Proc, free_port, start_etcd
from pydantic import BaseModel, ConfigDict, Field

PREFIX = "/crm/config/assignment/"
WAIT = 15.0  # generous deadline for anything the watcher should do


class Limits(BaseModel):
    """The schema of one config key in these tests."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_calls: int = Field(ge=1)
    queue: str = "default"


def parse(key: str, raw: bytes) -> Limits:
    return Limits.model_validate_json(raw)


class Etcd:
    """A throwaway etcd that can be SIGKILLed and restarted with its data."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.proc: Proc = start_etcd(data_dir)
        self.port = self.proc.port
        self.endpoint = f"127.0.0.1:{self.port}"

    async def kill(self) -> None:
        await asyncio.to_thread(self.proc.kill)

    async def restart(self) -> None:
        self.proc = await asyncio.to_thread(start_etcd, self.data_dir, self.port)

    def client(self) -> aetcd.Client:
        return aetcd.Client(host="127.0.0.1", port=self.port, timeout=5)

    async def put_raw(self, key: str, raw: bytes) -> int:
        async with self.client() as c:
            return int((await c.put(key.encode(), raw)).header.revision)

    async def compact_all(self) -> int:
        async with self.client() as c:
            rev = int((await c.get_prefix(b"/")).header.revision)
            await c.compact(rev, physical=True)
            return rev

    async def keys(self) -> set[str]:
        async with self.client() as c:
            return {kv.key.decode()[len(PREFIX) :] for kv in await c.get_prefix(PREFIX.encode())}

    async def contents(self) -> dict[str, Limits]:
        async with self.client() as c:
            return {
                kv.key.decode()[len(PREFIX) :]: parse("", kv.value)
                for kv in await c.get_prefix(PREFIX.encode())
            }


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[Etcd]:
    server = Etcd(tmp_path / "etcd")
    yield server
    server.proc.kill()


WatcherFactory = Callable[..., ConfigWatcher[Limits]]


@pytest.fixture
async def make_watcher() -> AsyncIterator[WatcherFactory]:
    made: list[ConfigWatcher[Limits]] = []

    def make(endpoints: str, cls: type[ConfigWatcher[Limits]] = ConfigWatcher, **kw: Any) -> Any:
        kw.setdefault("backoff_initial", 0.1)
        kw.setdefault("backoff_max", 0.5)
        w = cls(endpoints, PREFIX, parse, name="test", **kw)
        made.append(w)
        return w

    yield make
    for w in made:
        await w.stop()


async def eventually(cond: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll ``cond`` until true; fail naming ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def key(name: str) -> str:
    return PREFIX + name


# --------------------------------------------------------------------------- basics


async def test_initial_load(etcd: Etcd, make_watcher: WatcherFactory) -> None:
    await put_json(etcd.endpoint, key("SALE"), {"max_calls": 5})
    await put_json(etcd.endpoint, key("AFTER_SALE"), Limits(max_calls=2, queue="vip"))
    await put_json(etcd.endpoint, key("BROKEN"), {"max_calls": 0})
    await put_json(etcd.endpoint, "/crm/config/other/SALE", {"max_calls": 99})
    last = await put_json(etcd.endpoint, "/crm/config/assignmentX", {"max_calls": 98})
    applied: list[ConfigSnapshot[Limits]] = []
    w = make_watcher(etcd.endpoint, on_apply=applied.append)
    assert (w.ready, w.applied_revision, dict(w.snapshot.values)) == (False, 0, {})

    await w.start(timeout=WAIT)

    assert w.ready
    snap = w.snapshot
    assert dict(snap.values) == {
        "SALE": Limits(max_calls=5),
        "AFTER_SALE": Limits(max_calls=2, queue="vip"),
    }
    assert snap.revision == w.applied_revision == last
    assert set(snap.mod_revisions) == {"SALE", "AFTER_SALE"}
    assert set(w.rejected) == {"BROKEN"}
    assert "max_calls" in w.rejected["BROKEN"].reason
    assert applied == [snap]
    await eventually(lambda: w.connected, "the watch")
    with pytest.raises(TypeError):
        snap.values["SALE"] = Limits(max_calls=1)  # type: ignore[index]


async def test_live_change_invalid_and_delete(etcd: Etcd, make_watcher: WatcherFactory) -> None:
    await put_json(etcd.endpoint, key("SALE"), {"max_calls": 5})
    applied: list[ConfigSnapshot[Limits]] = []

    async def on_apply(snap: ConfigSnapshot[Limits]) -> None:
        applied.append(snap)

    w = make_watcher(etcd.endpoint, on_apply=on_apply)
    await w.start(timeout=WAIT)
    before = w.snapshot

    # a live change
    rev = await put_json(etcd.endpoint, key("SALE"), {"max_calls": 7})
    snap = await w.wait_for_revision(rev, WAIT)
    assert snap.values["SALE"] == Limits(max_calls=7)
    assert snap.mod_revisions["SALE"] == rev
    assert applied[-1] is snap
    assert before.values["SALE"] == Limits(max_calls=5)  # old snapshots never change

    # an invalid value is rejected, the last good one stays
    bad = await put_json(etcd.endpoint, key("SALE"), {"max_calls": -1})
    snap = await w.wait_for_revision(bad, WAIT)
    assert snap.values["SALE"] == Limits(max_calls=7)
    assert snap.mod_revisions["SALE"] == rev
    assert w.rejected["SALE"].revision == bad
    assert applied[-1].revision == rev  # nothing applied, so no on_apply

    # malformed JSON too
    bad = await etcd.put_raw(key("SALE"), b"{not json")
    await w.wait_for_revision(bad, WAIT)
    assert w.snapshot.values["SALE"] == Limits(max_calls=7)
    assert w.rejected["SALE"].revision == bad

    # a later valid value is applied and clears the rejection
    rev = await put_json(etcd.endpoint, key("SALE"), {"max_calls": 9})
    snap = await w.wait_for_revision(rev, WAIT)
    assert snap.values["SALE"] == Limits(max_calls=9)
    assert "SALE" not in w.rejected

    # a delete removes the key
    rev = await delete_key(etcd.endpoint, key("SALE"))
    snap = await w.wait_for_revision(rev, WAIT)
    assert "SALE" not in snap.values
    assert "SALE" not in snap.mod_revisions
    assert snap.revision == rev
    assert applied[-1] is snap

    with pytest.raises(TimeoutError):
        await w.wait_for_revision(rev + 1000, timeout=0.05)


async def test_rejection_log_has_key_and_reason_not_value(
    etcd: Etcd, make_watcher: WatcherFactory, caplog: pytest.LogCaptureFixture
) -> None:
    w = make_watcher(etcd.endpoint)
    await w.start(timeout=WAIT)
    with caplog.at_level(logging.INFO, logger="crm.config"):
        rev = await put_json(etcd.endpoint, key("SALE"), {"max_calls": 0, "queue": "s3cr3t-q"})
        await w.wait_for_revision(rev, WAIT)
    rejected = [r for r in caplog.records if "rejected" in r.getMessage()]
    assert len(rejected) == 1
    msg = rejected[0].getMessage()
    assert key("SALE") in msg
    assert "max_calls" in msg
    assert "s3cr3t" not in caplog.text
    assert "s3cr3t" not in w.rejected["SALE"].reason


async def test_transaction_is_applied_as_one_snapshot(
    etcd: Etcd, make_watcher: WatcherFactory
) -> None:
    await put_json(etcd.endpoint, key("A"), {"max_calls": 1})
    await put_json(etcd.endpoint, key("B"), {"max_calls": 1})
    seen: list[ConfigSnapshot[Limits]] = []
    w = make_watcher(etcd.endpoint, on_apply=seen.append)
    await w.start(timeout=WAIT)
    seen.clear()
    async with etcd.client() as c:
        for n in range(2, 6):
            ok, _ = await c.transaction(
                compare=[],
                failure=[],
                success=[
                    c.transactions.put(key("A").encode(), b'{"max_calls": %d}' % n),
                    c.transactions.put(key("B").encode(), b'{"max_calls": %d}' % n),
                ],
            )
            assert ok
    await eventually(lambda: w.snapshot.values["B"].max_calls == 5, "the last transaction")
    assert seen
    for snap in seen:
        assert snap.values["A"] == snap.values["B"]
        assert snap.mod_revisions["A"] == snap.mod_revisions["B"] == snap.revision


async def test_failing_on_apply_does_not_stop_the_watcher(
    etcd: Etcd, make_watcher: WatcherFactory
) -> None:
    calls: list[int] = []

    def on_apply(snap: ConfigSnapshot[Limits]) -> None:
        calls.append(snap.revision)
        raise RuntimeError("boom")

    w = make_watcher(etcd.endpoint, on_apply=on_apply)
    await w.start(timeout=WAIT)
    for n in (1, 2):
        rev = await put_json(etcd.endpoint, key("SALE"), {"max_calls": n})
        snap = await w.wait_for_revision(rev, WAIT)
        assert snap.values["SALE"] == Limits(max_calls=n)
    assert calls[-1] == rev
    assert w.connected


# --------------------------------------------------------------------------- start()


async def test_start_wait_times_out_with_clear_error(make_watcher: WatcherFactory) -> None:
    w = make_watcher(f"127.0.0.1:{free_port()}")
    with pytest.raises(ConfigWatchError, match="could not load"):
        await w.start(wait=True, timeout=0.5)
    assert not w.ready
    assert not w.connected


async def test_start_without_wait_loads_when_etcd_appears(
    tmp_path: Path, make_watcher: WatcherFactory
) -> None:
    port = free_port()
    w = make_watcher(f"127.0.0.1:{port}")
    await w.start(wait=False)
    assert (w.ready, w.applied_revision, dict(w.snapshot.values)) == (False, 0, {})

    proc = await asyncio.to_thread(start_etcd, tmp_path / "late-etcd", port)
    try:
        rev = await put_json(f"127.0.0.1:{port}", key("SALE"), {"max_calls": 3})
        snap = await w.wait_for_revision(rev, WAIT)
        assert w.ready
        assert snap.values["SALE"] == Limits(max_calls=3)
    finally:
        await w.stop()
        proc.kill()


async def test_second_endpoint_is_used(etcd: Etcd, make_watcher: WatcherFactory) -> None:
    rev = await put_json(etcd.endpoint, key("SALE"), {"max_calls": 4})
    endpoints = f"127.0.0.1:{free_port()},{etcd.endpoint}"
    assert await put_json(endpoints, key("X"), {"max_calls": 1}) > rev
    w = make_watcher(endpoints)
    await w.start(timeout=WAIT)
    assert w.snapshot.values["SALE"] == Limits(max_calls=4)


# --------------------------------------------------------------------------- resilience


async def test_etcd_killed_and_restarted(etcd: Etcd, make_watcher: WatcherFactory) -> None:
    await put_json(etcd.endpoint, key("SALE"), {"max_calls": 1})
    w = make_watcher(etcd.endpoint)
    await w.start(timeout=WAIT)
    await eventually(lambda: w.connected, "the watch")

    await etcd.kill()
    await eventually(lambda: not w.connected, "the watcher to notice etcd is gone")
    assert w.snapshot.values["SALE"] == Limits(max_calls=1)  # last config stays applied

    await etcd.restart()
    await eventually(lambda: w.connected, "the reconnect")
    rev = await put_json(etcd.endpoint, key("SALE"), {"max_calls": 2})
    snap = await w.wait_for_revision(rev, WAIT)
    assert snap.values["SALE"] == Limits(max_calls=2)


async def test_hung_etcd_is_detected_by_keepalive(
    etcd: Etcd, make_watcher: WatcherFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGSTOP: no TCP reset, the peer just stops answering; keepalive pings notice it.
    (Shorter timings than production; etcd refuses pings more often than every 5 s.)"""
    monkeypatch.setitem(config_watch._CHANNEL_OPTIONS, "grpc.keepalive_time_ms", 6_000)
    monkeypatch.setitem(config_watch._CHANNEL_OPTIONS, "grpc.http2.ping_timeout_ms", 1_000)
    monkeypatch.setitem(config_watch._CHANNEL_OPTIONS, "grpc.keepalive_timeout_ms", 1_000)
    w = make_watcher(etcd.endpoint)
    await w.start(timeout=WAIT)
    await eventually(lambda: w.connected, "the watch")

    etcd.proc.pause()
    try:
        await eventually(lambda: not w.connected, "the watcher to notice etcd hangs", 20)
    finally:
        etcd.proc.resume()
    await eventually(lambda: w.connected, "the reconnect")
    rev = await put_json(etcd.endpoint, key("SALE"), {"max_calls": 2})
    snap = await w.wait_for_revision(rev, WAIT)
    assert snap.values["SALE"] == Limits(max_calls=2)


async def test_changes_made_while_disconnected_are_relisted(
    etcd: Etcd, make_watcher: WatcherFactory
) -> None:
    for name in ("A", "B", "C"):
        await put_json(etcd.endpoint, key(name), {"max_calls": 1})
    # a long first backoff: the changes below land before the watcher reconnects
    w = make_watcher(etcd.endpoint, backoff_initial=4.0, backoff_max=4.0)
    await w.start(timeout=WAIT)
    await eventually(lambda: w.connected, "the watch")

    await etcd.kill()
    await eventually(lambda: not w.connected, "the watcher to notice etcd is gone")
    await etcd.restart()
    await put_json(etcd.endpoint, key("A"), {"max_calls": 2})
    await delete_key(etcd.endpoint, key("B"))
    await put_json(etcd.endpoint, key("C"), {"max_calls": 0})  # invalid: C keeps 1
    last = await put_json(etcd.endpoint, key("D"), {"max_calls": 4})
    assert not w.connected, "the watcher reconnected too early: the test proves nothing"

    snap = await w.wait_for_revision(last, WAIT)
    assert dict(snap.values) == {
        "A": Limits(max_calls=2),
        "C": Limits(max_calls=1),
        "D": Limits(max_calls=4),
    }
    assert set(w.rejected) == {"C"}
    assert await etcd.keys() == {"A", "C", "D"}

    # and it watches again
    rev = await put_json(etcd.endpoint, key("C"), {"max_calls": 3})
    snap = await w.wait_for_revision(rev, WAIT)
    assert snap.values["C"] == Limits(max_calls=3)
    assert dict(snap.values) == await etcd.contents()


async def test_compaction_while_away_converges(etcd: Etcd, make_watcher: WatcherFactory) -> None:
    await put_json(etcd.endpoint, key("A"), {"max_calls": 1})
    await put_json(etcd.endpoint, key("B"), {"max_calls": 1})
    w = make_watcher(etcd.endpoint, backoff_initial=2.0, backoff_max=2.0)
    await w.start(timeout=WAIT)
    await eventually(lambda: w.connected, "the watch")
    old_revision = w.applied_revision

    await etcd.kill()
    await eventually(lambda: not w.connected, "the watcher to notice etcd is gone")
    await etcd.restart()
    for n in range(2, 30):
        await put_json(etcd.endpoint, key("A"), {"max_calls": n})
    await delete_key(etcd.endpoint, key("B"))
    compacted = await etcd.compact_all()
    assert compacted > old_revision + 1

    snap = await w.wait_for_revision(compacted, WAIT)
    assert dict(snap.values) == await etcd.contents() == {"A": Limits(max_calls=29)}


async def test_compacted_watch_start_relists(
    etcd: Etcd, make_watcher: WatcherFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Changes and a compaction land between the range read and the watch creation: the
    watch from read revision + 1 fails as compacted, and the watcher lists again."""

    class RacyWatcher(ConfigWatcher[Limits]):
        raced = False

        async def _load(self, client: aetcd.Client) -> int:
            revision = await super()._load(client)
            if not self.raced:
                self.raced = True
                for n in range(2, 6):
                    await put_json(etcd.endpoint, key("A"), {"max_calls": n})
                await delete_key(etcd.endpoint, key("B"))
                await etcd.compact_all()
            return revision

    await put_json(etcd.endpoint, key("A"), {"max_calls": 1})
    await put_json(etcd.endpoint, key("B"), {"max_calls": 1})
    w = make_watcher(etcd.endpoint, cls=RacyWatcher)
    with caplog.at_level(logging.WARNING, logger="crm.config"):
        await w.start(timeout=WAIT)
        await eventually(lambda: w.snapshot.values == {"A": Limits(max_calls=5)}, "convergence")
    assert any("compacted" in r.getMessage() for r in caplog.records)
    await eventually(lambda: w.connected, "the watch")
    rev = await put_json(etcd.endpoint, key("B"), {"max_calls": 6})
    snap = await w.wait_for_revision(rev, WAIT)
    assert dict(snap.values) == await etcd.contents()


async def test_stop_closes(etcd: Etcd, make_watcher: WatcherFactory) -> None:
    w = make_watcher(etcd.endpoint)
    await w.start(timeout=WAIT)
    await eventually(lambda: w.connected, "the watch")
    await w.stop()
    assert not w.connected
    rev = await put_json(etcd.endpoint, key("SALE"), {"max_calls": 1})
    with pytest.raises(TimeoutError):
        await w.wait_for_revision(rev, timeout=0.3)
    await w.stop()  # idempotent


async def test_stop_returns_when_the_client_turns_cancellation_into_an_error(
    etcd: Etcd, make_watcher: WatcherFactory
) -> None:
    """grpc/aetcd may raise an ordinary error when a call is cancelled; the reconnect loop
    must not swallow stop()'s cancel (that hung a CI run in a fixture's teardown)."""

    class Wrapping(ConfigWatcher[Limits]):
        async def _watch(self, client: Any, start_revision: int, where: str) -> None:
            try:
                await super()._watch(client, start_revision, where)
            except asyncio.CancelledError:
                raise RuntimeError("call cancelled") from None

    w = make_watcher(etcd.endpoint, cls=Wrapping)
    await w.start(timeout=WAIT)
    await eventually(lambda: w.connected, "the watch")
    await asyncio.wait_for(w.stop(), timeout=STOP_TIMEOUT / 2)  # well under the safety net
    assert not w.connected
