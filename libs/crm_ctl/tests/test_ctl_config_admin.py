"""ConfigAdminService over a real socket and a real etcd: set -> history -> rollback -> get,
validation with field paths, optimistic concurrency, CRMConfig-managed keys, rollouts
acknowledged by real ConfigWatchers, and bad input that never answers INTERNAL."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import pytest
from crm.config.v1 import config_pb2 as pb
from crm.config.v1 import config_pb2_grpc
from crm_assignment.config import parse as assignment_parse
from crm_common.config_watch import ConfigWatcher, config_key, put_json, rollout_bucket
from crm_common.errors import error_reason, field_violations
from crm_ctl.app import App
from crm_operator.etcd import ConfigStore
from grpc_health.v1 import health_pb2, health_pb2_grpc

Stub = config_pb2_grpc.ConfigAdminServiceStub


def md(author: str) -> tuple[tuple[str, str], ...]:
    return (("x-crm-author", author),)


async def set_value(
    stub: Stub, value: dict[str, Any], author: str = "alice", key: str = "FINANCE", **kw: Any
) -> pb.SetResponse:
    return await stub.Set(
        pb.SetRequest(service="assignment", key=key, value_json=json.dumps(value), **kw),
        metadata=md(author),
        timeout=10,
    )


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def test_set_history_rollback_get(stub: Stub) -> None:
    first = await set_value(stub, {"accept_timeout_s": 20, "weights": {"star": 80}}, "alice")
    assert first.changed
    assert first.version.revision > 0
    assert first.version.author == "alice"
    assert first.version.source == pb.SOURCE_ADMIN
    second = await set_value(
        stub, {"accept_timeout_s": 45, "weights": {"star": 80, "priority": 10}}, "bob"
    )
    assert second.version.revision > first.version.revision

    got = await stub.Get(pb.GetRequest(service="assignment", key="FINANCE"), timeout=10)
    assert got.present
    assert got.current.revision == second.version.revision
    assert got.current.author == "bob"
    assert got.current.time.seconds > 0
    assert json.loads(got.current.value_json)["accept_timeout_s"] == 45
    assert json.loads(got.default_json)["accept_timeout_s"] == 30  # the service's default
    assert "accept_timeout_s" in json.loads(got.json_schema)["properties"]

    hist = await stub.History(pb.HistoryRequest(service="assignment", key="FINANCE"), timeout=10)
    assert [v.revision for v in hist.versions] == [second.version.revision, first.version.revision]
    newest, oldest = hist.versions
    assert [v.author for v in hist.versions] == ["bob", "alice"]
    assert newest.has_previous
    assert not oldest.has_previous
    changes = {c.path: c for c in newest.changes}
    assert set(changes) == {"accept_timeout_s", "weights.priority"}
    assert changes["accept_timeout_s"].kind == pb.CHANGE_KIND_CHANGED
    assert (changes["accept_timeout_s"].old_json, changes["accept_timeout_s"].new_json) == (
        "20",
        "45",
    )
    assert changes["weights.priority"].kind == pb.CHANGE_KIND_ADDED
    assert changes["weights.priority"].old_json == ""

    back = await stub.Rollback(
        pb.RollbackRequest(service="assignment", key="FINANCE", revision=first.version.revision),
        metadata=md("carol"),
        timeout=10,
    )
    assert back.changed
    assert back.version.revision > second.version.revision  # a new version, not a rewind
    assert json.loads(back.version.value_json) == {"accept_timeout_s": 20, "weights": {"star": 80}}
    assert back.version.author == "carol"

    got = await stub.Get(pb.GetRequest(service="assignment", key="FINANCE"), timeout=10)
    assert got.current.revision == back.version.revision
    assert json.loads(got.current.value_json)["accept_timeout_s"] == 20
    hist = await stub.History(pb.HistoryRequest(service="assignment", key="FINANCE"), timeout=10)
    assert len(hist.versions) == 3
    assert {c.path for c in hist.versions[0].changes} == {"accept_timeout_s", "weights.priority"}
    assert hist.versions[0].changes[1].kind == pb.CHANGE_KIND_REMOVED


async def test_the_service_applies_what_was_set(
    stub: Stub, etcd_endpoint: str, config_prefix: str
) -> None:
    """What ConfigAdmin writes is the key the assignment service's watcher applies."""
    watcher: ConfigWatcher[Any] = ConfigWatcher(
        etcd_endpoint, f"{config_prefix}/assignment/", assignment_parse
    )
    await watcher.start(timeout=20)
    try:
        resp = await set_value(stub, {"accept_timeout_s": 7})
        snap = await watcher.wait_for_revision(resp.version.revision, timeout=10)
        assert snap.values["FINANCE"].accept_timeout_s == 7
    finally:
        await watcher.stop()


