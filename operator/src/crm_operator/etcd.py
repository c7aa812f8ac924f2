"""The operator's side of the etcd key layout (see crm_common.config_watch for the layout).

:class:`ConfigStore` writes declared values (stable key, rollout envelope, history) with
compare-and-swap transactions and reads acknowledgements; :class:`DriftGuard` watches the
whole config prefix and puts a declared value back the moment someone changes it by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aetcd
from crm_common.config_watch import (
    Ack,
    acks_prefix,
    config_key,
    history_prefix,
    rollout_key,
)
from crm_common.settings import parse_endpoints

__all__ = [
    "Applied",
    "ConfigStore",
    "Declared",
    "DriftGuard",
    "HistoryEntry",
    "RevisionConflict",
    "envelope",
]

log = logging.getLogger("crm.operator.etcd")

RPC_TIMEOUT = 5.0


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def envelope(percent: int, value: bytes) -> bytes:
    """The rollout key's value: ``{"percent": P, "value": <the candidate>}``."""
    return json.dumps(
        {"percent": percent, "value": json.loads(value)}, sort_keys=True, separators=(",", ":")
    ).encode()


@dataclass(frozen=True, slots=True)
class Applied:
    """The etcd state after :meth:`ConfigStore.apply`."""

    revision: int
    """mod_revision of the stable key (0: absent)."""
    rollout_revision: int
    """mod_revision of the rollout key (0: no rollout)."""
    wrote: bool
    """Whether anything was written (False: etcd already held the declared state)."""


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    revision: int
    generation: int | None
    """The CRMConfig generation that wrote it (None: written by crmctl / ConfigAdmin)."""
    time: str
    data: dict[str, Any]
    author: str | None = None
    """Who wrote it through crmctl / ConfigAdmin (None: the operator)."""


class RevisionConflict(Exception):
    """The stable key's mod_revision is not the one the writer expected (optimistic
    concurrency of :meth:`ConfigStore.apply` with ``expect_revision``)."""

    def __init__(self, key: str, expected: int, actual: int) -> None:
        super().__init__(f"{key} is at revision {actual}, not the expected {expected}")
        self.key = key
        self.expected = expected
        self.actual = actual


@dataclass(frozen=True, slots=True)
class Declared:
    """What a key must hold (None: must be absent) as of etcd revision ``since``."""

    value: bytes | None
    since: int
    owner: str
    """The uid of the CRMConfig that declares it."""


async def _close(client: aetcd.Client | None) -> None:
    if client is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), RPC_TIMEOUT)


