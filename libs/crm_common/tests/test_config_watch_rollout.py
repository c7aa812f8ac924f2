"""ConfigWatcher rollouts and acknowledgements against the shared real etcd."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aetcd
import pytest
from crm_common.config_watch import (
    Ack,
    ConfigWatcher,
    ack_key,
    config_key,
    put_json,
    rollout_bucket,
    rollout_key,
)
from pydantic import BaseModel, ConfigDict, Field

WAIT = 15.0
INSIDE, OUTSIDE = "svc-b", "svc-a"  # buckets 34 and 61 (checked below)


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    max_calls: int = Field(ge=1)


def parse(key: str, raw: bytes) -> Limits:
    return Limits.model_validate_json(raw)


async def eventually(cond: Callable[[], Any], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def client(endpoint: str) -> aetcd.Client:
    host, port = endpoint.rsplit(":", 1)
    return aetcd.Client(host=host, port=int(port), timeout=5)


@pytest.fixture
async def watchers(
    etcd_endpoint: str, config_prefix: str
) -> AsyncIterator[dict[str, ConfigWatcher[Limits]]]:
    made = {
        n: ConfigWatcher(etcd_endpoint, f"{config_prefix}/svc/", parse, name=n, ack=n, ack_ttl=3)
        for n in (INSIDE, OUTSIDE)
    }
    yield made
    for w in made.values():
        await w.stop()


def calls(w: ConfigWatcher[Limits]) -> int | None:
    v = w.snapshot.get("SALE")
    return None if v is None else v.max_calls


async def test_rollout_reaches_only_instances_inside_the_percentage(
    etcd_endpoint: str, config_prefix: str, watchers: dict[str, ConfigWatcher[Limits]]
) -> None:
    assert rollout_bucket(INSIDE) < 50 <= rollout_bucket(OUTSIDE)
    await put_json(etcd_endpoint, config_key(config_prefix, "svc", "SALE"), {"max_calls": 1})
    for w in watchers.values():
        await w.start(timeout=WAIT)
    inside, outside = watchers[INSIDE], watchers[OUTSIDE]
    assert calls(inside) == calls(outside) == 1

    rk = rollout_key(config_prefix, "svc", "SALE")
    rev = await put_json(etcd_endpoint, rk, {"percent": 50, "value": {"max_calls": 2}})
    for w in watchers.values():
        await w.wait_for_revision(rev, WAIT)
    assert (calls(inside), calls(outside)) == (2, 1)
    assert inside.snapshot.mod_revisions["SALE"] == rev
    assert "_rollout/SALE" not in inside.snapshot.values  # reserved keys are never config

    rev = await put_json(etcd_endpoint, rk, {"percent": 100, "value": {"max_calls": 3}})
    for w in watchers.values():  # each watcher has its own watch stream: wait for both
        await w.wait_for_revision(rev, WAIT)
    assert (calls(inside), calls(outside)) == (3, 3)

    rev = await put_json(etcd_endpoint, rk, {"percent": 70, "value": {"max_calls": 0}})
    await inside.wait_for_revision(rev, WAIT)
    assert calls(inside) == 3
    assert "SALE" in inside.rejected  # invalid candidate: last good stays

    rev = await put_json(etcd_endpoint, rk, {"percent": "x"})  # a broken envelope
    await inside.wait_for_revision(rev, WAIT)
    assert calls(inside) == 1
    assert "_rollout/SALE" in inside.rejected  # back on stable

    async with client(etcd_endpoint) as c:
        await c.delete(rk.encode())
    await eventually(lambda: calls(inside) == 1 and not inside.rejected, "rollout gone")

    # a fresh watcher lists the prefix and resolves the rollout the same way
    await put_json(etcd_endpoint, rk, {"percent": 50, "value": {"max_calls": 9}})
    late = ConfigWatcher(etcd_endpoint, f"{config_prefix}/svc/", parse, ack="svc-b")
    await late.start(timeout=WAIT)
    try:
        assert calls(late) == 9
    finally:
        await late.stop()


async def test_ack_is_written_leased_and_revoked_on_stop(
    etcd_endpoint: str, config_prefix: str, watchers: dict[str, ConfigWatcher[Limits]]
) -> None:
    rev = await put_json(etcd_endpoint, config_key(config_prefix, "svc", "SALE"), {"max_calls": 4})
    w = watchers[INSIDE]
    await w.start(timeout=WAIT)
    await eventually(lambda: w.acked_revision >= rev, "the first ack")
    key = ack_key(config_prefix, "svc", INSIDE).encode()
    async with client(etcd_endpoint) as c:
        kv = await c.get(key)
        assert kv is not None
        assert kv.lease != 0  # leased: a dead instance's ack expires
        ack = Ack.from_json(kv.value)
        assert ack.instance == INSIDE
        assert ack.keys == {"SALE": rev}
        assert ack.revision >= rev

        rev2 = await put_json(
            etcd_endpoint, config_key(config_prefix, "svc", "SALE"), {"max_calls": 5}
        )
        await eventually(lambda: w.acked_revision >= rev2, "the ack of the change")
        kv = await c.get(key)
        assert kv is not None
        assert json.loads(kv.value)["keys"] == {"SALE": rev2}

        await w.stop()
        assert await c.get(key) is None  # revoked at once
