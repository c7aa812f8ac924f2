"""CRMConfig end to end: the real operator (kopf) against the Kubernetes API stand-in
(kmock's KubernetesEmulator) and a real etcd."""

from __future__ import annotations

import json
from typing import Any

import aetcd
from crm_common.config_watch import config_key
from operator_testlib import Kube, Operator, eventually

NS = "crm"


async def etcd_get(endpoint: str, key: str) -> tuple[dict[str, Any], int] | None:
    host, port = endpoint.rsplit(":", 1)
    async with aetcd.Client(host=host, port=int(port), timeout=5) as c:
        kv = await c.get(key.encode())
        return None if kv is None else (json.loads(kv.value), int(kv.mod_revision))


async def etcd_put(endpoint: str, key: str, raw: bytes) -> int:
    host, port = endpoint.rsplit(":", 1)
    async with aetcd.Client(host=host, port=int(port), timeout=5) as c:
        return int((await c.put(key.encode(), raw)).header.revision)


def cond(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for c in (obj or {}).get("status", {}).get("conditions", []):
        if c["type"] == type_:
            return dict(c)
    return {}


def spec(timeout: int, **extra: Any) -> dict[str, Any]:
    return {"service": "assignment", "key": "SALE", "data": {"accept_timeout_s": timeout}, **extra}


async def test_create_update_delete_with_finalizer(
    operator: Operator, kube: Kube, etcd_endpoint: str, config_prefix: str
) -> None:
    key = config_key(config_prefix, "assignment", "SALE")
    await kube.create("crmconfigs", "CRMConfig", NS, "sale", spec(40))

    found = await eventually(lambda: etcd_get(etcd_endpoint, key), "the key in etcd")
    assert found[0] == {"accept_timeout_s": 40}
    obj = await eventually(
        lambda: (
            (o := kube.get("crmconfigs", NS, "sale")) and o.get("status", {}).get("revision") and o
        ),
        "status.revision",
    )
    assert obj["metadata"]["finalizers"] == ["crm.platform.io/finalizer"]
    st = obj["status"]
    assert st["revision"] == found[1]
    assert st["observedGeneration"] == 1
    assert [h["revision"] for h in st["history"]] == [found[1]]
    ready, synced = cond(obj, "Ready"), cond(obj, "Synced")
    assert (synced["status"], synced["reason"], synced["observedGeneration"]) == (
        "True",
        "Written",
        1,
    )
    assert (ready["status"], ready["reason"]) == ("True", "NoInstances")
    assert set(ready) == {
        "type",
        "status",
        "reason",
        "message",
        "lastTransitionTime",
        "observedGeneration",
    }
    await eventually(lambda: kube.events("sale", "Written"), "a Written event")

    await kube.patch("crmconfigs", NS, "sale", {"spec": {"data": {"accept_timeout_s": 50}}})

    async def updated() -> Any:
        f = await etcd_get(etcd_endpoint, key)
        return f if f and f[0] == {"accept_timeout_s": 50} else None

    _, new_rev = await eventually(updated, "the updated value in etcd")
    obj = await eventually(
        lambda: (
            (o := kube.get("crmconfigs", NS, "sale"))
            and o.get("status", {}).get("observedGeneration") == 2
            and o
        ),
        "observedGeneration 2",
    )
    assert obj["status"]["revision"] == new_rev
    assert [h["revision"] for h in obj["status"]["history"]] == [new_rev, found[1]]
    ready2 = cond(obj, "Ready")
    assert ready2["observedGeneration"] == 2
    assert ready2["lastTransitionTime"] == ready["lastTransitionTime"]  # status did not change

    await kube.delete("crmconfigs", NS, "sale")
    await eventually(lambda: kube.get("crmconfigs", NS, "sale") is None, "finalizer released")
    assert await etcd_get(etcd_endpoint, key) is None


async def test_drift_is_repaired_and_reported(
    operator: Operator, kube: Kube, etcd_endpoint: str, config_prefix: str
) -> None:
    key = config_key(config_prefix, "assignment", "FINANCE")
    await kube.create(
        "crmconfigs",
        "CRMConfig",
        NS,
        "fin",
        {"service": "assignment", "key": "FINANCE", "data": {"candidate_limit": 7}},
    )
    await eventually(lambda: etcd_get(etcd_endpoint, key), "the key in etcd")
    await eventually(
        lambda: (o := kube.get("crmconfigs", NS, "fin")) and o.get("status", {}).get("revision"),
        "status",
    )

    hand = await etcd_put(etcd_endpoint, key, b'{"candidate_limit": 499}')  # someone by hand

    async def restored() -> Any:
        f = await etcd_get(etcd_endpoint, key)
        return f if f and f[0] == {"candidate_limit": 7} and f[1] > hand else None

    await eventually(restored, "the declared value put back")
    events = await eventually(lambda: kube.events("fin", "DriftRepaired"), "a DriftRepaired event")
    assert events[0]["type"] == "Warning"
    assert key in events[0]["message"]


async def test_rollback_annotation_restores_previous_data(
    operator: Operator, kube: Kube, etcd_endpoint: str, config_prefix: str
) -> None:
    key = config_key(config_prefix, "assignment", "SALE")
    await kube.create("crmconfigs", "CRMConfig", NS, "sale", spec(30))
    first = await eventually(lambda: etcd_get(etcd_endpoint, key), "v1 in etcd")
    await kube.patch(
        "crmconfigs",
        NS,
        "sale",
        {"spec": {"data": {"accept_timeout_s": 90, "default_priority": 7}}},
    )

    def history() -> Any:
        o = kube.get("crmconfigs", NS, "sale")
        h = (o or {}).get("status", {}).get("history", [])
        return len(h) == 2 and h

    h = await eventually(history, "two versions in status.history")
    assert h[1]["revision"] == first[1]

    await kube.patch(
        "crmconfigs",
        NS,
        "sale",
        {"metadata": {"annotations": {"crm.platform.io/rollback-to": str(first[1])}}},
    )

    async def rolled_back() -> Any:
        f = await etcd_get(etcd_endpoint, key)
        return f if f and f[0] == {"accept_timeout_s": 30} else None

    back = await eventually(rolled_back, "the first value back in etcd")
    assert back[1] > first[1]  # a new version with the old value
    obj = await eventually(
        lambda: (
            (o := kube.get("crmconfigs", NS, "sale"))
            and "crm.platform.io/rollback-to" not in o["metadata"].get("annotations", {})
            and o
        ),
        "the annotation removed",
    )
    assert obj["spec"]["data"] == {"accept_timeout_s": 30}
    await eventually(lambda: kube.events("sale", "RolledBack"), "a RolledBack event")


async def test_percentage_rollout_with_live_watchers(
    operator: Operator, kube: Kube, etcd_endpoint: str, config_prefix: str
) -> None:
    """Two real ConfigWatchers (the assignment service's own parse) with instance names on
    either side of 50 %: only the one inside the rollout applies the candidate."""
    from crm_assignment.config import LineConfig
    from crm_assignment.config import parse as assignment_parse
    from crm_common.config_watch import ConfigWatcher, rollout_bucket

    inside, outside = "assignment-b", "assignment-a"
    assert rollout_bucket(inside) < 50 <= rollout_bucket(outside)
    prefix = f"{config_prefix}/assignment/"
    watchers = {
        n: ConfigWatcher[LineConfig](etcd_endpoint, prefix, assignment_parse, ack=n, ack_ttl=5)
        for n in (inside, outside)
    }
    for w in watchers.values():
        await w.start(timeout=10)
    try:

        def timeout_of(n: str) -> int | None:
            v = watchers[n].snapshot.get("SALE")
            return None if v is None else v.accept_timeout_s

        await kube.create("crmconfigs", "CRMConfig", NS, "sale", spec(30))
        await eventually(lambda: timeout_of(inside) == timeout_of(outside) == 30, "v1 everywhere")
        obj = await eventually(
            lambda: (
                (o := kube.get("crmconfigs", NS, "sale"))
                and o.get("status", {}).get("appliedCount") == 2
                and o
            ),
            "appliedCount 2",
        )
        assert cond(obj, "Ready")["reason"] == "Applied"
        assert {a["instance"] for a in obj["status"]["appliedBy"]} == {inside, outside}

        await kube.patch(
            "crmconfigs",
            NS,
            "sale",
            {"spec": {"data": {"accept_timeout_s": 45}, "rollout": {"percent": 50}}},
        )
        await eventually(lambda: timeout_of(inside) == 45, "the candidate on the inside instance")
        obj = await eventually(
            lambda: (
                (o := kube.get("crmconfigs", NS, "sale"))
                and (o.get("status", {}).get("rollout") or {}).get("percent") == 50
                and o.get("status", {}).get("appliedCount") == 2
                and o
            ),
            "rollout status",
        )
        assert timeout_of(outside) == 30  # still the stable value
        by = {a["instance"]: a for a in obj["status"]["appliedBy"]}
        assert by[inside]["candidate"]
        assert by[inside]["revision"] == obj["status"]["rollout"]["revision"]
        assert not by[outside]["candidate"]
        assert by[outside]["revision"] == obj["status"]["revision"]
        stable = await etcd_get(etcd_endpoint, config_key(config_prefix, "assignment", "SALE"))
        assert stable is not None
        assert stable[0] == {"accept_timeout_s": 30}

        await kube.patch("crmconfigs", NS, "sale", {"spec": {"rollout": {"percent": 100}}})
        await eventually(lambda: timeout_of(inside) == timeout_of(outside) == 45, "promoted")
        await eventually(
            lambda: (
                (o := kube.get("crmconfigs", NS, "sale"))
                and o.get("status", {}).get("rollout") is None
                and o.get("status", {}).get("appliedCount") == 2
            ),
            "rollout gone from status",
        )
    finally:
        for w in watchers.values():
            await w.stop()


async def test_webhook_refuses_invalid_config_naming_the_field(
    operator: Operator, kube: Kube
) -> None:
    """Real HTTP to the admission webhook server kopf runs (the API stand-in has no
    admission chain, so the test plays the API server's part with an AdmissionReview)."""

    async def review(
        spec_: dict[str, Any],
        handler: str = "validate-crmconfig",
        resource: str = "crmconfigs",
        kind: str = "CRMConfig",
    ) -> dict[str, Any]:
        body = {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "u-1",
                "operation": "CREATE",
                "resource": {
                    "group": "crm.platform.io",
                    "version": "v1alpha1",
                    "resource": resource,
                },
                "userInfo": {"username": "ops"},
                "object": {
                    "apiVersion": "crm.platform.io/v1alpha1",
                    "kind": kind,
                    "metadata": {"name": "x", "namespace": NS},
                    "spec": spec_,
                },
            },
        }
        async with kube.session.post(f"{operator.webhook_url}/{handler}", json=body) as r:
            assert r.status == 200
            doc: dict[str, Any] = (await r.json())["response"]
            return doc

    bad = await review(spec(0))
    assert not bad["allowed"]
    assert bad["status"]["code"] == 422
    assert bad["status"]["message"].startswith("spec.data.accept_timeout_s:")
    nested = await review(
        {"service": "assignment", "key": "SALE", "data": {"weights": {"star": "lots"}}}
    )
    assert nested["status"]["message"].startswith("spec.data.weights.star:")
    unknown = await review({"service": "assignment", "key": "no/pe", "data": {}})
    assert unknown["status"]["message"].startswith("spec.key:")
    assert (await review(spec(60)))["allowed"]
    # lines are data: a new line is one CRMConfig, its code in the data
    leasing = {"service": "assignment", "key": "LEASING", "data": {"code": 4}}
    assert (await review(leasing))["allowed"]
    no_code = await review({**leasing, "data": {"accept_timeout_s": 20}})
    assert not no_code["allowed"]
    assert no_code["status"]["message"].startswith("spec.data.code:")
    taken = await review({**leasing, "data": {"code": 3}})
    assert taken["status"]["message"].startswith("spec.data.code:")
    sink = await review(
        {
            "topics": ["t"],
            "target": {"kafkaConnect": {"url": "http://c:8083", "config": {"flush.size": "1"}}},
        },
        handler="validate-bilogsink",
        resource="bilogsinks",
        kind="BILogSink",
    )
    assert not sink["allowed"]
    assert sink["status"]["message"].startswith("spec.target.kafkaConnect.config.flush.size:")
