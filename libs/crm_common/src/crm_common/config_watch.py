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

Key layout (``<config_prefix>`` defaults to ``/crm/config``; the CRMConfig operator writes
it, services only read, except their own acknowledgement)::

    <config_prefix>/<service>/<key>              the stable value: plain JSON, as always
    <config_prefix>/<service>/_rollout/<key>     a candidate being rolled out (envelope)
    <config_prefix>/_acks/<service>/<instance>   what one live instance applied (leased)
    <config_prefix>/_history/<service>/<key>/<revision>   past values (operator only)

Keys whose name relative to the watched prefix starts with ``_`` are reserved: they are
never passed to ``parse``. ``_rollout/<key>`` holds ``{"percent": P, "value": {...}}``:
an instance whose :func:`rollout_bucket` (a stable hash of its instance name, 0..99) is
below ``P`` applies ``value`` as ``<key>``, every other instance keeps the stable value.
Deleting the rollout key (promotion or abort) moves everyone back to the stable key. A
watcher without an instance name never joins a rollout.

With ``ack=<instance name>`` the watcher also writes, after every applied snapshot (and
``on_apply``), ``<config_prefix>/_acks/<service>/<instance>`` =
``{"instance", "revision", "keys": {key: mod_revision}, "rejected": {key: revision},
"time"}`` under a lease kept alive while the watcher runs, so the key of a dead instance
vanishes after ``ack_ttl`` seconds (a stopped watcher revokes it at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
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
    "ACKS_DIR",
    "HISTORY_DIR",
    "RESERVED_MARK",
    "ROLLOUT_DIR",
    "Ack",
    "ConfigSnapshot",
    "ConfigWatchError",
    "ConfigWatcher",
    "Rejection",
    "ack_key",
    "acks_prefix",
    "config_key",
    "delete_key",
    "delete_prefix",
    "history_prefix",
    "put_json",
    "rollout_bucket",
    "rollout_key",
    "split_prefix",
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

RESERVED_MARK = "_"
"""Relative keys starting with this are reserved (rollouts, acks, history), never config."""
ROLLOUT_DIR = "_rollout/"
ACKS_DIR = "_acks/"
HISTORY_DIR = "_history/"


def config_key(config_prefix: str, service: str, key: str) -> str:
    """``<config_prefix>/<service>/<key>``: the stable value of one config key."""
    return f"{config_prefix.rstrip('/')}/{service}/{key}"


def rollout_key(config_prefix: str, service: str, key: str) -> str:
    """``<config_prefix>/<service>/_rollout/<key>``: the candidate being rolled out."""
    return f"{config_prefix.rstrip('/')}/{service}/{ROLLOUT_DIR}{key}"


def acks_prefix(config_prefix: str, service: str) -> str:
    """``<config_prefix>/_acks/<service>/``: one leased key per live instance."""
    return f"{config_prefix.rstrip('/')}/{ACKS_DIR}{service}/"


def ack_key(config_prefix: str, service: str, instance: str) -> str:
    return acks_prefix(config_prefix, service) + instance


def history_prefix(config_prefix: str, service: str, key: str) -> str:
    """``<config_prefix>/_history/<service>/<key>/``: past values by revision."""
    return f"{config_prefix.rstrip('/')}/{HISTORY_DIR}{service}/{key}/"


def split_prefix(prefix: str) -> tuple[str, str]:
    """A watcher prefix ``<config_prefix>/<service>/`` -> ``(config_prefix, service)``."""
    parent, _, service = prefix.rstrip("/").rpartition("/")
    return parent, service


def rollout_bucket(instance: str) -> int:
    """The stable bucket (0..99) of an instance name: it takes part in a rollout of ``P``
    percent when its bucket is below ``P``. Same name, same bucket, on every machine."""
    digest = hashlib.sha256(instance.encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100


class ConfigWatchError(RuntimeError):
    """The configuration could not be loaded from etcd (start() timed out)."""


@dataclass(frozen=True, slots=True)
class Rejection:
    """An invalid value that was not applied (the key keeps its last good value)."""

    key: str
    revision: int
    reason: str


@dataclass(frozen=True, slots=True)
class Ack:
    """What one instance applied (the JSON document of its ack key)."""

    instance: str
    revision: int
    keys: Mapping[str, int]
    rejected: Mapping[str, int]
    time: str

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "instance": self.instance,
                "revision": self.revision,
                "keys": dict(self.keys),
                "rejected": dict(self.rejected),
                "time": self.time,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Ack:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError("an ack must be a JSON object")
        return cls(
            instance=str(doc["instance"]),
            revision=int(doc["revision"]),
            keys={str(k): int(v) for k, v in dict(doc.get("keys") or {}).items()},
            rejected={str(k): int(v) for k, v in dict(doc.get("rejected") or {}).items()},
            time=str(doc.get("time", "")),
        )


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


STOP_TIMEOUT = 10.0
"""How long ``stop()`` waits for a cancelled background task."""


def _client(host: str, port: int) -> aetcd.Client:
    return aetcd.Client(host=host, port=port, timeout=RPC_TIMEOUT, options=_CHANNEL_OPTIONS)


async def _close(client: aetcd.Client) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.close(), RPC_TIMEOUT)


def _reraise_if_cancelled(exc: Exception) -> None:
    """Re-raise as CancelledError when our task is being cancelled: client libraries (grpc,
    aetcd) may turn a cancellation into an ordinary error, and a reconnect loop catching
    ``Exception`` would otherwise swallow ``stop()``'s cancel and run forever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from exc


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

    ``ack`` is this instance's name: it decides rollouts (see :func:`rollout_bucket`) and
    names the leased acknowledgement key written after every applied snapshot (module doc).
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
        ack: str | None = None,
        ack_ttl: int = 10,
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
        # raw state under the prefix: stable values and rollout envelopes, by relative key
        self._stable: dict[str, tuple[bytes, int]] = {}
        self._rollouts: dict[str, tuple[bytes, int]] = {}
        self._instance = ack
        self._ack_ttl = max(2, ack_ttl)
        config_prefix, service = split_prefix(self._prefix)
        self._ack_key = ack_key(config_prefix, service, ack).encode() if ack else None
        self._ack_dirty = asyncio.Event()
        self._ack_task: asyncio.Task[None] | None = None
        self._ack_written = 0  # the snapshot revision of the last ack written

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
    def instance(self) -> str | None:
        """This instance's name (``ack``), or None."""
        return self._instance

    @property
    def acked_revision(self) -> int:
        """The snapshot revision of the last acknowledgement written (0: none yet)."""
        return self._ack_written

    def in_rollout(self, percent: int) -> bool:
        """Whether this instance takes part in a rollout to ``percent`` % of instances."""
        return self._instance is not None and rollout_bucket(self._instance) < percent

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
        if self._ack_key is not None:
            self._ack_task = asyncio.create_task(self._ack_loop(), name=f"config-ack:{self._name}")
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
        """Stop watching (the client is closed by the background task on its way out) and
        revoke the acknowledgement's lease, so the ack key disappears at once."""
        for task in (self._task, self._ack_task):
            if task is not None and not task.done():
                task.cancel()
                _, pending = await asyncio.wait({task}, timeout=STOP_TIMEOUT)
                if pending:  # never let a stuck client hang a service's shutdown
                    log.warning("%s: background task did not stop within %.0fs; leaving it",
                                self._name, STOP_TIMEOUT)  # fmt: skip
        self._task = self._ack_task = None
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
                _reraise_if_cancelled(exc)
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
        self._stable, self._rollouts = {}, {}
        for kv in result:
            self._remember(self._key(kv.key), kv.value, int(kv.mod_revision))
        values, mods = dict(old.values), dict(old.mod_revisions)
        rejected: dict[str, Rejection] = {}
        for key in set(values) | set(self._stable) | set(self._rollouts):
            self._resolve(key, values, mods, rejected, relist=True)
        for key in self._rollouts:
            self._rollout_problem(key, rejected)
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
        touched: set[str] = set()
        for event in events:
            key, mod_revision = self._key(event.kv.key), int(event.kv.mod_revision)
            revision = max(revision, mod_revision)
            if event.kind == aetcd.EventKind.DELETE:
                touched.add(self._forget(key))
            else:
                touched.add(self._remember(key, event.kv.value, mod_revision))
        changed = False
        for key in sorted(touched - {""}):
            changed |= self._resolve(key, values, mods, rejected, relist=False)
            if key in self._rollouts:
                self._rollout_problem(key, rejected)
            else:
                rejected.pop(ROLLOUT_DIR + key, None)
        self._rejected = MappingProxyType(rejected)
        await self._publish(ConfigSnapshot(_frozen(values), revision, _frozen(mods)), changed)

    # ----------------------------------------------------------------- rollouts

    def _remember(self, key: str, raw: bytes, mod_revision: int) -> str:
        """Record a put; returns the config key it affects ('' for other reserved keys)."""
        if key.startswith(ROLLOUT_DIR):
            target = key[len(ROLLOUT_DIR) :]
            self._rollouts[target] = (raw, mod_revision)
            return target
        if key.startswith(RESERVED_MARK):
            return ""
        self._stable[key] = (raw, mod_revision)
        return key

    def _forget(self, key: str) -> str:
        if key.startswith(ROLLOUT_DIR):
            target = key[len(ROLLOUT_DIR) :]
            self._rollouts.pop(target, None)
            return target
        if key.startswith(RESERVED_MARK):
            return ""
        self._stable.pop(key, None)
        return key

    def _envelope(self, key: str) -> tuple[int, bytes] | str:
        """The rollout of ``key`` as (percent, value bytes), or why it is unusable."""
        raw, _ = self._rollouts[key]
        try:
            doc = json.loads(raw)
            percent, value = doc["percent"], doc["value"]
            if isinstance(percent, bool) or not isinstance(percent, int):
                raise TypeError("percent must be an integer")
            if not 0 <= percent <= 100:
                raise ValueError("percent must be 0..100")
        except (ValueError, TypeError, KeyError) as exc:
            return f"bad rollout envelope: {type(exc).__name__}: {exc}"
        return percent, json.dumps(value).encode()

    def _source(self, key: str) -> tuple[bytes, int] | None:
        """What this instance applies as ``key``: the rollout's value when it takes part in
        the rollout, else the stable value (raw bytes and the mod revision they came from)."""
        if key in self._rollouts:
            envelope = self._envelope(key)
            if not isinstance(envelope, str) and self.in_rollout(envelope[0]):
                return envelope[1], self._rollouts[key][1]
        return self._stable.get(key)

    def _rollout_problem(self, key: str, rejected: dict[str, Rejection]) -> None:
        envelope = self._envelope(key)
        if isinstance(envelope, str):
            rejected[ROLLOUT_DIR + key] = Rejection(
                ROLLOUT_DIR + key, self._rollouts[key][1], envelope
            )
        else:
            rejected.pop(ROLLOUT_DIR + key, None)

    def _resolve(
        self,
        key: str,
        values: dict[str, T],
        mods: dict[str, int],
        rejected: dict[str, Rejection],
        relist: bool,
    ) -> bool:
        """Apply the current source of ``key`` to ``values``/``mods``/``rejected``; a
        rejected value keeps the last good one. Returns whether the values changed."""
        source = self._source(key)
        if source is None:
            rejected.pop(key, None)
            mods.pop(key, None)
            existed = key in values
            values.pop(key, None)
            return existed
        raw, mod_revision = source
        if relist and mods.get(key) == mod_revision and key in values:
            return False  # already applied exactly this
        value = self._parse_kv(key, raw, mod_revision)
        if isinstance(value, Rejection):
            rejected[key] = value
            return False
        values[key], mods[key] = value, mod_revision
        rejected.pop(key, None)
        return True

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
        self._ack_dirty.set()

    # ----------------------------------------------------------------- acknowledgement

    def _ack(self) -> Ack:
        snap = self._snapshot
        return Ack(
            instance=self._instance or "",
            revision=snap.revision,
            keys=dict(snap.mod_revisions),
            rejected={k: r.revision for k, r in self._rejected.items()},
            time=datetime.datetime.now(tz=datetime.UTC).isoformat(timespec="milliseconds"),
        )

    async def _ack_loop(self) -> None:
        """Write the ack key (under a lease kept alive) whenever a snapshot was applied."""
        assert self._ack_key is not None
        delay = self._backoff_initial
        attempt = 0
        while True:
            host, port = self._endpoints[attempt % len(self._endpoints)]
            attempt += 1
            client = _client(host, port)
            lease: Any = None
            try:
                await self._loaded.wait()
                lease = await client.lease(self._ack_ttl)
                self._ack_dirty.set()  # a new lease: write the ack anew
                while True:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._ack_ttl / 3):
                            await self._ack_dirty.wait()
                    if self._ack_dirty.is_set():
                        self._ack_dirty.clear()
                        ack = self._ack()
                        await client.put(self._ack_key, ack.to_json(), lease=lease)
                        self._ack_written = ack.revision
                        delay = self._backoff_initial
                    else:
                        reply = await lease.refresh()
                        if reply is None or int(reply.TTL) <= 0:
                            raise ConnectionError("the ack lease expired")
            except asyncio.CancelledError:
                if lease is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(lease.revoke(), 1.0)
                raise
            except Exception as exc:
                _reraise_if_cancelled(exc)
                log.warning("%s: cannot write ack %s (%s: %s); retrying in %.1fs",
                            self._name, self._ack_key.decode(), type(exc).__name__, exc,
                            delay)  # fmt: skip
            finally:
                await _close(client)
            await asyncio.sleep(delay * random.uniform(0.8, 1.0))
            delay = min(delay * 2, self._backoff_max)

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


async def delete_prefix(endpoints: str, prefix: str) -> int:
    """Delete every key under ``prefix`` (e.g. a throwaway platform's config before it is
    seeded again); returns the etcd revision after the delete."""
    raw = prefix.encode()
    end = raw[:-1] + bytes([raw[-1] + 1])

    async def op(client: aetcd.Client) -> int:
        return int((await client.delete_range(raw, end)).header.revision)

    return await _on_any(endpoints, op)
