"""Live configuration from etcd: a prefix is loaded, parsed, watched and swapped in atomically.

Ops write one JSON document per key under ``/crm/config/<service>/<key>``; a service runs a
:class:`ConfigWatcher` over its prefix and reads :attr:`ConfigWatcher.snapshot` whenever it
needs a value. The watcher:

- loads the whole prefix (one range read) and applies it, then watches the prefix from the
  read's header revision + 1;
- parses every changed key with ``parse(key, raw)``; an invalid value is rejected (the last
  good value of that key stays, the rejection is recorded and logged without the value);
- builds a new immutable :class:`ConfigSnapshot` per batch of events (all events of one etcd
  transaction arrive in one batch) and swaps it in with a single assignment;
- on a lost connection reconnects with capped exponential backoff (rotating over the
  endpoints) and re-lists the prefix, so changes and deletes made meanwhile are applied; a
  watch whose start revision was compacted re-lists too.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Generic, TypeVar

import aetcd
import pydantic

__all__ = [
    "ConfigSnapshot",
    "ConfigWatchError",
    "ConfigWatcher",
    "Rejection",
    "delete_key",
    "put_json",
]

log = logging.getLogger("crm.config")

T = TypeVar("T")

RPC_TIMEOUT = 5.0
"""Seconds a unary etcd call (range, put) or a watch creation may take."""

# Every connection attempt gets a fresh channel with its own subchannel pool: with gRPC's
# global pool a new channel would inherit the failed connection's reconnect backoff (up to
# 2 minutes) and fail fast instead of dialing.
# HTTP/2 keepalive detects a hung etcd (SIGSTOP, a dead network path), where no TCP reset
# comes: the watch fails ~15 s after the peer stops answering. Pings go on while the watch
# is idle (max_pings_without_data 0); grpcio 1.85 times pings out by ping_timeout_ms, not
# keepalive_timeout_ms; a BDP probe ping in flight would hold keepalive pings back. etcd
# refuses pings more often than every 5 s (too_many_pings).
_CHANNEL_OPTIONS = {
    "grpc.use_local_subchannel_pool": 1,
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.http2.ping_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 0,
    "grpc.http2.max_pings_without_data": 0,
    "grpc.http2.bdp_probe": 0,
}
_MAX_REASON = 500


class ConfigWatchError(RuntimeError):
    """The configuration could not be loaded from etcd (start() timed out)."""


@dataclass(frozen=True, slots=True)
class Rejection:
    """An invalid value that was not applied (the key keeps its last good value)."""

    key: str
    revision: int
    reason: str


def _frozen(d: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(d))


@dataclass(frozen=True, slots=True)
class ConfigSnapshot(Generic[T]):
    """The applied configuration at one etcd revision (immutable; replaced, never changed).

    ``values`` and ``mod_revisions`` are keyed by the key relative to the watcher's prefix;
    ``revision`` is the etcd revision the snapshot reflects (0 before the first load).
    """

    values: Mapping[str, T] = field(default_factory=lambda: MappingProxyType({}))
    revision: int = 0
    mod_revisions: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    def get(self, key: str, default: T | None = None) -> T | None:
        """The value of ``key``, or ``default`` when the key is absent."""
        return self.values.get(key, default)


def _parse_endpoints(endpoints: str) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for item in endpoints.split(","):
        item = item.strip().removeprefix("http://")
        if not item:
            continue
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"bad etcd endpoint {item!r}: expected host:port")
        out.append((host, int(port)))
    if not out:
        raise ValueError("no etcd endpoint given")
    return out


def _client(host: str, port: int) -> aetcd.Client:
    return aetcd.Client(host=host, port=port, timeout=RPC_TIMEOUT, options=_CHANNEL_OPTIONS)


async def _close(client: aetcd.Client) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.close(), RPC_TIMEOUT)


def _reason(exc: Exception) -> str:
    """Why a value was rejected, without echoing the value (pydantic puts it in str(exc))."""
    if isinstance(exc, pydantic.ValidationError):
        parts = [
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in exc.errors(include_url=False, include_input=False, include_context=False)
        ]
        text = f"{exc.error_count()} validation error(s): " + "; ".join(parts)
    else:
        text = f"{type(exc).__name__}: {exc}"
    return text[:_MAX_REASON]


class ConfigWatcher(Generic[T]):
    """Keeps a parsed, validated snapshot of an etcd prefix up to date (see module doc).

    ``parse(key, raw)`` gets the key relative to ``prefix`` and the raw bytes, and returns the
    value or raises (ValueError / pydantic.ValidationError) to reject it. ``on_apply`` (sync
    or async) is called with the new snapshot after every change of the values.
    """

    def __init__(
        self,
        endpoints: str,
        prefix: str,
        parse: Callable[[str, bytes], T],
        *,
        on_apply: Callable[[ConfigSnapshot[T]], Awaitable[None] | None] | None = None,
        name: str = "config",
        backoff_max: float = 5.0,
        backoff_initial: float = 0.2,
    ) -> None:
        self._endpoints = _parse_endpoints(endpoints)
        self._prefix = prefix if prefix.endswith("/") else prefix + "/"
        self._prefix_b = self._prefix.encode()
        self._parse = parse
        self._on_apply = on_apply
        self._name = name
        self._backoff_initial = backoff_initial
        self._backoff_max = max(backoff_max, backoff_initial)
        self._snapshot: ConfigSnapshot[T] = ConfigSnapshot()
        self._rejected: Mapping[str, Rejection] = MappingProxyType({})
        self._ready = False
        self._connected = False
        self._settled_revision = 0  # applied and on_apply done: what wait_for_revision sees
        self._changed = asyncio.Condition()
        self._loaded = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_error: Exception | None = None

    # ----------------------------------------------------------------- public state

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def snapshot(self) -> ConfigSnapshot[T]:
        """The applied configuration (empty until the first load)."""
        return self._snapshot

    @property
    def ready(self) -> bool:
        """True once the prefix has been loaded at least once."""
        return self._ready

    @property
    def applied_revision(self) -> int:
        return self._snapshot.revision

    @property
    def rejected(self) -> Mapping[str, Rejection]:
        """Keys whose current etcd value is invalid (their last good value stays applied)."""
        return self._rejected

    @property
    def connected(self) -> bool:
        """True while the watch on etcd is established."""
        return self._connected

    # ----------------------------------------------------------------- lifecycle

    async def start(self, wait: bool = True, timeout: float | None = None) -> None:
        """Start loading and watching in the background.

        With ``wait`` return once the prefix is loaded; raise :class:`ConfigWatchError` (and
        stop) if that does not happen within ``timeout`` seconds (None: wait for ever).
        Without ``wait`` return at once; :attr:`ready` tells when the first load is done.
        """
        if self._task is not None:
            raise RuntimeError(f"config watcher {self._name!r} already started")
        self._task = asyncio.create_task(self._run(), name=f"config-watch:{self._name}")
        if not wait:
            return
        loaded = asyncio.create_task(self._loaded.wait())
        done, _ = await asyncio.wait(
            {loaded, self._task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if loaded in done:
            return
        loaded.cancel()
        await self.stop()
        where = ",".join(f"{h}:{p}" for h, p in self._endpoints)
        raise ConfigWatchError(
            f"{self._name}: could not load {self._prefix!r} from etcd at {where} "
            f"within {timeout}s (last error: {self._last_error!r})"
        )

    async def stop(self) -> None:
        """Stop watching (the client is closed by the background task on its way out)."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task})
        self._connected = False

    async def wait_for_revision(self, rev: int, timeout: float) -> ConfigSnapshot[T]:
        """Wait until etcd revision ``rev`` has been applied, on_apply included; raise
        TimeoutError after ``timeout`` seconds. ``rev`` must come from a change under the
        prefix (or be reached by a re-list): other keys' revisions are never seen."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: self._settled_revision >= rev)
        return self._snapshot

    # ----------------------------------------------------------------- background task

    async def _run(self) -> None:
        delay = self._backoff_initial
        attempt = 0
        while True:
            host, port = self._endpoints[attempt % len(self._endpoints)]
            attempt += 1
            client = _client(host, port)
            try:
                while True:  # one connection: list, watch; a compacted watch lists again
                    revision = await self._load(client)
                    delay = self._backoff_initial
                    try:
                        await self._watch(client, revision + 1, f"{host}:{port}")
                    except aetcd.RevisionCompactedError as exc:
                        log.warning(
                            "%s: watch from revision %d failed: %s; re-listing %s",
                            self._name, revision + 1, exc, self._prefix,
                        )  # fmt: skip
            except Exception as exc:  # any etcd/grpc failure: back off and reconnect
                self._last_error = exc
                log.warning(
                    "%s: etcd at %s:%d %s (%s: %s); retrying in %.1fs",
                    self._name, host, port,
                    "connection lost" if self._connected else "unreachable",
                    type(exc).__name__, exc, delay,
                )  # fmt: skip
            finally:
                self._connected = False
                await _close(client)
            await asyncio.sleep(delay * random.uniform(0.8, 1.0))
            delay = min(delay * 2, self._backoff_max)

    async def _load(self, client: aetcd.Client) -> int:
        """Range the whole prefix and apply it as the new state; returns the header revision."""
        result = await client.get_prefix(self._prefix_b)
        revision = int(result.header.revision)
        old = self._snapshot
        values: dict[str, T] = {}
        mods: dict[str, int] = {}
        rejected: dict[str, Rejection] = {}
        for kv in result:
            key, mod_revision = self._key(kv.key), int(kv.mod_revision)
            value = self._parse_kv(key, kv.value, mod_revision)
            if not isinstance(value, Rejection):
                values[key], mods[key] = value, mod_revision
                continue
            rejected[key] = value
            if key in old.values:  # keep the last good value
                values[key], mods[key] = old.values[key], old.mod_revisions[key]
        if revision < old.revision:
            log.warning("%s: etcd revision went back from %d to %d (etcd data replaced?)",
                        self._name, old.revision, revision)  # fmt: skip
        changed = not self._ready or revision < old.revision or mods != dict(old.mod_revisions)
        self._rejected = MappingProxyType(rejected)
        await self._publish(ConfigSnapshot(_frozen(values), revision, _frozen(mods)), changed)
        log.info(
            "%s: loaded %s at revision %d: %d key(s), %d rejected",
            self._name, self._prefix, revision, len(values), len(rejected),
        )  # fmt: skip
        if not self._ready:
            self._ready = True
            self._loaded.set()
        return revision

    async def _watch(self, client: aetcd.Client, start_revision: int, where: str) -> None:
        """Apply watch events until the stream fails (always ends by raising)."""
        watch = await client.watch_prefix(self._prefix_b, start_revision=start_revision)
        self._connected = True
        log.info("%s: watching %s on %s from revision %d", self._name, self._prefix, where,
                 start_revision)  # fmt: skip
        inbox: asyncio.Queue[aetcd.Event | Exception] = asyncio.Queue()

        async def pump() -> None:  # moves whole watch responses into inbox without yielding
            try:
                async for event in watch:
                    inbox.put_nowait(event)
                inbox.put_nowait(ConnectionError("watch stream ended"))
            except Exception as exc:
                inbox.put_nowait(exc)

        pump_task = asyncio.create_task(pump())
        try:
            while True:
                batch = [await inbox.get()]
                while not inbox.empty():
                    batch.append(inbox.get_nowait())
                events = [e for e in batch if isinstance(e, aetcd.Event)]
                if events:
                    await self._apply_events(events)
                for item in batch:
                    if isinstance(item, Exception):
                        raise item
        finally:
            pump_task.cancel()
            await asyncio.wait({pump_task})

    async def _apply_events(self, events: Iterable[aetcd.Event]) -> None:
        old = self._snapshot
        values, mods, rejected = dict(old.values), dict(old.mod_revisions), dict(self._rejected)
        revision = old.revision
        changed = False
        for event in events:
            key, mod_revision = self._key(event.kv.key), int(event.kv.mod_revision)
            revision = max(revision, mod_revision)
            if event.kind == aetcd.EventKind.DELETE:
                changed |= key in values
                values.pop(key, None)
                mods.pop(key, None)
                rejected.pop(key, None)
                continue
            value = self._parse_kv(key, event.kv.value, mod_revision)
            if isinstance(value, Rejection):
                rejected[key] = value
            else:
                values[key], mods[key] = value, mod_revision
                rejected.pop(key, None)
                changed = True
        self._rejected = MappingProxyType(rejected)
        await self._publish(ConfigSnapshot(_frozen(values), revision, _frozen(mods)), changed)

    async def _publish(self, snapshot: ConfigSnapshot[T], changed: bool) -> None:
        self._snapshot = snapshot  # the atomic swap
        if changed and self._on_apply is not None:
            try:
                result = self._on_apply(snapshot)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("%s: on_apply failed at revision %d", self._name, snapshot.revision)
        async with self._changed:
            self._settled_revision = snapshot.revision
            self._changed.notify_all()

    # ----------------------------------------------------------------- helpers

    def _key(self, raw_key: bytes) -> str:
        return raw_key[len(self._prefix_b) :].decode("utf-8", "replace")

    def _parse_kv(self, key: str, raw: bytes, revision: int) -> T | Rejection:
        try:
            return self._parse(key, raw)
        except Exception as exc:  # a bad value (or a buggy parser) must not stop the watcher
            rejection = Rejection(key, revision, _reason(exc))
        old = self._rejected.get(key)
        if old is None or old.revision != revision:  # log each bad value once
            log.error(
                "%s: rejected %s%s at revision %d, not applied: %s",
                self._name, self._prefix, key, revision, rejection.reason,
            )  # fmt: skip
        return rejection


# --------------------------------------------------------------------------- tools


async def _on_any(endpoints: str, op: Callable[[aetcd.Client], Awaitable[int]]) -> int:
    last: Exception | None = None
    for host, port in _parse_endpoints(endpoints):
        client = _client(host, port)
        try:
            return await op(client)
        except (aetcd.ConnectionFailedError, aetcd.ConnectionTimeoutError) as exc:
            last = exc
        finally:
            await _close(client)
    raise ConfigWatchError(f"no etcd endpoint of {endpoints!r} answered: {last}")


async def put_json(endpoints: str, key: str, value: object) -> int:
    """Put ``value`` as JSON (a pydantic model via model_dump_json) at ``key``; returns the
    etcd revision of the put."""
    if isinstance(value, pydantic.BaseModel):
        data = value.model_dump_json().encode()
    else:
        data = json.dumps(value).encode()

    async def op(client: aetcd.Client) -> int:
        return int((await client.put(key.encode(), data)).header.revision)

    return await _on_any(endpoints, op)


async def delete_key(endpoints: str, key: str) -> int:
    """Delete ``key``; returns the etcd revision after the delete (the current one when the
    key did not exist)."""
    raw = key.encode()

    async def op(client: aetcd.Client) -> int:
        return int((await client.delete_range(raw, raw + b"\0")).header.revision)

    return await _on_any(endpoints, op)
