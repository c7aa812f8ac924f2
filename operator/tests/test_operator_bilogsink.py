"""BILogSink end to end: the real operator against the Kubernetes API stand-in (kmock's
KubernetesEmulator) and stand-ins of Kafka Connect's REST API (connect_standin)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from connect_standin import ConnectStandIn
from operator_testlib import Kube, Operator, eventually

NS = "bi"


@pytest.fixture
async def connect() -> AsyncIterator[ConnectStandIn]:
    c = ConnectStandIn()
    await c.start()
    yield c
    await c.stop()


def sink(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "topics": ["crm.assignment.events", "crm.call.records"],
        "format": "avro",
        "partitioning": "daily",
        "flushSize": 500,
        "rotateIntervalMs": 60000,
        "tasksMax": 2,
        "state": "running",
        "target": {"kafkaConnect": {"url": url, "config": {"hdfs.url": "hdfs://nn:8020"}}},
        **extra,
    }


def ready(kube: Kube, name: str, reason: str | None = None) -> Any:
    o = kube.get("bilogsinks", NS, name)
    for c in (o or {}).get("status", {}).get("conditions", []):
        if c["type"] == "Ready" and c["status"] == "True" and reason in (None, c["reason"]):
            return o
    return None


async def test_connector_created_paused_resumed_deleted(
    operator: Operator, kube: Kube, connect: ConnectStandIn
) -> None:
    await kube.create("bilogsinks", "BILogSink", NS, "events", sink(connect.url))
    obj = await eventually(lambda: ready(kube, "events", "Running"), "Ready Running")
    c = connect.connectors["bi.events"]
    assert c.config["topics"] == "crm.assignment.events,crm.call.records"
    assert c.config["tasks.max"] == "2"
    assert c.config["flush.size"] == "500"
    assert c.config["rotate.interval.ms"] == "60000"
    assert c.config["partition.duration.ms"] == "86400000"
    assert c.config["format.class"].endswith("AvroFormat")
    assert c.config["hdfs.url"] == "hdfs://nn:8020"
    st = obj["status"]
    assert st["connectorName"] == "bi.events"
    assert st["observedGeneration"] == 1
    assert st["connectorStatus"]["state"] == "RUNNING"
    assert [t["state"] for t in st["connectorStatus"]["tasks"]] == ["RUNNING", "RUNNING"]

    await kube.patch("bilogsinks", NS, "events", {"spec": {"state": "paused"}})
    obj = await eventually(lambda: ready(kube, "events", "Paused"), "Ready Paused")
    assert connect.count("PUT", "/pause") >= 1
    assert c.state == "PAUSED"
    assert obj["status"]["observedGeneration"] == 2

    await kube.patch("bilogsinks", NS, "events", {"spec": {"state": "running"}})
    await eventually(lambda: ready(kube, "events", "Running"), "Ready Running again")
    assert connect.count("PUT", "/resume") >= 1
    assert c.state == "RUNNING"

    await kube.delete("bilogsinks", NS, "events")
    await eventually(lambda: kube.get("bilogsinks", NS, "events") is None, "finalizer released")
    assert "bi.events" not in connect.connectors
    assert connect.count("DELETE", "/connectors/bi.events") == 1


async def test_failed_task_is_restarted_with_backoff(
    operator: Operator, kube: Kube, connect: ConnectStandIn
) -> None:
    await kube.create("bilogsinks", "BILogSink", NS, "calls", sink(connect.url, tasksMax=1))
    await eventually(lambda: ready(kube, "calls"), "Ready")
    connect.fail_task("bi.calls", 0, restarts_that_fail=2)  # fails again twice after restarts

    def task_failed() -> Any:
        o = kube.get("bilogsinks", NS, "calls")
        conds = (o or {}).get("status", {}).get("conditions", [])
        return any(c["reason"] == "TaskFailed" for c in conds)

    await eventually(task_failed, "Ready False TaskFailed")
    obj = await eventually(lambda: ready(kube, "calls", "Running"), "running again", timeout=30)
    assert connect.count("POST", "/tasks/0/restart") == 3
    assert obj["status"]["connectorStatus"]["tasks"][0]["restarts"] == 3
    events = await eventually(
        lambda: len(ev := kube.events("calls", "TaskRestarted")) >= 3 and ev,
        "three TaskRestarted events",
    )
    delays = sorted(e["message"].rsplit(" ", 1)[-1] for e in events)
    assert delays == ["0.4s", "0.8s", "1.6s"]  # exponential: base 0.4 s, doubling


async def test_hanging_connect_does_not_delay_another_sink(
    operator: Operator, kube: Kube, connect: ConnectStandIn
) -> None:
    hanging = ConnectStandIn(hang=True)
    await hanging.start()
    try:
        await kube.create("bilogsinks", "BILogSink", NS, "stuck", sink(hanging.url))
        await eventually(lambda: hanging.pending > 0, "a request held by the hanging Connect")
        await kube.create("bilogsinks", "BILogSink", NS, "fine", sink(connect.url))
        await eventually(lambda: ready(kube, "fine", "Running"), "the other sink Ready")
        assert hanging.pending > 0  # the first sink's call is still being held
        assert "bi.fine" in connect.connectors

        def unreachable() -> Any:
            o = kube.get("bilogsinks", NS, "stuck")
            conds = (o or {}).get("status", {}).get("conditions", [])
            return any(
                c["reason"] == "ConnectUnreachable" and c["status"] == "False" for c in conds
            )

        await eventually(unreachable, "the stuck sink Ready False ConnectUnreachable")
    finally:
        await hanging.stop()


def builtin_sink(**builtin: Any) -> dict[str, Any]:
    """A spec the built-in sink can run: hourly Avro files, one Connect task."""
    return sink(
        "http://unused",
        partitioning="hourly",
        tasksMax=1,
        target={"builtin": {"image": "crm-bilog:1.2.3", "replicas": 2, **builtin}},
    )


async def test_builtin_sink_is_a_deployment(operator: Operator, kube: Kube) -> None:
    await kube.create("bilogsinks", "BILogSink", NS, "local", builtin_sink(claimName="bi-files"))
    dep = await eventually(lambda: kube.get("deployments", NS, "bilog-sink-local"), "Deployment")
    pod = dep["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert container["image"] == "crm-bilog:1.2.3"
    assert container["args"] == ["sink"]  # the entrypoint is python -m crm_bilog
    assert dep["spec"]["replicas"] == 2
    assert env["CRM_BILOG_SINK_TOPICS"] == "crm.assignment.events,crm.call.records"
    assert env["CRM_BILOG_SINK_FLUSH_RECORDS"] == "500"
    assert env["CRM_BILOG_SINK_ROTATE_INTERVAL_S"] == "60.0"
    assert env["CRM_BILOG_SINK_GROUP_ID"] == f"crm-bilog-sink.{NS}.local"
    assert env["CRM_BILOG_KAFKA_BOOTSTRAP"] == "kafka.test:9092"  # the operator's settings
    assert env["CRM_BILOG_SCHEMA_REGISTRY_URL"] == "http://registry.test:8081"
    claim = next(v for v in pod["volumes"] if v["name"] == "data")
    assert claim["persistentVolumeClaim"] == {"claimName": "bi-files"}
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    assert pod["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert dep["metadata"]["ownerReferences"][0]["kind"] == "BILogSink"
    # CRM_OPERATOR_SINK_NETWORK_POLICY unset: no policy (and no RBAC for one); it would
    # exist by now, the operator applies it before the Deployment
    assert kube.get("networkpolicies", NS, "bilog-sink-local") is None

    await kube.patch("bilogsinks", NS, "local", {"spec": {"state": "paused"}})
    await eventually(
        lambda: (
            (d := kube.get("deployments", NS, "bilog-sink-local")) and d["spec"]["replicas"] == 0
        ),
        "scaled to 0",
    )
    await eventually(lambda: ready(kube, "local", "ScaledDown"), "Ready ScaledDown")

    await kube.delete("bilogsinks", NS, "local")
    await eventually(lambda: kube.get("bilogsinks", NS, "local") is None, "finalizer released")
    assert kube.get("deployments", NS, "bilog-sink-local") is None


async def test_builtin_sink_refuses_what_it_cannot_honour(operator: Operator, kube: Kube) -> None:
    """Daily partitions have no setting in the built-in sink: the webhook refuses them and,
    without the webhook, the operator reports InvalidSpec and creates nothing."""
    spec = {**builtin_sink(), "partitioning": "daily"}
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "u-1",
            "operation": "CREATE",
            "resource": {
                "group": "crm.platform.io",
                "version": "v1alpha1",
                "resource": "bilogsinks",
            },
            "userInfo": {"username": "ops"},
            "object": {
                "apiVersion": "crm.platform.io/v1alpha1",
                "kind": "BILogSink",
                "metadata": {"name": "daily", "namespace": NS},
                "spec": spec,
            },
        },
    }
    async with kube.session.post(f"{operator.webhook_url}/validate-bilogsink", json=review) as r:
        assert r.status == 200
        answer = (await r.json())["response"]
    assert not answer["allowed"]
    assert answer["status"]["code"] == 422
    assert answer["status"]["message"].startswith("spec.partitioning:")

    await kube.create("bilogsinks", "BILogSink", NS, "daily", spec)

    def invalid() -> Any:
        o = kube.get("bilogsinks", NS, "daily")
        for c in (o or {}).get("status", {}).get("conditions", []):
            if c["type"] == "Ready" and c["status"] == "False" and c["reason"] == "InvalidSpec":
                return c
        return None

    condition = await eventually(invalid, "Ready False InvalidSpec")
    assert condition["message"].startswith("spec.partitioning:")
    assert kube.get("deployments", NS, "bilog-sink-daily") is None
    # fixed: the Deployment follows
    await kube.patch("bilogsinks", NS, "daily", {"spec": {"partitioning": "hourly"}})
    await eventually(lambda: kube.get("deployments", NS, "bilog-sink-daily"), "Deployment")