class ConfigStore:
    """Writes and reads the operator's keys; one client, re-created on failure."""

    def __init__(self, endpoints: str, config_prefix: str, history_limit: int = 10) -> None:
        self._endpoints = parse_endpoints(endpoints)
        self.config_prefix = config_prefix.rstrip("/")
        self.history_limit = history_limit
        self._client: aetcd.Client | None = None
        self._attempt = 0
        self._lock = asyncio.Lock()

    async def close(self) -> None:
        client, self._client = self._client, None
        await _close(client)

    async def _call(self, op: Callable[[aetcd.Client], Awaitable[Any]]) -> Any:
        """Run ``op`` on the shared client; on a connection failure retry once on the next
        endpoint.

        Callers share one client, and a failing call closes it, which cancels every other
        call still on its channel: such a call sees a CancelledError its task was never
        asked for. That is a connection failure too (retried, then raised as
        ConnectionFailedError), never a cancellation to pass on: a gRPC handler that
        raises CancelledError sends no status, and its caller waits out its deadline."""
        for attempt in range(2):
            if self._client is None:
                host, port = self._endpoints[self._attempt % len(self._endpoints)]
                self._client = aetcd.Client(host=host, port=port, timeout=RPC_TIMEOUT)
            client = self._client
            try:
                async with asyncio.timeout(RPC_TIMEOUT * 2):
                    return await op(client)
            except (aetcd.ConnectionFailedError, aetcd.ConnectionTimeoutError, TimeoutError) as exc:
                failure: Exception = exc
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise  # a real cancellation of this caller
                failure = aetcd.ConnectionFailedError("the etcd channel was closed under this call")
            if self._client is client:  # another caller may have replaced it already
                self._attempt += 1
                self._client = None
                await _close(client)
            if attempt == 1:
                raise failure
        raise AssertionError("unreachable")

    async def get(self, key: str) -> tuple[bytes, int] | None:
        """(value, mod_revision) of ``key``, or None."""

        async def op(c: aetcd.Client) -> tuple[bytes, int] | None:
            kv = await c.get(key.encode())
            return None if kv is None else (bytes(kv.value), int(kv.mod_revision))

        result: tuple[bytes, int] | None = await self._call(op)
        return result

    async def list_prefix(self, prefix: str) -> list[tuple[str, bytes, int]]:
        """(key, value, mod_revision) of every key under ``prefix``, sorted by key."""

        async def op(c: aetcd.Client) -> list[tuple[str, bytes, int]]:
            return sorted(
                (bytes(kv.key).decode(), bytes(kv.value), int(kv.mod_revision))
                for kv in await c.get_prefix(prefix.encode())
            )

        result: list[tuple[str, bytes, int]] = await self._call(op)
        return result

    async def _put_if(
        self, key: str, value: bytes, expect_mod: int, guard_key: str | None = None
    ) -> int | None:
        """Put when the mod_revision of ``guard_key`` (default: ``key``) is still
        ``expect_mod`` (0: absent); returns the revision written, or None when someone
        changed it meanwhile."""
        guard = (guard_key or key).encode()

        async def op(c: aetcd.Client) -> int | None:
            ok, responses = await c.transaction(
                compare=[c.transactions.mod(guard) == expect_mod],
                success=[c.transactions.put(key.encode(), value)],
                failure=[],
            )
            return int(responses[0].response_put.header.revision) if ok else None

        result: int | None = await self._call(op)
        return result

    async def _delete(self, key: str) -> int:
        async def op(c: aetcd.Client) -> int:
            raw = key.encode()
            return int((await c.delete_range(raw, raw + b"\0")).header.revision)

        result: int = await self._call(op)
        return result

    async def _ensure(self, key: str, value: bytes) -> tuple[int, bool]:
        """Make ``key`` hold ``value``: (its mod_revision, whether it was written)."""
        for _ in range(5):
            current = await self.get(key)
            if current is not None and current[0] == value:
                return current[1], False
            written = await self._put_if(key, value, current[1] if current else 0)
            if written is not None:
                return written, True
        raise RuntimeError(f"{key} keeps changing under the operator")

    async def apply(
        self,
        service: str,
        key: str,
        value: bytes,
        rollout_percent: int | None,
        generation: int | None,
        *,
        author: str | None = None,
        expect_revision: int | None = None,
    ) -> Applied:
        """Make etcd hold the declared state (idempotent).

        No rollout (None or 100): the stable key holds ``value`` and the rollout key is
        gone; every new stable value is recorded in the history (with ``author``). A
        rollout below 100 %: the rollout key holds the envelope, the stable key is left as
        it is. With ``expect_revision`` (0: absent) the write only happens while the stable
        key is still at that mod_revision, else :class:`RevisionConflict` is raised.
        """
        stable_k = config_key(self.config_prefix, service, key)
        rollout_k = rollout_key(self.config_prefix, service, key)
        async with self._lock:
            if rollout_percent is None or rollout_percent >= 100:
                if expect_revision is None:
                    revision, wrote = await self._ensure(stable_k, value)
                else:
                    revision, wrote = await self._ensure_at(stable_k, stable_k, value,
                                                            expect_revision)  # fmt: skip
                # a promotion to a value the stable key already holds keeps the version's
                # history entry (its author and time); one is written only when missing
                record = wrote
                if await self.get(rollout_k) is not None:
                    await self._delete(rollout_k)
                    hist = history_prefix(self.config_prefix, service, key)
                    record = wrote or await self.get(f"{hist}{revision:012d}") is None
                    wrote = True
                if record:
                    await self._record(service, key, revision, value, generation, author)
                return Applied(revision, 0, wrote)
            body = envelope(rollout_percent, value)
            if expect_revision is None:
                rollout_revision, wrote = await self._ensure(rollout_k, body)
            else:
                rollout_revision, wrote = await self._ensure_at(rollout_k, stable_k, body,
                                                                expect_revision)  # fmt: skip
            stable = await self.get(stable_k)
            return Applied(stable[1] if stable else 0, rollout_revision, wrote)

    async def _ensure_at(self, key: str, guard_key: str, value: bytes, expect: int) -> tuple[
        int, bool
    ]:  # fmt: skip
        """Make ``key`` hold ``value`` provided ``guard_key`` is at mod_revision ``expect``
        (checked in the same transaction as the write): (revision, whether written)."""
        guard = await self.get(guard_key)
        actual = guard[1] if guard else 0
        if actual != expect:
            raise RevisionConflict(guard_key, expect, actual)
        current = await self.get(key)
        if current is not None and current[0] == value:
            return current[1], False
        written = await self._put_if(key, value, expect, guard_key=guard_key)
        if written is None:
            guard = await self.get(guard_key)
            raise RevisionConflict(guard_key, expect, guard[1] if guard else 0)
        return written, True

    async def remove(self, service: str, key: str) -> int:
        """Delete the stable key, the rollout key and the history of one config key."""
        async with self._lock:
            await self._delete(rollout_key(self.config_prefix, service, key))
            hist = history_prefix(self.config_prefix, service, key).encode()

            async def op(c: aetcd.Client) -> None:
                await c.delete_prefix(hist)

            await self._call(op)
            return await self._delete(config_key(self.config_prefix, service, key))

    async def _record(
        self, service: str, key: str, revision: int, value: bytes, generation: int | None,
        author: str | None = None,
    ) -> None:  # fmt: skip
        prefix = history_prefix(self.config_prefix, service, key)
        doc: dict[str, Any] = {"generation": generation, "time": _now(), "data": json.loads(value)}
        if author is not None:
            doc["author"] = author
        body = json.dumps(doc, sort_keys=True).encode()

        async def op(c: aetcd.Client) -> None:
            await c.put(f"{prefix}{revision:012d}".encode(), body)
            keys = sorted(kv.key for kv in await c.get_prefix(prefix.encode(), keys_only=True))
            for old in keys[: max(0, len(keys) - self.history_limit)]:
                await c.delete(old)

        await self._call(op)

    async def history(self, service: str, key: str) -> list[HistoryEntry]:
        """The kept past stable values, newest first."""
        prefix = history_prefix(self.config_prefix, service, key).encode()

        async def op(c: aetcd.Client) -> list[HistoryEntry]:
            out = []
            for kv in await c.get_prefix(prefix):
                doc = json.loads(kv.value)
                rev = int(kv.key[len(prefix) :].decode())
                out.append(HistoryEntry(rev, doc.get("generation"), doc["time"], doc["data"],
                                        doc.get("author")))  # fmt: skip
            return sorted(out, key=lambda e: -e.revision)

        result: list[HistoryEntry] = await self._call(op)
        return result

    async def acks(self, service: str) -> list[Ack]:
        """The acknowledgements of the live instances of ``service`` (bad ones skipped)."""
        prefix = acks_prefix(self.config_prefix, service).encode()

        async def op(c: aetcd.Client) -> list[Any]:
            return [bytes(kv.value) for kv in await c.get_prefix(prefix)]

        out: list[Ack] = []
        for raw in await self._call(op):
            try:
                out.append(Ack.from_json(raw))
            except (ValueError, KeyError, TypeError):
                log.warning("skipping a malformed ack under %s", prefix.decode())
        return sorted(out, key=lambda a: a.instance)

    async def repair(self, key: str, declared: Declared) -> int:
        """Put the declared value of ``key`` back (or delete it); returns the revision."""
        async with self._lock:
            if declared.value is None:
                return await self._delete(key)
            revision, _ = await self._ensure(key, declared.value)
            return revision


