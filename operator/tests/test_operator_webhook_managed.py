"""kopf's managed webhook mode (``webhook_managed``): the operator itself creates the
ValidatingWebhookConfiguration and keeps it pointing at its webhook server; the chart then
installs none (its RBAC grants create/patch on validatingwebhookconfigurations only in this
mode, checked by k8s-check). Against the Kubernetes API stand-in: it stores the object as an
API server would, but has no admission chain, so the test plays the API server's part and
sends an AdmissionReview to the URL written in the configuration."""

from __future__ import annotations

from typing import Any

import pytest
from operator_testlib import Kube, Operator, eventually

NAME = "crm-operator.crm.platform.io"
VWC = "admissionregistration.k8s.io/v1/validatingwebhookconfigurations"


@pytest.fixture
def managed(operator_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """Managed mode on, set before the ``operator`` fixture starts it."""
    monkeypatch.setenv("CRM_OPERATOR_WEBHOOK_MANAGED", NAME)
    return NAME


async def test_managed_mode_writes_a_configuration_that_reaches_the_validators(
    managed: str, operator: Operator, kube: Kube
) -> None:
    def configured() -> list[dict[str, Any]]:
        obj = kube.server.object(VWC, None, managed)
        return list((obj or {}).get("webhooks") or [])

    webhooks = await eventually(configured, "the operator's webhook configuration")
    by_path = {}
    for hook in webhooks:
        url = hook["clientConfig"]["url"]
        assert url.startswith(operator.webhook_url + "/"), url
        by_path[url.removeprefix(operator.webhook_url + "/")] = hook
    assert {"validate-crmconfig", "validate-bilogsink"} <= set(by_path)
    for path, plural in (
        ("validate-crmconfig", "crmconfigs"),
        ("validate-bilogsink", "bilogsinks"),
    ):
        rules = by_path[path]["rules"]
        assert any(
            "crm.platform.io" in r["apiGroups"] and plural in r["resources"] for r in rules
        ), rules
        assert all(set(r["operations"]) >= {"CREATE", "UPDATE"} for r in rules), rules
        assert by_path[path]["name"].endswith(managed)
        assert by_path[path]["failurePolicy"] == "Fail"  # fail closed: nothing unvalidated

    # the API server's part: an invalid CRMConfig sent where the configuration says
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "u-managed",
            "operation": "CREATE",
            "resource": {
                "group": "crm.platform.io",
                "version": "v1alpha1",
                "resource": "crmconfigs",
            },
            "userInfo": {"username": "ops"},
            "object": {
                "apiVersion": "crm.platform.io/v1alpha1",
                "kind": "CRMConfig",
                "metadata": {"name": "x", "namespace": "default"},
                "spec": {"service": "assignment", "key": "SALE", "data": {"accept_timeout_s": 0}},
            },
        },
    }
    url = by_path["validate-crmconfig"]["clientConfig"]["url"]
    async with kube.session.post(url, json=review) as r:
        assert r.status == 200
        answer = (await r.json())["response"]
    assert answer["uid"] == "u-managed"
    assert not answer["allowed"]
    assert answer["status"]["message"].startswith("spec.data.accept_timeout_s:")
