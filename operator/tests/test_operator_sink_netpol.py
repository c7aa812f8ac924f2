"""CRM_OPERATOR_SINK_NETWORK_POLICY: the real operator gives each built-in sink a
NetworkPolicy selecting exactly its pods, in the BILogSink's namespace (one the crm
chart's own sink policy does not cover), owned by the BILogSink, kept in line and deleted
with it (the API stand-in has no garbage collection: the operator deletes it itself)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from operator_testlib import Kube, Operator, eventually
from test_operator_bilogsink import builtin_sink

NS = "analytics"  # not the crm release's namespace, not the operator's
NAME = "bilog-sink-files"
POLICY: dict[str, Any] = {
    "policyTypes": ["Ingress", "Egress"],
    "ingress": [
        {
            "from": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}}
            ],
            "ports": [{"port": 9157, "protocol": "TCP"}],
        }
    ],
    "egress": [
        {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]},
        {"ports": [{"port": 9092, "protocol": "TCP"}]},
    ],
}


@pytest.fixture
def operator_env(operator_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("CRM_OPERATOR_SINK_NETWORK_POLICY", json.dumps(POLICY))
    return {**operator_env, "CRM_OPERATOR_SINK_NETWORK_POLICY": json.dumps(POLICY)}


def _without_selector(policy: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in policy["spec"].items() if k != "podSelector"}


def _ready_reason(kube: Kube, name: str) -> str | None:
    o = kube.get("bilogsinks", NS, name)
    for c in (o or {}).get("status", {}).get("conditions", []):
        if c["type"] == "Ready":
            return str(c["reason"])
    return None


async def test_builtin_sink_gets_its_own_network_policy(operator: Operator, kube: Kube) -> None:
    sink = await kube.create("bilogsinks", "BILogSink", NS, "files", builtin_sink())
    dep = await eventually(lambda: kube.get("deployments", NS, NAME), "Deployment")
    policy = kube.get("networkpolicies", NS, NAME)
    assert policy is not None
    assert policy["metadata"]["namespace"] == NS
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector == dep["spec"]["template"]["metadata"]["labels"]
    assert selector["app.kubernetes.io/instance"] == "files"  # this sink's pods only
    assert _without_selector(policy) == POLICY
    owner = policy["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"]) == (
        "BILogSink",
        "files",
        sink["metadata"]["uid"],
    )

    # deleted behind the operator's back: the monitor puts it back
    await kube.delete("networkpolicies", NS, NAME)

    def recreated() -> Any:
        p = kube.get("networkpolicies", NS, NAME)
        return p if p and p["metadata"]["uid"] != policy["metadata"]["uid"] else None

    policy = await eventually(recreated, "policy recreated")
    assert _without_selector(policy) == POLICY

    # edited behind the operator's back, then the sink's spec changes: patched back
    await kube.patch("networkpolicies", NS, NAME, {"spec": {"egress": [{}]}})
    await kube.patch("bilogsinks", NS, "files", {"spec": {"flushSize": 42}})

    def flushed() -> Any:
        d = kube.get("deployments", NS, NAME)
        env = {e["name"]: e["value"] for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
        return env["CRM_BILOG_SINK_FLUSH_RECORDS"] == "42"

    await eventually(flushed, "the new spec in the Deployment")
    policy = kube.get("networkpolicies", NS, NAME)
    assert policy is not None
    assert _without_selector(policy) == POLICY
    assert policy["spec"]["podSelector"]["matchLabels"] == selector

    await kube.delete("bilogsinks", NS, "files")
    await eventually(lambda: kube.get("bilogsinks", NS, "files") is None, "finalizer released")
    assert kube.get("deployments", NS, NAME) is None
    assert kube.get("networkpolicies", NS, NAME) is None


async def test_a_policy_that_cannot_be_applied_keeps_the_sink_not_ready(
    operator: Operator, kube: Kube
) -> None:
    """The API refuses the policy (403, as without the RBAC rule): Ready=False with the
    reason, no Deployment without its policy, and a retry once the API accepts it."""
    kube.server.forbidden.add("networking.k8s.io/v1/networkpolicies")
    await kube.create("bilogsinks", "BILogSink", NS, "files", builtin_sink())

    def refused() -> Any:
        o = kube.get("bilogsinks", NS, "files")
        for c in (o or {}).get("status", {}).get("conditions", []):
            if c["type"] == "Ready" and c["reason"] == "NetworkPolicyError":
                return c
        return None

    condition = await eventually(refused, "Ready False NetworkPolicyError")
    assert condition["status"] == "False"
    assert NAME in condition["message"]
    assert kube.get("deployments", NS, NAME) is None  # never a sink pod without its policy
    assert "403" in condition["message"]
    kube.server.forbidden.clear()
    await eventually(lambda: kube.get("deployments", NS, NAME), "Deployment after a retry")
    assert kube.get("networkpolicies", NS, NAME) is not None
    await eventually(
        lambda: _ready_reason(kube, "files") not in (None, "NetworkPolicyError"),
        "the Deployment's state in Ready",
    )