DriftFn = Callable[[str, Declared, bytes | None, int], Awaitable[None]]
"""on_drift(key, declared, found value or None, the revision of the repair)"""


class DriftGuard:
    """Watches ``<config_prefix>/`` and puts declared values back when they drift.

    The reconcile handlers :meth:`declare` what each key must hold, as of the revision they
    wrote it at (older watch events are old news, not drift). A change by anyone else is
    repaired at once and reported through ``on_drift``. After a lost watch the guard
    re-lists everything (drift made meanwhile is repaired too).
    """

    def __init__(self, store: ConfigStore, endpoints: str, on_drift: DriftFn) -> None:
        self._store = store
        self._endpoints = parse_endpoints(endpoints)
        self._on_drift = on_drift
        self._declared: dict[str, Declared] = {}
        self._task: asyncio.Task[None] | None = None
        self.repairs = 0
        self.watching = False

    def declare(self, key: str, declared: Declared) -> None:
        self._declared[key] = declared

    def declared(self, key: str) -> Declared | None:
        return self._declared.get(key)

    def forget(self, key: str, owner: str) -> None:
        if (d := self._declared.get(key)) is not None and d.owner == owner:
            del self._declared[key]

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="drift-guard")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})

    async def check(self, key: str, found: bytes | None, revision: int) -> None:
        declared = self._declared.get(key)
        if declared is None or revision <= declared.since or found == declared.value:
            return
        try:
            repaired = await self._store.repair(key, declared)
        except Exception:
            log.exception("drift on %s: repair failed (retried by the next resync)", key)
            return
        self.repairs += 1
        log.warning("drift on %s at revision %d repaired at revision %d", key, revision, repaired)
        self._declared[key] = Declared(declared.value, repaired, declared.owner)
        try:
            await self._on_drift(key, declared, found, repaired)
        except Exception:
            log.exception("drift on %s: reporting failed", key)

    async def resync(self) -> None:
        """Compare every declared key with etcd (after a lost watch, and periodically)."""
        for key in list(self._declared):
            current = await self._store.get(key)
            declared = self._declared.get(key)
            if declared is None:
                continue
            found = None if current is None else current[0]
            if found != declared.value:
                # the revision test must pass: use one newer than the declaration
                await self.check(key, found, declared.since + 1 if current is None
                                 else max(current[1], declared.since + 1))  # fmt: skip

    async def _run(self) -> None:
        prefix = (self._store.config_prefix + "/").encode()
        delay, attempt = 0.2, 0
        while True:
            host, port = self._endpoints[attempt % len(self._endpoints)]
            attempt += 1
            client = aetcd.Client(host=host, port=port, timeout=RPC_TIMEOUT)
            try:
                header = (await client.get_prefix(prefix, keys_only=True)).header
                start = int(header.revision) + 1
                await self.resync()
                watch = await client.watch_prefix(prefix, start_revision=start)
                self.watching = True
                delay = 0.2
                async for event in watch:
                    key = event.kv.key.decode()
                    if key not in self._declared:
                        continue
                    found = None if event.kind == aetcd.EventKind.DELETE else bytes(event.kv.value)
                    await self.check(key, found, int(event.kv.mod_revision))
                raise ConnectionError("watch ended")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "drift guard: etcd %s:%d: %s; retrying in %.1fs", host, port, exc, delay
                )
            finally:
                self.watching = False
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.close(), RPC_TIMEOUT)
            await asyncio.sleep(delay * random.uniform(0.8, 1.0))
            delay = min(delay * 2, 5.0)