async def test_invalid_values_are_rejected_with_field_paths(stub: Stub) -> None:
    cases = [
        ({"weights": {"star": "lots"}}, "value_json.weights.star"),
        ({"accept_timeout_s": 0}, "value_json.accept_timeout_s"),
        ({"no_such_field": 1}, "value_json.no_such_field"),
    ]
    for value, path in cases:
        err = await rpc_error(set_value(stub, value))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, value
        assert [f for f, _ in field_violations(err)] == [path]
    got = await stub.Get(pb.GetRequest(service="assignment", key="FINANCE"), timeout=10)
    assert not got.present  # nothing was written


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.SetRequest(service="billing", key="X", value_json="{}"), "service"),
        (pb.SetRequest(service="assignment", key="retail", value_json="{}"), "key"),
        (pb.SetRequest(service="assignment", key="../etc", value_json="{}"), "key"),
        (pb.SetRequest(service="assignment", key="", value_json="{}"), "key"),
        (pb.SetRequest(service="assignment", key="SALE", value_json=""), "value_json"),
        (pb.SetRequest(service="assignment", key="SALE", value_json="{not json"), "value_json"),
        (pb.SetRequest(service="assignment", key="SALE", value_json="[1, 2]"), "value_json"),
        (pb.SetRequest(service="assignment", key="SALE", value_json="[" * 100_000), "value_json"),
        (pb.SetRequest(service="assignment", key="SALE", value_json="[" * 30_000), "value_json"),
        (pb.SetRequest(service="assignment", key="SALE", value_json='{"weights": {"star": NaN}}'),
         "value_json.weights.star"),
        (pb.SetRequest(service="assignment", key="SALE", value_json="{}", rollout_percent=101),
         "rollout_percent"),
        (pb.SetRequest(service="assignment", key="SALE", value_json="{}", expected_revision=-1),
         "expected_revision"),
    ],
)  # fmt: skip
async def test_bad_set_requests_never_internal(stub: Stub, request_: Any, field: str) -> None:
    err = await rpc_error(stub.Set(request_, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in [f for f, _ in field_violations(err)]


async def test_bad_requests_of_every_rpc(stub: Stub) -> None:
    calls = [
        stub.Get(pb.GetRequest(service="nope", key="SALE"), timeout=10),
        stub.History(pb.HistoryRequest(service="assignment", key="a/b"), timeout=10),
        stub.Rollout(pb.RolloutRequest(service="", key=""), timeout=10),
        stub.List(pb.ListRequest(service="nope"), timeout=10),
        stub.Rollback(pb.RollbackRequest(service="assignment", key="SALE", revision=0),
                      timeout=10),
        stub.Set(pb.SetRequest(service="assignment", key="SALE", value_json="{}"),
                 metadata=md("x" * 200), timeout=10),
    ]  # fmt: skip
    for call in calls:
        err = await rpc_error(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert field_violations(err)
    missing = await rpc_error(
        stub.Rollback(pb.RollbackRequest(service="assignment", key="SALE", revision=99),
                      metadata=md("alice"), timeout=10)
    )  # fmt: skip
    assert missing.code() == grpc.StatusCode.NOT_FOUND


async def test_optimistic_concurrency(stub: Stub) -> None:
    created = await set_value(stub, {"accept_timeout_s": 10}, expected_revision=0)
    rev = created.version.revision
    again = await rpc_error(set_value(stub, {"accept_timeout_s": 11}, expected_revision=0))
    assert again.code() == grpc.StatusCode.ABORTED
    assert error_reason(again) == "REVISION_CONFLICT"
    ok = await set_value(stub, {"accept_timeout_s": 12}, expected_revision=rev)
    stale = await rpc_error(set_value(stub, {"accept_timeout_s": 13}, expected_revision=rev))
    assert stale.code() == grpc.StatusCode.ABORTED
    got = await stub.Get(pb.GetRequest(service="assignment", key="FINANCE"), timeout=10)
    assert got.current.revision == ok.version.revision
    assert json.loads(got.current.value_json) == {"accept_timeout_s": 12}
    # racing writers with the same expected revision: exactly one wins
    results = await asyncio.gather(
        *(
            set_value(stub, {"accept_timeout_s": 20 + i}, expected_revision=ok.version.revision)
            for i in range(6)
        ),
        return_exceptions=True,
    )
    won = [r for r in results if isinstance(r, pb.SetResponse)]
    lost = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(won) == 1
    assert len(lost) == 5
    assert {e.code() for e in lost} == {grpc.StatusCode.ABORTED}


async def test_unchanged_value_is_not_a_new_version(stub: Stub) -> None:
    a = await set_value(stub, {"accept_timeout_s": 10})
    b = await set_value(stub, {"accept_timeout_s": 10})
    assert not b.changed
    assert b.version.revision == a.version.revision
    hist = await stub.History(pb.HistoryRequest(service="assignment", key="FINANCE"), timeout=10)
    assert len(hist.versions) == 1


async def test_a_key_declared_by_a_crmconfig_needs_force(
    stub: Stub, etcd_endpoint: str, config_prefix: str
) -> None:
    # the operator's own write path (a CRMConfig of generation 3)
    store = ConfigStore(etcd_endpoint, config_prefix)
    try:
        await store.apply("assignment", "SALE", b'{"accept_timeout_s":9}', None, 3)
    finally:
        await store.close()
    got = await stub.Get(pb.GetRequest(service="assignment", key="SALE"), timeout=10)
    assert got.current.source == pb.SOURCE_CRMCONFIG
    assert got.current.generation == 3
    err = await rpc_error(set_value(stub, {"accept_timeout_s": 5}, key="SALE"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(err) == "MANAGED_BY_CRMCONFIG"
    forced = await set_value(stub, {"accept_timeout_s": 5}, key="SALE", force=True)
    assert forced.changed
    assert forced.version.source == pb.SOURCE_ADMIN


async def test_a_hand_written_key_has_no_author(
    stub: Stub, etcd_endpoint: str, config_prefix: str
) -> None:
    rev = await put_json(
        etcd_endpoint, config_key(config_prefix, "assignment", "SALE"), {"accept_timeout_s": 3}
    )
    got = await stub.Get(pb.GetRequest(service="assignment", key="SALE"), timeout=10)
    assert got.present
    assert got.current.revision == rev
    assert got.current.author == ""
    assert got.current.source == pb.SOURCE_UNSPECIFIED
    listed = await stub.List(pb.ListRequest(service="assignment"), timeout=10)
    keys = {k.key: k for k in listed.services[0].keys}
    assert keys["SALE"].present
    assert keys["SALE"].revision == rev
    assert not keys["FINANCE"].present
    assert keys["FINANCE"].known


async def test_history_keeps_the_limit(stub: Stub) -> None:
    for i in range(7):
        await set_value(stub, {"accept_timeout_s": 10 + i})
    hist = await stub.History(pb.HistoryRequest(service="assignment", key="FINANCE"), timeout=10)
    assert [json.loads(v.value_json)["accept_timeout_s"] for v in hist.versions] == [
        16, 15, 14, 13, 12,
    ]  # fmt: skip
    assert not hist.versions[-1].has_previous


def _names_by_bucket() -> tuple[str, str]:
    """One instance name in the lower half of the rollout buckets, one in the upper."""
    low = next(f"pod-{i}" for i in range(1000) if rollout_bucket(f"pod-{i}") < 50)
    high = next(f"pod-{i}" for i in range(1000) if rollout_bucket(f"pod-{i}") >= 50)
    return low, high


async def test_rollout_shows_which_instance_applied_what(
    stub: Stub, etcd_endpoint: str, config_prefix: str
) -> None:
    stable = await set_value(stub, {"accept_timeout_s": 30})
    low, high = _names_by_bucket()
    watchers: list[ConfigWatcher[Any]] = [
        ConfigWatcher(etcd_endpoint, f"{config_prefix}/assignment/", assignment_parse, ack=name)
        for name in (low, high)
    ]
    for w in watchers:
        await w.start(timeout=20)
    try:
        canary = await set_value(stub, {"accept_timeout_s": 5}, rollout_percent=50)
        assert canary.rollout_revision > 0
        assert canary.version.revision == stable.version.revision  # stable untouched

        async def state() -> pb.RolloutResponse:
            return await stub.Rollout(
                pb.RolloutRequest(service="assignment", key="FINANCE"), timeout=10
            )

        async def settled() -> pb.RolloutResponse:
            async with asyncio.timeout(15):
                while True:
                    s = await state()
                    if len(s.instances) == 2 and s.lagging == 0:
                        return s
                    await asyncio.sleep(0.05)

        s = await settled()
        assert s.candidate.percent == 50
        assert s.candidate.revision == canary.rollout_revision
        by_name = {i.instance: i for i in s.instances}
        assert by_name[low].version == pb.APPLIED_VERSION_ROLLOUT
        assert by_name[low].applied_revision == canary.rollout_revision
        assert by_name[high].version == pb.APPLIED_VERSION_STABLE
        assert by_name[high].applied_revision == stable.version.revision
        assert by_name[low].bucket == rollout_bucket(low)
        assert (s.on_stable, s.on_candidate) == (1, 1)
        assert watchers[0].snapshot.values["FINANCE"].accept_timeout_s == 5

        # promote: a plain Set ends the rollout, everyone applies the new stable value
        promoted = await set_value(stub, {"accept_timeout_s": 5})
        async with asyncio.timeout(15):
            while True:
                s = await state()
                if s.on_stable == 2:
                    break
                await asyncio.sleep(0.05)
        assert not s.HasField("candidate")
        assert {i.applied_revision for i in s.instances} == {promoted.version.revision}
    finally:
        for w in watchers:
            await w.stop()


async def test_health_and_reflection(admin_app: App) -> None:
    async with grpc.aio.insecure_channel(admin_app.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="crm.config.v1.ConfigAdminService")
        async with asyncio.timeout(20):  # the readiness loop turns it SERVING
            while True:
                status = (await health.Check(request, timeout=5)).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
                await asyncio.sleep(0.05)
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        refl = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def ask() -> Any:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        names = set()
        async for r in refl.ServerReflectionInfo(ask()):
            names |= {s.name for s in r.list_services_response.service}
        assert "crm.config.v1.ConfigAdminService" in names


async def test_ending_a_rollout_keeps_the_stable_versions_author(stub: Stub) -> None:
    stable = await set_value(stub, {"accept_timeout_s": 30}, "alice")
    await set_value(stub, {"accept_timeout_s": 5}, "bob", rollout_percent=10)
    # carol aborts the canary by setting the stable value again
    aborted = await set_value(stub, {"accept_timeout_s": 30}, "carol")
    assert aborted.changed  # the rollout key is gone
    assert aborted.version.revision == stable.version.revision
    assert aborted.version.author == "alice"
    rollout = await stub.Rollout(pb.RolloutRequest(service="assignment", key="FINANCE"))
    assert not rollout.HasField("candidate")
    hist = await stub.History(pb.HistoryRequest(service="assignment", key="FINANCE"))
    assert [v.author for v in hist.versions] == ["alice"]


async def test_store_call_cut_by_a_closed_channel_retries_and_never_passes_cancellation_on(
    etcd_endpoint: str, config_prefix: str
) -> None:
    """ConfigStore callers share one etcd client; one caller's failure closes it, and grpc
    cancels every other call on that channel. Those callers were not cancelled: the store
    retries them on a new client (then raises ConnectionFailedError), and a real cancel of
    the caller still propagates. (Passed on as CancelledError, it left ConfigAdmin calls
    unanswered until their deadline with etcd down.)"""
    import aetcd

    store = ConfigStore(etcd_endpoint, config_prefix)
    seen: list[aetcd.Client] = []

    async def cut_once(c: aetcd.Client) -> str:
        seen.append(c)
        if len(seen) == 1:
            raise asyncio.CancelledError  # what a call on a channel closed under it raises
        await c.status()
        return "answered"

    async def always_cut(c: aetcd.Client) -> str:
        raise asyncio.CancelledError

    async def hang(c: aetcd.Client) -> str:
        await asyncio.Event().wait()
        return "never"

    try:
        assert await store._call(cut_once) == "answered"
        assert seen[0] is not seen[1]  # the cut client was dropped, the retry used a new one
        with pytest.raises(aetcd.ConnectionFailedError):
            await store._call(always_cut)
        task = asyncio.ensure_future(store._call(hang))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await store.close()
