"""Pure parts of the operator: schemas registry, conditions, connector config, manifests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from crm_operator import conditions, manifests, schemas
from crm_operator.builtin import render_deployment, render_network_policy
from crm_operator.connect import connector_config
from crm_operator.settings import OperatorSettings
from crm_operator.statuses import merge_patch
from pydantic import ValidationError

_BUILTIN: dict[str, Any] = {"topics": ["bi.x"], "target": {"builtin": {}}}


def test_registry_imports_the_services_own_parsers() -> None:
    from crm_assignment.config import parse

    assert schemas.parser("assignment") is parse
    for service in schemas.REGISTRY:
        assert schemas.json_schema(service)["type"] == "object"


def test_validate_names_the_field() -> None:
    assert schemas.validate("assignment", "SALE", {"accept_timeout_s": 5}) == (
        b'{"accept_timeout_s":5}'
    )
    with pytest.raises(schemas.ConfigInvalid) as err:
        schemas.validate("assignment", "SALE", {"weights": {"star": "x"}, "bogus": 1})
    assert err.value.field in {"spec.data.weights.star", "spec.data.bogus"}
    assert "(and 1 more)" in err.value.message
    with pytest.raises(schemas.ConfigInvalid, match=r"^spec\.service:"):
        schemas.validate("nope", "SALE", {})
    with pytest.raises(schemas.ConfigInvalid, match=r"^spec\.key:"):
        schemas.validate("assignment", "nope", {})
    # lines are data: a new line is a name with its code; a bad one names the field
    assert schemas.validate("assignment", "LEASING", {"code": 4, "accept_timeout_s": 9}) == (
        b'{"accept_timeout_s":9,"code":4}'
    )
    for data in ({}, {"code": 1}, {"code": "four"}):
        with pytest.raises(schemas.ConfigInvalid, match=r"^spec\.data\.code:"):
            schemas.validate("assignment", "LEASING", data)
    with pytest.raises(schemas.ConfigInvalid, match=r"^spec\.data\.accept_timeout_s:"):
        schemas.validate("assignment", "LEASING", {"code": 4, "accept_timeout_s": 0})
    assert schemas.validate("recommendation", "ranking", {"lines": {"LEASING": {"code": 4}}})
    with pytest.raises(schemas.ConfigInvalid, match=r"^spec\.data\.lines:"):
        schemas.validate("recommendation", "ranking", {"lines": {"LEASING": {}}})


def test_last_transition_time_moves_only_when_status_changes() -> None:
    c1 = conditions.merge(None, [conditions.condition("Ready", "True", "A", "m", 1)], at="t1")
    c2 = conditions.merge(c1, [conditions.condition("Ready", "True", "B", "m2", 2)], at="t2")
    c3 = conditions.merge(c2, [conditions.condition("Ready", "False", "C", "m3", 3)], at="t3")
    assert [c[0]["lastTransitionTime"] for c in (c1, c2, c3)] == ["t1", "t1", "t3"]
    assert c2[0]["observedGeneration"] == 2
    assert c2[0]["reason"] == "B"


def test_merge_patch_removes_keys() -> None:
    assert merge_patch({"a": 1, "b": {"c": 1, "d": 2}}, {"b": {"c": 1}, "e": 3}) == {
        "a": None,
        "b": {"d": None},
        "e": 3,
    }


def test_connector_config_hourly_defaults() -> None:
    cfg = connector_config(
        {"topics": ["a", "b"], "target": {"kafkaConnect": {"url": "http://x"}}}, "ns.n"
    )
    assert cfg["partition.duration.ms"] == "3600000"
    assert cfg["topics"] == "a,b"
    assert cfg["name"] == "ns.n"
    assert cfg["tasks.max"] == "1"


def test_committed_manifests_are_generated() -> None:
    """operator/crds/*.yaml and operator/rbac.yaml are the generated ones (single source:
    run `python -m crm_operator manifests` after changing a schema)."""
    root = Path(__file__).resolve().parents[1]
    for rel, text in manifests.render().items():
        assert (root / rel).read_text() == text, f"{rel} is stale"
    crd = yaml.safe_load((root / "crds/crmconfigs.yaml").read_text())
    data = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    props = data["properties"]["data"]["properties"]
    assert props["accept_timeout_s"] == {"type": "integer", "maximum": 3600, "minimum": 1}


def test_sink_network_policy_setting_is_checked_at_start_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = "CRM_OPERATOR_SINK_NETWORK_POLICY"
    monkeypatch.delenv(env, raising=False)
    assert OperatorSettings().sink_network_policy_spec is None  # default: no policies
    cases = {
        "{not json": "not JSON",
        '["Ingress"]': "must be a JSON object",
        '{"podSelector": {}, "egress": []}': "unknown key(s) podSelector",
        '{"policyTypes": ["Ingress", "Sideways"]}': "policyTypes: must be a non-empty subset",
        '{"policyTypes": []}': "policyTypes: must be a non-empty subset",
        '{"ingress": {"from": []}}': "ingress: must be a list",
        '{"egress": ["port 53"]}': "egress: must be a list",
    }
    for raw, message in cases.items():
        monkeypatch.setenv(env, raw)
        with pytest.raises(ValidationError) as err:
            OperatorSettings()
        assert "sink_network_policy" in str(err.value), raw
        assert message in str(err.value), (raw, str(err.value))
    # normalised like the API server defaults it, so a patch replaces the whole spec
    egress = [{"ports": [{"port": 53, "protocol": "UDP"}]}]
    monkeypatch.setenv(env, json.dumps({"egress": egress}))
    assert OperatorSettings().sink_network_policy_spec == {
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [],
        "egress": egress,
    }
    monkeypatch.setenv(env, '{"policyTypes": ["Egress", "Ingress"]}')
    assert OperatorSettings().sink_network_policy_spec == {
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [],
        "egress": [],
    }


def test_sink_network_policy_selects_exactly_the_sinks_pods() -> None:
    spec = {"policyTypes": ["Ingress"], "ingress": [], "egress": []}
    deployment = render_deployment("files", "bi", _BUILTIN, "crm-bilog:1")
    policy = render_network_policy("files", "bi", spec)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"] == {"matchLabels": labels}
    assert deployment["spec"]["selector"] == {"matchLabels": labels}
    assert policy["metadata"]["name"] == deployment["metadata"]["name"]
    assert policy["metadata"]["namespace"] == "bi"
    other = render_network_policy("other", "bi", spec)
    assert other["spec"]["podSelector"] != policy["spec"]["podSelector"]


def test_rbac_gets_the_policy_rule_only_when_enabled() -> None:
    rule = manifests.SINK_POLICY_RULES[0]
    assert rule not in manifests.cluster_rules()
    assert rule in manifests.cluster_rules(sink_network_policy=True)
    scoped = manifests.rbac(namespaces=["bi"], sink_network_policy=True)
    (role,) = [d for d in scoped if d["kind"] == "Role"]
    assert rule in role["rules"]
    assert rule not in next(d for d in scoped if d["kind"] == "ClusterRole")["rules"]
