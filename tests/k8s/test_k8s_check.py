"""tools/k8s_check.py: every check passes on the repository, and each one fails when
what it guards is broken (schema, policy, settings drift, network policies, operator
chart drift, rule file, skaffold, Dockerfiles).

No cluster, no helm binary, no Docker engine: the charts are rendered by Helm's Go SDK
(helm-python-sdk) and the Dockerfiles are linted by the real hadolint. Broken inputs are
mutated copies (rendered manifests, values, files in tmp_path), never the repository.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import helm_python
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _load_k8s_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("k8s_check", ROOT / "tools" / "k8s_check.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


kc = _load_k8s_check()
Docs = list[dict[str, Any]]


def _variant(chart: str, name: str) -> Any:
    return next(v for v in kc.VARIANTS if v.chart == chart and v.name == name)


@pytest.fixture(scope="module")
def renders() -> dict[str, Docs]:
    """Every variant rendered once: {"<chart>/<variant>": docs}."""
    return {f"{v.chart}/{v.name}": v.render() for v in kc.VARIANTS}


@pytest.fixture(scope="module")
def default_docs(renders: dict[str, Docs]) -> Docs:
    return renders["crm/default"]


@pytest.fixture(scope="module")
def operator_docs(renders: dict[str, Docs]) -> Docs:
    return renders["crm-operator/default"]


@pytest.fixture(scope="module")
def netpol_render(renders: dict[str, Docs]) -> tuple[Docs, dict[str, Any]]:
    variant = _variant("crm", "everything-on")
    values = kc.deep_merge(kc.chart_defaults(), variant.values())
    return renders["crm/everything-on"], values


def _one(docs: Docs, wanted: str) -> dict[str, Any]:
    found = [d for d in docs if kc.ref(d) == wanted]
    assert len(found) == 1, f"{wanted} not rendered once"
    return found[0]


def _container(doc: dict[str, Any]) -> dict[str, Any]:
    template = kc.pod_template(doc)
    assert template is not None
    container: dict[str, Any] = template[1]["containers"][0]
    return container


def _component(key: str) -> Any:
    return next(c for c in kc.COMPONENTS if c.key == key)


# --------------------------------------------------------------------------- all green


@pytest.mark.parametrize("chart", sorted(kc.CHARTS))
def test_helm_lint_and_values_schema_are_clean(chart: str) -> None:
    assert kc.lint_problems(kc.CHARTS[chart]) == []
    assert kc.values_schema_problems(kc.CHARTS[chart]) == []


@pytest.mark.parametrize("variant", kc.VARIANTS, ids=lambda v: f"{v.chart}/{v.name}")
def test_variant_renders_valid_objects_that_pass_policy(
    variant: Any, renders: dict[str, Docs]
) -> None:
    docs = renders[f"{variant.chart}/{variant.name}"]
    values = kc.deep_merge(kc.chart_defaults(kc.CHARTS[variant.chart]), variant.values())
    assert kc.render_problems(variant, docs) == []
    assert kc.kube_schema_problems(docs, kc.kube_versions(kc.CHARTS[variant.chart])) == []
    assert kc.policy_problems(docs) == []
    assert kc.network_policy_problems(docs, values) == []


def test_process_settings_agree_with_every_render(renders: dict[str, Docs]) -> None:
    assert kc.settings_problems(renders) == []


def test_operator_chart_equals_the_operator_sources(operator_docs: Docs) -> None:
    assert kc.operator_chart_problems(operator_docs) == []


def test_prometheus_rule_file_and_skaffold_and_dockerfiles_are_clean() -> None:
    assert kc.prometheus_rules_problems() == []
    assert kc.skaffold_problems() == []
    files = kc.dockerfiles()
    assert {i.dockerfile for i in kc.IMAGES.values()} == set(files)
    assert kc.hadolint_problems(files) == []
    assert kc.dockerignore_problems() == []
    renders = kc.default_renders()
    for image in kc.IMAGES.values():
        assert kc.dockerfile_problems(image, renders, kc.RUN_AS_USER) == []


def test_kube_versions_cover_chart_minimum_and_newest() -> None:
    versions = kc.kube_versions()
    assert versions[0] == "1.27"
    assert len(versions) == 2


# --------------------------------------------------------------------------- what renders


def test_each_service_switches_off_and_takes_its_wiring_with_it() -> None:
    docs = kc.render_chart("crm", {"recommendation": {"enabled": False}})
    assert not [d for d in docs if "recommendation" in kc.ref(d)]
    env = {e["name"] for e in _container(_one(docs, "Deployment/crm-assignment"))["env"]}
    assert "CRM_ASSIGNMENT_RECOMMENDATION_TARGET" not in env
    assert "CRM_ASSIGNMENT_BILOG_TARGET" in env


def test_wiring_points_at_the_in_release_services(default_docs: Docs) -> None:
    def env(ref: str) -> dict[str, str]:
        container = _container(_one(default_docs, ref))
        return {e["name"]: e.get("value", "<secret>") for e in container["env"]}

    assignment = env("Deployment/crm-assignment")
    assert assignment["CRM_ASSIGNMENT_SCHEDULER_TARGET"] == "crm-scheduler:50053"
    assert assignment["CRM_ASSIGNMENT_SELF_TARGET"] == "crm-assignment:50051"
    assert assignment["CRM_ASSIGNMENT_DATABASE_URL"] == "<secret>"
    bilog = env("Deployment/crm-bilog")
    assert bilog["CRM_BILOG_SCHEMA_REGISTRY_URL"] == "http://crm-bilog-registry:8081"
    assert "CRM_BILOG_DATABASE_URL" not in bilog  # only the registry uses MySQL
    worker = env("Deployment/crm-scheduler-worker")
    assert worker["CRM_SCHEDULER_WORKER_HEALTH_PORT"] == "50055"
    assert worker["CRM_SCHEDULER_REDIS_URL"] == "redis://redis:6379/0"
    assert _container(_one(default_docs, "Deployment/crm-scheduler-pump"))["args"] == ["pump"]


def test_mysql_ca_is_mounted_where_mysql_is_used(
    netpol_render: tuple[Docs, dict[str, Any]],
) -> None:
    docs = netpol_render[0]  # global.mysql.tls.caSecret set

    def mounts(ref: str) -> list[str]:
        return [m["mountPath"] for m in _container(_one(docs, ref))["volumeMounts"]]

    assert "/etc/crm/mysql-tls" in mounts("Deployment/crm-scheduler-worker")
    assert "/etc/crm/mysql-tls" in mounts("Job/crm-bilog-migrate")
    assert "/etc/crm/mysql-tls" not in mounts("Deployment/crm-bilog")
    assert "/etc/crm/mysql-tls" not in mounts("Deployment/crm-bilog-sink")


def test_variant_expectations_catch_a_missing_object(default_docs: Docs) -> None:
    variant = kc.Variant("hpa", expect=kc.VARIANTS[0].expect | {"HorizontalPodAutoscaler/x"})
    assert kc.render_problems(variant, default_docs) == [
        "expected HorizontalPodAutoscaler/x, not rendered"
    ]


def test_main_reports_failure(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = kc.Variant("broken", sets=("assignment.replicaCount=three",))
    monkeypatch.setattr(kc, "VARIANTS", (*kc.VARIANTS, broken))
    assert kc.main([]) == 1
    out = capsys.readouterr().out
    # everything else passes: the repository is clean
    assert "FAIL render crm/broken" in out
    assert "replicaCount" in out
    assert ", 1 failed" in out


# --------------------------------------------------------------------------- chart guards


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"assignment": {"replicaCount": "three"}}, "replicaCount"),
        ({"assignment": {"replicas": 3}}, "replicas"),
        ({"scheduler": {"pump": {"replica": 1}}}, "replica"),
        ({"bilog": {"sink": {"dataDir": "/tmp/files"}}}, "dataDir"),
        ({"global": {"redis": {"url": "http://redis:6379"}}}, "url"),
        ({"assignment": {"resources": {"limits": None}}}, "limits"),
        ({"assignment": {"probes": {"livenessService": ""}}}, "livenessService"),
    ],
)
def test_schema_rejects(values: dict[str, Any], match: str) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=match):
        kc.render_chart("crm", values)


def test_operator_schema_rejects_unknown_keys() -> None:
    with pytest.raises(helm_python.HelmValuesError, match="webhok"):
        kc.render_chart("crm-operator", {"webhok": {}})


@pytest.mark.parametrize(
    ("chart", "values", "match"),
    [
        ("crm", {"assignment": {"terminationGracePeriodSeconds": 12}}, "must exceed"),
        ("crm", {"scheduler": {"worker": {"terminationGracePeriodSeconds": 5}}}, "worker"),
        ("crm", {"assignment": {"env": {"CRM_ASSIGNMENT_PORT": "1"}}}, "CRM_ASSIGNMENT_PORT"),
        (
            "crm",
            {"assignment": {"env": {"CRM_ASSIGNMENT_BILOG_TARGET": "x:1"}}},
            "CRM_ASSIGNMENT_BILOG_TARGET",
        ),
        ("crm", {"bilog": {"registry": {"enabled": False}}}, "schemaRegistry.url"),
        ("crm", {"bilog": {"env": {"CRM_BILOG_TOPIC_PREFIX": "x."}}}, "CRM_BILOG_TOPIC_PREFIX"),
        (
            "crm",
            {"bilog": {"kpi": {"env": {"CRM_BILOG_KPI_PORT": "1"}}}},
            "CRM_BILOG_KPI_PORT",
        ),
        (
            "crm",
            {"prometheusRule": {"enabled": True}, "bilog": {"kpi": {"enabled": False}}},
            "the rules alert on the KPI consumer's metrics",
        ),
        (
            "crm",
            {"prometheusRule": {"enabled": True}, "bilog": {"enabled": False}},
            "the rules alert on the KPI consumer's metrics",
        ),
        ("crm-operator", {"replicaCount": 2}, "peering"),
        ("crm-operator", {"webhook": {"certManager": {"enabled": False}}}, "existingSecret"),
    ],
)
def test_chart_refuses(chart: str, values: dict[str, Any], match: str) -> None:
    with pytest.raises(helm_python.HelmError, match=match):
        kc.render_chart(chart, values)


def test_values_schema_check_catches_an_unregistered_component(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        kc, "COMPONENTS", tuple(c for c in kc.COMPONENTS if c.key != "scheduler/pump")
    )
    problems = kc.values_schema_problems()
    assert any("scheduler/pump is not registered" in p for p in problems)


def test_values_schema_check_catches_an_open_object(tmp_path: Path) -> None:
    chart = tmp_path / "crm"
    shutil.copytree(kc.CHART, chart)
    schema = (chart / "values.schema.json").read_text()
    (chart / "values.schema.json").write_text(
        schema.replace('"additionalProperties": false', '"additionalProperties": true', 1)
    )
    assert any("additionalProperties" in p for p in kc.values_schema_problems(chart))


def test_prometheus_rule_template_refuses_a_file_without_groups(tmp_path: Path) -> None:
    chart = tmp_path / "crm"
    shutil.copytree(kc.CHART, chart)
    (chart / "files" / "prometheus-rules.yaml").write_text("groups: []\n")
    with pytest.raises(helm_python.HelmError, match="at least one group"):
        kc.render({"prometheusRule": {"enabled": True}}, chart_dir=chart)


# --------------------------------------------------------------------------- kubernetes schemas


def test_kube_schema_catches_unknown_fields_and_wrong_types(default_docs: Docs) -> None:
    deployment = copy.deepcopy(_one(default_docs, "Deployment/crm-assignment"))
    deployment["spec"]["replicaz"] = 3
    problems = kc.kube_schema_problems([deployment], ["1.37"])
    assert any("'replicaz' was unexpected" in p for p in problems)
    deployment = copy.deepcopy(_one(default_docs, "Deployment/crm-assignment"))
    _container(deployment)["ports"][0]["containerPort"] = "50051"
    assert kc.kube_schema_problems([deployment], ["1.27"]) != []


def test_chart_crds_are_validated_as_the_api_server_would() -> None:
    crds = kc.chart_crds()
    assert {c["metadata"]["name"] for c in crds} == {
        "crmconfigs.crm.platform.io",
        "bilogsinks.crm.platform.io",
    }
    assert kc.kube_schema_problems(crds, ["1.27", "1.37"]) == []
    crd = copy.deepcopy(crds[0])
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    # JSON Schema's numeric exclusiveMinimum: the API server wants a boolean
    spec["properties"]["broken"] = {"type": "number", "exclusiveMinimum": 0}
    problems = kc.kube_schema_problems([crd], ["1.37"])
    assert any("exclusiveMinimum" in p and "not of type 'boolean'" in p for p in problems)
    assert [kc.crd_structural_problems(c) for c in crds] == [[], []]
    spec["properties"]["untyped"] = {"description": "no type"}
    spec["properties"]["both"] = {
        "type": "object",
        "properties": {"a": {"type": "string"}},
        "additionalProperties": {"type": "string"},
    }
    at = f"{kc.ref(crd)} v1alpha1.spec"
    assert kc.crd_structural_problems(crd) == [
        f"{at}.untyped: no type (structural schemas need one)",
        f"{at}.both: properties and additionalProperties together",
    ]


def test_operator_kinds_are_checked_too(netpol_render: tuple[Docs, dict[str, Any]]) -> None:
    docs, _ = netpol_render
    monitor = copy.deepcopy(_one(docs, "ServiceMonitor/crm-assignment"))
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    rule = copy.deepcopy(_one(docs, "PrometheusRule/crm"))
    del rule["spec"]["groups"][0]["rules"][0]["expr"]
    problems = kc.kube_schema_problems([monitor, rule], ["1.37"])
    assert any("ServiceMonitor/crm-assignment" in p and "intervall" in p for p in problems)
    assert any("PrometheusRule/crm" in p and "expr" in p for p in problems)


# --------------------------------------------------------------------------- policy


def _set(path: str, value: Any) -> Any:
    def mutate(deployment: dict[str, Any]) -> None:
        target: Any = deployment
        *parents, last = path.split(".")
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value

    return mutate


def _all(*mutations: Any) -> Any:
    def mutate(deployment: dict[str, Any]) -> None:
        for mutation in mutations:
            mutation(deployment)

    return mutate


_DELETE = object()
_C = "spec.template.spec.containers.0"

POLICY_BREAKS = {
    "runAsNonRoot": (_set(f"{_C}.securityContext.runAsNonRoot", False), "runAsNonRoot"),
    "root uid": (_set(f"{_C}.securityContext.runAsUser", 0), "runAsUser"),
    "writable root": (_set(f"{_C}.securityContext.readOnlyRootFilesystem", False), "readOnly"),
    "escalation": (_set(f"{_C}.securityContext.allowPrivilegeEscalation", True), "Escalation"),
    "keeps caps": (_set(f"{_C}.securityContext.capabilities.drop", []), "drop ALL"),
    "no seccomp": (
        _all(
            _set(f"{_C}.securityContext.seccompProfile", _DELETE),
            _set("spec.template.spec.securityContext.seccompProfile", _DELETE),
        ),
        "seccompProfile",
    ),
    "no tmp": (_set(f"{_C}.volumeMounts", []), "no writable /tmp"),
    "no readiness": (_set(f"{_C}.readinessProbe", _DELETE), "no readinessProbe"),
    "no liveness": (_set(f"{_C}.livenessProbe", _DELETE), "no livenessProbe"),
    "probe port": (_set(f"{_C}.readinessProbe.grpc.port", 1234), "not a container port"),
    "latest": (_set(f"{_C}.image", "crm-assignment:latest"), "no pinned tag"),
    "no requests": (_set(f"{_C}.resources.requests", _DELETE), "requests.cpu"),
    "no limits": (_set(f"{_C}.resources.limits", _DELETE), "limits.memory"),
    "token": (_set("spec.template.spec.automountServiceAccountToken", True), "automount"),
    "service links": (_set("spec.template.spec.enableServiceLinks", _DELETE), "ServiceLinks"),
    "no scrape": (_set("spec.template.metadata.annotations", {}), "prometheus.io/scrape"),
}


@pytest.mark.parametrize("name", sorted(POLICY_BREAKS))
@pytest.mark.parametrize("target", ["Deployment/crm-assignment", "Deployment/crm-scheduler-worker"])
def test_policy_catches(name: str, target: str, default_docs: Docs) -> None:
    mutate, expected = POLICY_BREAKS[name]
    docs = copy.deepcopy(default_docs)
    mutate(_one(docs, target))
    problems = kc.policy_problems(docs)
    assert any(expected in p and target in p for p in problems), problems


def test_commands_the_chart_passes_exist(default_docs: Docs, operator_docs: Docs) -> None:
    assert kc.command_problems(default_docs) == []
    assert kc.command_problems(operator_docs) == []
    docs = kc.render_chart("crm", {"bilog": {"sink": {"args": ["sinks"]}}})
    assert kc.command_problems(docs) == [
        "Deployment/crm-bilog-sink: args ['sinks'] name no command of python -m crm_bilog "
        "(kpi, migrate, registry, replay, serve, sink)"
    ]
    assert kc.entry_commands(kc.IMAGES["crm-scheduler"]) == {"serve", "pump", "worker", "migrate"}


def test_policy_exempts_no_process_from_probes(default_docs: Docs) -> None:
    assert kc.NO_PROBES == {}
    docs = copy.deepcopy(default_docs)
    sink = _container(_one(docs, "Deployment/crm-bilog-sink"))
    assert sink["livenessProbe"]["grpc"]["service"] == "liveness"
    del sink["livenessProbe"]  # a hung sink consumer would never be restarted
    registry = _container(_one(docs, "Deployment/crm-bilog-registry"))
    del registry["readinessProbe"]
    problems = kc.policy_problems(docs)
    assert problems == [
        "Deployment/crm-bilog-registry container bilog-registry: no readinessProbe",
        "Deployment/crm-bilog-sink container bilog-sink: no livenessProbe",
    ]


def test_operator_sink_deployments_are_checked_like_the_charts() -> None:
    docs = kc.operator_sink_deployments()
    assert kc.operator_sink_problems(docs) == []
    container = docs[0]["spec"]["template"]["spec"]["containers"][0]
    del container["readinessProbe"]
    container["livenessProbe"]["grpc"]["service"] = "crm.bilog.sink"
    problems = kc.operator_sink_problems(docs)
    assert any("no readinessProbe" in p for p in problems)
    assert any("livenessProbe checks health name 'crm.bilog.sink'" in p for p in problems)


def test_policy_lets_only_the_operator_mount_a_token(operator_docs: Docs) -> None:
    assert kc.policy_problems(operator_docs) == []
    docs = copy.deepcopy(operator_docs)
    template = kc.pod_template(_one(docs, "Deployment/crm-operator"))
    assert template is not None
    template[0]["labels"]["app.kubernetes.io/name"] = "crm-something"
    assert any("automountServiceAccountToken" in p for p in kc.policy_problems(docs))


def test_policy_catches_a_service_that_also_selects_the_migrations_job(default_docs: Docs) -> None:
    docs = copy.deepcopy(default_docs)
    del _one(docs, "Service/crm-assignment")["spec"]["selector"]["app.kubernetes.io/component"]
    problems = kc.policy_problems(docs)
    assert any("selector also matches Job/crm-assignment-migrate" in p for p in problems)


def test_policy_catches_replicas_fighting_the_hpa() -> None:
    docs = kc.render_chart("crm", {"scheduler": {"worker": {"autoscaling": {"enabled": True}}}})
    assert kc.policy_problems(docs) == []
    _one(docs, "Deployment/crm-scheduler-worker")["spec"]["replicas"] = 2
    assert any("sets replicas although" in p for p in kc.policy_problems(docs))


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"recommendation": {"replicaCount": 2}}, None),
        ({"recommendation": {"replicaCount": 1}}, None),  # maxUnavailable 1
        (
            {"recommendation": {"podDisruptionBudget": {"minAvailable": 2}}},
            "minAvailable 2 of 2 replica(s) of Deployment/crm-recommendation never allows",
        ),
        (
            {"recommendation": {"podDisruptionBudget": {"minAvailable": "100%"}}},
            "minAvailable 100% of 2 replica(s)",
        ),
        (
            {
                "recommendation": {
                    "podDisruptionBudget": {"minAvailable": 2},
                    "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 4},
                }
            },
            "minAvailable 2 of 2 replica(s)",
        ),
        ({"recommendation": {"podDisruptionBudget": {"maxUnavailable": 0}}}, "maxUnavailable 0"),
    ],
)
def test_policy_catches_a_pdb_that_blocks_drains(
    values: dict[str, Any], expected: str | None
) -> None:
    problems = kc.policy_problems(kc.render_chart("crm", values))
    if expected is None:
        assert problems == []
    else:
        assert [p for p in problems if expected in p] != [], problems


def test_policy_catches_a_service_monitor_on_a_missing_port(
    netpol_render: tuple[Docs, dict[str, Any]],
) -> None:
    docs = copy.deepcopy(netpol_render[0])
    _one(docs, "ServiceMonitor/crm-bilog")["spec"]["endpoints"][0]["port"] = "metric"
    assert any("no selected Service has a port metric" in p for p in kc.policy_problems(docs))


# --------------------------------------------------------------------------- network policies


def _egress_rules(docs: Docs, name: str) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = _one(docs, f"NetworkPolicy/{name}")["spec"]["egress"]
    return rules


def test_netpol_catches_a_configured_call_that_is_blocked(
    netpol_render: tuple[Docs, dict[str, Any]],
) -> None:
    docs, values = copy.deepcopy(netpol_render[0]), netpol_render[1]
    rules = _egress_rules(docs, "crm-assignment")
    rules[:] = [r for r in rules if "crm-bilog" not in str(r.get("to"))]
    problems = kc.network_policy_problems(docs, values)
    assert problems == [
        "Deployment/crm-assignment: egress to Deployment/crm-bilog:50054 "
        "(CRM_ASSIGNMENT_BILOG_TARGET) is not allowed"
    ]


def test_netpol_catches_a_blocked_job_callback(
    netpol_render: tuple[Docs, dict[str, Any]],
) -> None:
    docs, values = copy.deepcopy(netpol_render[0]), netpol_render[1]
    # (an empty `from` would admit everyone: drop the rule)
    del _one(docs, "NetworkPolicy/crm-assignment")["spec"]["ingress"][0]
    problems = kc.network_policy_problems(docs, values)
    assert any(
        "ingress from Deployment/crm-scheduler-worker (job callbacks)" in p for p in problems
    )


def test_netpol_catches_a_blocked_external_endpoint(
    netpol_render: tuple[Docs, dict[str, Any]],
) -> None:
    docs, values = copy.deepcopy(netpol_render[0]), netpol_render[1]
    rules = _egress_rules(docs, "crm-scheduler-pump")
    rules[:] = [r for r in rules if {"port": 6379, "protocol": "TCP"} not in r.get("ports", [])]
    problems = kc.network_policy_problems(docs, values)
    assert problems == [
        "Deployment/crm-scheduler-pump: egress to port 6379 (CRM_SCHEDULER_REDIS_URL) "
        "is not allowed"
    ]


def test_netpol_catches_an_unjustified_peer(netpol_render: tuple[Docs, dict[str, Any]]) -> None:
    docs, values = copy.deepcopy(netpol_render[0]), netpol_render[1]
    ingress = _one(docs, "NetworkPolicy/crm-recommendation")["spec"]["ingress"][0]
    ingress["from"].append(
        {
            "podSelector": {
                "matchLabels": {
                    "app.kubernetes.io/name": "crm-bilog",
                    "app.kubernetes.io/instance": "crm",
                    "app.kubernetes.io/component": "sink",
                }
            }
        }
    )
    problems = kc.network_policy_problems(docs, values)
    assert problems == [
        "Deployment/crm-recommendation: ingress from Deployment/crm-bilog-sink on 50052 (grpc) "
        "is allowed although nothing in that pod's environment calls it"
    ]


def test_netpol_catches_a_pod_left_open(netpol_render: tuple[Docs, dict[str, Any]]) -> None:
    docs = [d for d in netpol_render[0] if kc.ref(d) != "NetworkPolicy/crm-bilog-sink"]
    problems = kc.network_policy_problems(docs, netpol_render[1])
    assert "Deployment/crm-bilog-sink: no NetworkPolicy restricts its ingress" in problems
    assert "Deployment/crm-bilog-sink: no NetworkPolicy restricts its egress" in problems


def test_netpol_isolates_the_migration_jobs_to_mysql_and_dns(
    netpol_render: tuple[Docs, dict[str, Any]],
) -> None:
    docs, values = netpol_render
    policy = _one(docs, "NetworkPolicy/crm-bilog-migrate")
    assert policy["spec"]["ingress"] == []
    ports = sorted(p["port"] for r in policy["spec"]["egress"] for p in r["ports"])
    assert ports == [53, 53, values["global"]["mysql"]["port"]]
    assert policy["metadata"]["annotations"]["helm.sh/hook-weight"] == "-10"  # before the Job
    left_open = [d for d in docs if kc.ref(d) != "NetworkPolicy/crm-bilog-migrate"]
    problems = kc.network_policy_problems(left_open, values)
    assert "Job/crm-bilog-migrate: no NetworkPolicy restricts its ingress" in problems
    assert "Job/crm-bilog-migrate: no NetworkPolicy restricts its egress" in problems


def test_netpol_covers_the_operators_sink_deployments(
    netpol_render: tuple[Docs, dict[str, Any]],
) -> None:
    docs, values = netpol_render
    assert kc.network_policy_problems(docs, values, operator_sinks=True) == []
    sinks = kc.operator_sink_deployments_for(values)
    assert kc.operator_sink_labels().items() <= sinks[0]["metadata"]["labels"].items()
    left_open = [d for d in docs if kc.ref(d) != "NetworkPolicy/crm-operator-bilog-sinks"]
    problems = kc.network_policy_problems(left_open, values, operator_sinks=True)
    assert "Deployment/bilog-sink-files: no NetworkPolicy restricts its egress" in problems
    # the dev registry admits them (they read writer schemas from it)
    registry = copy.deepcopy(docs)
    ingress = _one(registry, "NetworkPolicy/crm-bilog-registry")["spec"]["ingress"][0]
    ingress["from"] = [f for f in ingress["from"] if "crm-operator" not in str(f)]
    problems = kc.network_policy_problems(registry, values, operator_sinks=True)
    assert any(
        "crm-bilog-registry: ingress from Deployment/bilog-sink-files on 8081" in p
        for p in problems
    )


def test_netpol_follows_an_external_schema_registry(renders: dict[str, Docs]) -> None:
    docs = renders["crm/scheduler-api-only+netpol"]
    egress = _egress_rules(docs, "crm-bilog")
    assert {"port": 443, "protocol": "TCP"} in [p for r in egress for p in r.get("ports", [])]
    assert "crm-bilog-registry" not in str(egress)


# --------------------------------------------------------------------------- settings


def test_settings_catch_chart_ports_drifting_from_the_defaults() -> None:
    worker = _component("scheduler/worker")
    cls = kc.load_settings_class(worker.settings)
    drifted = kc.deep_merge(kc.chart_defaults(), {"scheduler": {"worker": {"port": 50056}}})
    assert kc.settings_defaults_problems(worker, cls, drifted) == [
        "scheduler.worker.port is 50056 in values.yaml but the service's default "
        "worker_health_port is 50055"
    ]
    operator = _component("operator")
    cls = kc.load_settings_class(operator.settings)
    drifted = kc.deep_merge(kc.chart_defaults(kc.CHARTS["crm-operator"]), {"healthPort": 8081})
    problems = kc.settings_defaults_problems(operator, cls, drifted)
    assert problems == [
        "crm-operator.healthPort is 8081 in values.yaml but the service's default "
        "url_port:liveness_endpoint is 8080"
    ]


def test_settings_catch_a_container_port_the_process_does_not_serve() -> None:
    pump = _component("scheduler/pump")
    cls = kc.load_settings_class(pump.settings)
    health = kc._resolve(pump.health)
    # a moved port is fine as long as env, container port and probes move together
    docs = kc.render_chart("crm", {"scheduler": {"pump": {"port": 50060}}})
    assert kc.settings_render_problems(pump, cls, docs, health) == []
    _container(_one(docs, "Deployment/crm-scheduler-pump"))["ports"][0]["containerPort"] = 50054
    problems = kc.settings_render_problems(pump, cls, docs, health)
    assert any(
        "container port grpc 50054 but the process serves it on 50060" in p for p in problems
    )


def test_settings_catch_a_probe_on_the_wrong_health_name() -> None:
    server = _component("assignment/server")
    cls = kc.load_settings_class(server.settings)
    health = kc._resolve(server.health)
    assert health == "crm.assignment.v1.AssignmentService"
    docs = kc.render_chart("crm", {"assignment": {"probes": {"readinessService": "crm.Assign"}}})
    problems = kc.settings_render_problems(server, cls, docs, health)
    assert any("readinessProbe checks health name 'crm.Assign'" in p for p in problems)


def test_settings_catch_unknown_and_invalid_environment() -> None:
    server = _component("assignment/server")
    cls = kc.load_settings_class(server.settings)
    docs = kc.render_chart(
        "crm",
        {"assignment": {"env": {"CRM_ASSIGNMENT_NO_SUCH": "1", "CRM_ASSIGNMENT_DB_POOL_SIZE": 0}}},
    )
    problems = kc.settings_render_problems(server, cls, docs, kc._resolve(server.health))
    assert any("CRM_ASSIGNMENT_NO_SUCH is not a setting" in p for p in problems)
    assert any("rejects the rendered environment" in p and "db_pool_size" in p for p in problems)


def test_settings_class_missing_is_a_clear_failure() -> None:
    with pytest.raises(kc.CheckError, match=r"cannot import crm_assignment\.no_such_module"):
        kc.load_settings_class("crm_assignment.no_such_module:Settings")


# --------------------------------------------------------------------------- operator chart


@pytest.fixture
def operator_copy(tmp_path: Path) -> tuple[Path, Path]:
    chart, source = tmp_path / "chart", tmp_path / "operator"
    shutil.copytree(kc.CHARTS["crm-operator"], chart)
    shutil.copytree(kc.OPERATOR_DIR / "crds", source / "crds")
    shutil.copy(kc.OPERATOR_DIR / "rbac.yaml", source / "rbac.yaml")
    return chart, source


def test_operator_check_catches_crd_drift(
    operator_copy: tuple[Path, Path], operator_docs: Docs
) -> None:
    chart, source = operator_copy
    assert kc.operator_chart_problems(operator_docs, chart, source) == []
    crd = source / "crds" / "crmconfigs.yaml"
    crd.write_text(crd.read_text().replace("shortNames:\n    - crmc", "shortNames:\n    - crm"))
    assert kc.operator_chart_problems(operator_docs, chart, source) == [
        "crds/crmconfigs.yaml differs from operator/crds/crmconfigs.yaml "
        "(python tools/k8s_check.py --write)"
    ]
    (chart / "crds" / "bilogsinks.yaml").unlink()
    assert any(
        "crds/bilogsinks.yaml is missing" in p
        for p in kc.operator_chart_problems(operator_docs, chart, source)
    )


def test_operator_check_catches_rbac_beyond_least_privilege(
    operator_copy: tuple[Path, Path], operator_docs: Docs
) -> None:
    chart, source = operator_copy
    docs = copy.deepcopy(operator_docs)
    role = _one(docs, "ClusterRole/crm-operator")
    role["rules"].append({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]})
    role["rules"][0]["verbs"].remove("update")
    problems = kc.operator_chart_problems(docs, chart, source)
    assert any("('secrets',)" in p and "is not needed" in p for p in problems)
    assert any("misses rule" in p and "crmconfigs" in p for p in problems)


def test_operator_rbac_follows_the_webhook_mode_and_the_watched_namespaces(
    renders: dict[str, Docs], operator_docs: Docs
) -> None:
    variant = _variant("crm-operator", "managed-webhook+namespaced")
    values = kc.deep_merge(kc.chart_defaults(kc.CHARTS["crm-operator"]), variant.values())
    scoped = renders["crm-operator/managed-webhook+namespaced"]
    assert kc.operator_chart_problems(scoped, values=values) == []
    roles = {(d["kind"], d["metadata"].get("namespace")) for d in scoped if "Role" in d["kind"]}
    assert ("Role", "crm") in roles
    assert ("Role", "bi") in roles
    cluster = _one(scoped, "ClusterRole/crm-operator")
    assert not any("deployments" in r["resources"] for r in cluster["rules"])
    assert any("validatingwebhookconfigurations" in r["resources"] for r in cluster["rules"])
    assert not [d for d in scoped if d["kind"] == "ValidatingWebhookConfiguration"]
    # the default render (all namespaces, the chart's own webhook configuration) judged
    # against the managed + namespaced mode: every difference is named
    problems = kc.operator_chart_problems(operator_docs, values=values)
    assert any("misses rule" in p and "validatingwebhookconfigurations" in p for p in problems)
    assert any("deployments" in p and "is not needed" in p for p in problems)
    assert any("Role in namespace bi is missing" in p for p in problems)
    assert any("CRM_OPERATOR_WEBHOOK_MANAGED is not set" in p for p in problems)
    assert any("rendered although kopf manages it" in p for p in problems)
    # and the other way round: the scoped render under the default mode
    defaults = kc.chart_defaults(kc.CHARTS["crm-operator"])
    problems = kc.operator_chart_problems(scoped, values=defaults)
    assert any("validatingwebhookconfigurations" in p and "not needed" in p for p in problems)
    assert any("misses rule" in p and "deployments" in p for p in problems)


@pytest.mark.parametrize("name", ["sink-netpol", "sink-netpol+namespaced"])
def test_operator_rbac_covers_the_sink_policies_only_when_enabled(
    renders: dict[str, Docs], operator_docs: Docs, name: str
) -> None:
    variant = _variant("crm-operator", name)
    values = kc.deep_merge(kc.chart_defaults(kc.CHARTS["crm-operator"]), variant.values())
    docs = renders[f"crm-operator/{name}"]
    assert kc.operator_chart_problems(docs, values=values) == []
    # the rule sits beside the Deployments' (ClusterRole or each watched namespace's Role)
    where = [d for d in docs if d["kind"] in ("ClusterRole", "Role")]
    for role in where:
        kinds = {r for rule in role["rules"] for r in rule["resources"]}
        assert ("deployments" in kinds) == ("networkpolicies" in kinds), kc.ref(role)
    assert any("networkpolicies" in str(r["rules"]) for r in where)
    env = {
        e["name"]: e.get("value")
        for e in _one(docs, "Deployment/crm-operator")["spec"]["template"]["spec"]["containers"][0][
            "env"
        ]
    }
    assert env["CRM_OPERATOR_SINK_NETWORK_POLICY"]
    # the default render judged with the policy on: the missing rule and setting named
    problems = kc.operator_chart_problems(operator_docs, values=values)
    if name == "sink-netpol":
        assert any("misses rule" in p and "networkpolicies" in p for p in problems)
    else:
        assert any("Role in namespace bi is missing" in p for p in problems)
    assert any("CRM_OPERATOR_SINK_NETWORK_POLICY is not set" in p for p in problems)
    # and the enabled render judged with it off: the rule and the setting are too much
    defaults = kc.chart_defaults(kc.CHARTS["crm-operator"])
    problems = kc.operator_chart_problems(docs, values={**defaults, "watchNamespaces": []})
    if name == "sink-netpol":
        assert any("networkpolicies" in p and "is not needed" in p for p in problems)
    assert any("may not manage NetworkPolicies" in p for p in problems)


def test_operator_check_catches_a_sink_policy_that_blocks_the_sink(
    renders: dict[str, Docs],
) -> None:
    docs = copy.deepcopy(renders["crm-operator/sink-netpol"])
    assert kc.operator_sink_policy_problems(docs) == []
    env = _one(docs, "Deployment/crm-operator")["spec"]["template"]["spec"]["containers"][0]["env"]
    setting = next(e for e in env if e["name"] == "CRM_OPERATOR_SINK_NETWORK_POLICY")
    only_dns = {"egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]}
    setting["value"] = yaml.safe_dump(only_dns)  # YAML, not JSON
    assert any("not JSON" in p for p in kc.operator_sink_policy_problems(docs))
    setting["value"] = '{"egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]}'
    problems = kc.operator_sink_policy_problems(docs)
    assert any("egress to kafka.crm.svc:9092" in p for p in problems), problems
    assert any("CRM_BILOG_SCHEMA_REGISTRY_URL) is not allowed" in p for p in problems)
    setting["value"] = '{"policyTypes": ["Egress"], "egress": [{}]}'
    problems = kc.operator_sink_policy_problems(docs)
    assert any("no NetworkPolicy restricts its ingress" in p for p in problems), problems


def test_operator_check_catches_a_webhook_to_no_handler(operator_docs: Docs) -> None:
    docs = copy.deepcopy(operator_docs)
    config = _one(docs, "ValidatingWebhookConfiguration/crm-operator.crm-system")
    config["webhooks"][0]["clientConfig"]["service"]["path"] = "/validate-crmconfigs"
    config["webhooks"][1]["rules"][0]["resources"] = ["bilogsink"]
    problems = kc.operator_chart_problems(docs)
    assert any("calls /validate-crmconfigs, not a validating handler" in p for p in problems)
    assert any("handler validate-crmconfig has no webhook" in p for p in problems)
    assert any("bilogsink, which the CRDs do not serve" in p for p in problems)


def test_operator_webhook_ids_are_read_from_the_handlers() -> None:
    assert kc.operator_webhook_ids() == {"validate-crmconfig", "validate-bilogsink"}


# --------------------------------------------------------------------------- rule file


def test_rule_file_check_catches_unknown_metrics_and_bad_rules(tmp_path: Path) -> None:
    # a file of its own: charts/crm/files/prometheus-rules.yaml is edited independently
    path = tmp_path / "prometheus-rules.yaml"
    rules: dict[str, Any] = {
        "groups": [
            {
                "name": "crm-test",
                "rules": [
                    {
                        "alert": "CrmTestErrors",
                        "expr": "sum(rate(crm_grpc_server_handled_total[5m])) > 0",
                        "for": "5m",
                        "labels": {"severity": "warning"},
                        "annotations": {"summary": "{{ $labels.service }} fails"},
                    },
                    {
                        "record": "crm:offers:rate5m",
                        "expr": "rate(crm_assignment_offers_total[5m])",
                    },
                    {
                        "record": "crm:index_bytes",
                        "expr": "max(crm_recommendation_index_bytes)",  # a gauge() helper
                    },
                ],
            }
        ]
    }
    path.write_text(yaml.safe_dump(rules))
    assert kc.prometheus_rules_problems(path) == []
    rules["groups"][0]["rules"][0]["expr"] = "rate(crm_grpc_server_handeld_total[5m]) > 1"
    path.write_text(yaml.safe_dump(rules))
    assert kc.prometheus_rules_problems(path) == [
        "prometheus-rules.yaml: CrmTestErrors uses crm_grpc_server_handeld_total, "
        "which no code defines"
    ]
    del rules["groups"][0]["rules"][0]["expr"]
    path.write_text(yaml.safe_dump(rules))
    assert any("'expr' is a required property" in p for p in kc.prometheus_rules_problems(path))
    rules["groups"][0]["rules"][0]["expr"] = "vector(1)"
    rules["groups"][0]["rules"][0]["for"] = "ten minutes"
    path.write_text(yaml.safe_dump(rules))
    assert any("'ten minutes' does not match" in p for p in kc.prometheus_rules_problems(path))
    path.write_text("groups: [\n")
    assert kc.prometheus_rules_problems(path) != []


# --------------------------------------------------------------------------- skaffold


@pytest.fixture
def skaffold_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((ROOT / "skaffold.yaml").read_text())
    return config


def _release(config: dict[str, Any], name: str) -> dict[str, Any]:
    releases: list[dict[str, Any]] = config["deploy"]["helm"]["releases"]
    return next(r for r in releases if r["name"] == name)


def test_skaffold_catches_a_built_image_the_chart_does_not_use(
    skaffold_config: dict[str, Any],
) -> None:
    templates = _release(skaffold_config, "crm")["setValueTemplates"]
    del templates["bilog.image.repository"], templates["bilog.image.tag"]
    problems = kc.skaffold_problems(config=skaffold_config)
    assert any("runs crm-bilog:0.1.0, which skaffold does not build" in p for p in problems)


def test_skaffold_catches_an_image_no_artifact_builds(skaffold_config: dict[str, Any]) -> None:
    skaffold_config["build"]["artifacts"] = [
        a for a in skaffold_config["build"]["artifacts"] if a["image"] != "crm-operator"
    ]
    for patch in skaffold_config["profiles"][0]["patches"]:
        if patch["path"] == "/build/artifacts/4/sync":
            skaffold_config["profiles"][0]["patches"].remove(patch)
            break
    problems = kc.skaffold_problems(config=skaffold_config)
    assert any("no skaffold artifact builds crm-operator" in p for p in problems)
    assert any("IMAGE_REPO_crm_operator" in p and "names no built artifact" in p for p in problems)


def test_skaffold_catches_an_artifact_built_from_another_dockerfile(
    skaffold_config: dict[str, Any],
) -> None:
    skaffold_config["build"]["artifacts"][1]["docker"]["dockerfile"] = (
        "services/assignment/Dockerfile"
    )
    problems = kc.skaffold_problems(config=skaffold_config)
    assert any(
        "crm-recommendation is built from services/assignment/Dockerfile" in p for p in problems
    )


def test_skaffold_catches_a_chart_no_release_deploys(skaffold_config: dict[str, Any]) -> None:
    releases = skaffold_config["deploy"]["helm"]["releases"]
    releases[:] = [r for r in releases if r["name"] != "crm-operator"]
    skaffold_config["profiles"][0]["patches"] = [
        p for p in skaffold_config["profiles"][0]["patches"] if "releases/1" not in p["path"]
    ]
    problems = kc.skaffold_problems(config=skaffold_config)
    assert any("no Helm release deploys charts/crm-operator" in p for p in problems)


def test_skaffold_catches_schema_violations(skaffold_config: dict[str, Any]) -> None:
    skaffold_config["build"]["artifacts"][0]["dockerfile"] = "services/assignment/Dockerfile"
    problems = kc.skaffold_problems(config=skaffold_config)
    assert any(p.startswith("schema:") for p in problems)


def test_skaffold_catches_a_profile_patch_breaking_the_schema(
    skaffold_config: dict[str, Any],
) -> None:
    patches = skaffold_config["profiles"][0]["patches"]
    patches.append({"op": "add", "path": "/deploy/helm/releases/0/chart", "value": "x"})
    problems = kc.skaffold_problems(config=skaffold_config)
    assert any(p.startswith("profile dev schema:") for p in problems)


def test_skaffold_catches_a_port_forward_to_nothing(skaffold_config: dict[str, Any]) -> None:
    skaffold_config["profiles"][0]["portForward"][0]["resourceName"] = "assignment"
    problems = kc.skaffold_problems(config=skaffold_config)
    assert any("portForward service/assignment:50051 matches nothing" in p for p in problems)


def test_skaffold_catches_sync_onto_the_read_only_root(skaffold_config: dict[str, Any]) -> None:
    sync = skaffold_config["profiles"][0]["patches"][2]["value"]
    sync["manual"][0]["dest"] = "/opt/venv/lib/python3.11/site-packages"
    problems = kc.skaffold_problems(config=skaffold_config)
    assert any(
        "is on the read-only root filesystem of Deployment/crm-scheduler-pump" in p
        for p in problems
    )


def test_skaffold_catches_sync_outside_the_artifacts_own_module(
    skaffold_config: dict[str, Any],
) -> None:
    assert kc.skaffold_problems(config=skaffold_config) == []
    patches = skaffold_config["profiles"][0]["patches"]
    bilog = next(p["value"] for p in patches if p["path"] == "/build/artifacts/3/sync")
    bilog["manual"][0]["strip"] = "services/bilog/"  # lands in /tmp/dev-src/src/crm_bilog
    operator = next(p["value"] for p in patches if p["path"] == "/build/artifacts/4/sync")
    operator["manual"][0] = {  # another package's files into the operator's pod
        "src": "libs/crm_common/src/crm_common/**/*.py",
        "dest": "/tmp/dev-src",
        "strip": "libs/crm_common/src/",
    }
    problems = kc.skaffold_problems(config=skaffold_config)
    assert any(
        "sync of crm-bilog puts services/bilog/src/crm_bilog/" in p
        and "at /tmp/dev-src/src/crm_bilog/" in p
        for p in problems
    )
    assert any("sync of crm-operator puts libs/crm_common/" in p for p in problems)


def test_skaffold_catches_a_sync_dest_off_the_pythonpath(
    skaffold_config: dict[str, Any],
) -> None:
    patches = skaffold_config["profiles"][0]["patches"]
    sched = next(p["value"] for p in patches if p["path"] == "/build/artifacts/2/sync")
    sched["manual"][0]["dest"] = "/tmp/dev-src/crm_scheduler"
    problems = kc.skaffold_problems(config=skaffold_config)
    assert any(
        "sync dest of crm-scheduler is /tmp/dev-src/crm_scheduler but Deployment/crm-scheduler "
        "container scheduler exports PYTHONPATH=/tmp/dev-src" in p
        for p in problems
    )
    assert any("crm_scheduler/crm_scheduler/__init__.py" in p for p in problems)


def test_skaffold_catches_sync_without_the_reload_loop(skaffold_config: dict[str, Any]) -> None:
    patches = skaffold_config["profiles"][0]["patches"]
    patches[:] = [p for p in patches if "releases/1/valuesFiles" not in p["path"]]
    problems = kc.skaffold_problems(config=skaffold_config)
    assert any(
        "stops the process of /tmp/dev-server.pid but Deployment/crm-bilog-sink" in p
        for p in problems
    )


def test_json_patch_add_replace_remove() -> None:
    doc = {"a": [1, 2], "b": {"c": 1}}
    patched = kc.json_patch(
        doc,
        [
            {"op": "add", "path": "/a/-", "value": 3},
            {"op": "add", "path": "/a/0", "value": 0},
            {"op": "replace", "path": "/b/c", "value": 2},
            {"op": "add", "path": "/b/d", "value": {"e": 1}},
            {"op": "remove", "path": "/a/1"},
        ],
    )
    assert patched == {"a": [0, 2, 3], "b": {"c": 2, "d": {"e": 1}}}
    assert doc == {"a": [1, 2], "b": {"c": 1}}
    with pytest.raises(kc.CheckError):
        kc.json_patch(doc, [{"op": "replace", "path": "/z", "value": 1}])


# --------------------------------------------------------------------------- Dockerfiles


def test_hadolint_catches_a_careless_dockerfile(tmp_path: Path) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM python\nRUN pip install requests\nCMD python app.py\n")
    problems = "\n".join(kc.hadolint_problems([dockerfile]))
    assert "DL3006" in problems  # untagged base image
    assert "DL3013" in problems  # unpinned pip install
    assert "DL3025" in problems  # CMD not in JSON form


def test_images_install_their_workspace_closure() -> None:
    assert kc.image_packages(kc.IMAGES["crm-scheduler"]) == [
        "libs/crm_proto",
        "libs/crm_common",
        "services/scheduler",
    ]
    operator = kc.image_packages(kc.IMAGES["crm-operator"])
    assert operator[-1] == "operator"
    assert {"services/assignment", "services/recommendation", "services/bilog"} <= set(operator)
    assert "libs/crm_devstack" not in operator


def test_dockerfile_check_catches_drift_from_the_template(tmp_path: Path) -> None:
    image = kc.IMAGES["crm-bilog"]
    renders = kc.default_renders()
    path = tmp_path / "Dockerfile"
    text = image.dockerfile.read_text()
    path.write_text(text)
    assert kc.dockerfile_problems(image, renders, kc.RUN_AS_USER, path) == []
    exposed = "EXPOSE 8081 9154 9156 9157 50054 50056 50057"
    path.write_text(text.replace(exposed, "EXPOSE 9154 50054"))
    problems = kc.dockerfile_problems(image, renders, kc.RUN_AS_USER, path)
    assert any("differs from the template" in p for p in problems)
    assert any(
        "EXPOSE [9154, 50054] but the charts use ports "
        "[8081, 9154, 9156, 9157, 50054, 50056, 50057]" in p
        for p in problems
    )
    path.write_text(text.replace("USER 10001:10001", "USER 0"))
    problems = kc.dockerfile_problems(image, renders, kc.RUN_AS_USER, path)
    assert any("USER 0 but the charts run as uid 10001" in p for p in problems)
    path.write_text(text.replace("COPY libs/crm_common/ libs/crm_common/\n", ""))
    problems = kc.dockerfile_problems(image, renders, kc.RUN_AS_USER, path)
    assert any("its workspace closure is" in p for p in problems)


def test_dockerfile_check_follows_chart_ports() -> None:
    image = kc.IMAGES["crm-recommendation"]
    moved = [kc.render_chart("crm", {"recommendation": {"metricsPort": 9999}})]
    problems = kc.dockerfile_problems(image, moved, kc.RUN_AS_USER)
    assert any("EXPOSE [9152, 50052] but the charts use ports [9999, 50052]" in p for p in problems)


def test_dockerignore_must_let_every_package_in(tmp_path: Path) -> None:
    path = tmp_path / ".dockerignore"
    path.write_text((ROOT / ".dockerignore").read_text().replace("!operator\n", ""))
    assert kc.dockerignore_problems(path) == [
        ".dockerignore does not let operator into the build context (crm-operator)"
    ]


def test_an_image_registry_entry_names_its_dockerfile() -> None:
    fake = dataclasses.replace(kc.IMAGES["crm-bilog"], package="services/nowhere")
    with pytest.raises(kc.CheckError, match="no workspace package"):
        kc.image_packages(fake)


def test_settings_catch_a_target_the_chart_does_not_wire(default_docs: Docs) -> None:
    server = _component("assignment/server")
    cls = kc.load_settings_class(server.settings)
    docs = copy.deepcopy(default_docs)
    container = _container(_one(docs, "Deployment/crm-assignment"))
    container["env"] = [e for e in container["env"] if e["name"] != "CRM_ASSIGNMENT_BILOG_TARGET"]
    problems = kc.settings_render_problems(server, cls, docs, kc._resolve(server.health))
    assert problems == [
        "Deployment/crm-assignment container assignment: CRM_ASSIGNMENT_BILOG_TARGET is not set "
        "although the release runs crm-bilog (crm.topology calls)"
    ]


# --------------------------------------------------------------------------- bilog.kpi


def _env(docs: Docs, ref: str) -> dict[str, str]:
    return {e["name"]: e.get("value", "<secret>") for e in _container(_one(docs, ref))["env"]}


def test_kpi_consumer_renders_with_bilog(default_docs: Docs) -> None:
    kpi = _one(default_docs, "Deployment/crm-bilog-kpi")
    container = _container(kpi)
    assert container["args"] == ["kpi"]
    assert container["image"].startswith("crm-bilog:")
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "grpc": 50056,
        "metrics": 9156,
    }
    assert container["readinessProbe"]["grpc"] == {"port": 50056, "service": "crm.bilog.kpi"}
    assert container["startupProbe"]["grpc"] == {"port": 50056, "service": "crm.bilog.kpi"}
    assert container["livenessProbe"]["grpc"] == {"port": 50056, "service": "liveness"}
    annotations = kpi["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9156"
    assert annotations["prometheus.io/scrape"] == "true"
    assert _one(default_docs, "PodDisruptionBudget/crm-bilog-kpi")["spec"]["maxUnavailable"] == 1
    # the same topics, brokers and registry as the intake and the sink
    env = _env(default_docs, "Deployment/crm-bilog-kpi")
    assert env["CRM_BILOG_KPI_PORT"] == "50056"
    assert env["CRM_BILOG_KPI_METRICS_PORT"] == "9156"
    shared = (
        "CRM_BILOG_KAFKA_BOOTSTRAP",
        "CRM_BILOG_SCHEMA_REGISTRY_URL",
        "CRM_BILOG_TOPIC_PREFIX",
    )
    for other in ("Deployment/crm-bilog-sink", "Deployment/crm-bilog"):
        assert {k: env[k] for k in shared} == {k: _env(default_docs, other)[k] for k in shared}
    assert env["CRM_BILOG_TOPIC_PREFIX"] == "bi."
    # its own health name is the one the KPI server registers
    assert kc._resolve(_component("bilog/kpi").health) == "crm.bilog.kpi"


def test_topic_prefix_reaches_every_bilog_process() -> None:
    docs = kc.render_chart("crm", {"global": {"kafka": {"topicPrefix": "prod.bi."}}})
    for ref in ("Deployment/crm-bilog", "Deployment/crm-bilog-sink", "Deployment/crm-bilog-kpi"):
        assert _env(docs, ref)["CRM_BILOG_TOPIC_PREFIX"] == "prod.bi."


def test_kpi_consumer_switches_off(renders: dict[str, Docs]) -> None:
    docs = renders["crm/bilog-kpi-off"]
    assert not [kc.ref(d) for d in docs if "crm-bilog-kpi" in kc.ref(d)]
    assert "Deployment/crm-bilog-sink" in {kc.ref(d) for d in docs}
    # and takes its wiring with it: the registry no longer admits it
    values = {"bilog": {"kpi": {"enabled": False}}, "global": {"networkPolicy": {"enabled": True}}}
    docs = kc.render_chart("crm", values)
    registry = _one(docs, "NetworkPolicy/crm-bilog-registry")["spec"]["ingress"][0]["from"]
    assert [
        p["podSelector"]["matchLabels"].get("app.kubernetes.io/component", "operator's sinks")
        for p in registry
    ] == ["server", "sink", "operator's sinks"]
    assert kc.network_policy_problems(docs, kc.deep_merge(kc.chart_defaults(), values)) == []
    # bilog off takes the KPI consumer along
    docs = kc.render_chart("crm", {"bilog": {"enabled": False}})
    assert not [kc.ref(d) for d in docs if "crm-bilog" in kc.ref(d)]


def test_kpi_network_policy_is_kafka_and_registry_out_prometheus_in(
    netpol_render: tuple[Docs, dict[str, Any]],
) -> None:
    docs, values = netpol_render
    spec = _one(docs, "NetworkPolicy/crm-bilog-kpi")["spec"]
    assert spec["ingress"] == [
        {
            "from": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                    }
                }
            ],
            "ports": [{"port": "metrics", "protocol": "TCP"}],
        }
    ]
    ports = sorted(p["port"] for r in spec["egress"] for p in r.get("ports", []))
    # DNS, the OpenTelemetry collector (global.tracing on), the in-release registry, Kafka
    assert ports == [53, 53, 4317, 8081, 9092]
    assert "registry" in str(spec["egress"])
    # the registry admits it; nothing else may call it
    registry = str(_one(docs, "NetworkPolicy/crm-bilog-registry")["spec"]["ingress"])
    assert "'kpi'" in registry
    broken = copy.deepcopy(docs)
    _egress_rules(broken, "crm-bilog-kpi")[:] = [
        r for r in _egress_rules(broken, "crm-bilog-kpi") if "registry" not in str(r)
    ]
    assert kc.network_policy_problems(broken, values) == [
        "Deployment/crm-bilog-kpi: egress to Deployment/crm-bilog-registry:8081 "
        "(CRM_BILOG_SCHEMA_REGISTRY_URL) is not allowed"
    ]


def test_settings_catch_kpi_ports_and_health_drift() -> None:
    kpi = _component("bilog/kpi")
    cls = kc.load_settings_class(kpi.settings)
    drifted = kc.deep_merge(kc.chart_defaults(), {"bilog": {"kpi": {"metricsPort": 9157}}})
    assert kc.settings_defaults_problems(kpi, cls, drifted) == [
        "bilog.kpi.metricsPort is 9157 in values.yaml but the service's default "
        "kpi_metrics_port is 9156"
    ]
    health = kc._resolve(kpi.health)
    docs = kc.render_chart(
        "crm", {"bilog": {"kpi": {"probes": {"readinessService": "crm.bilog.v1.BilogService"}}}}
    )
    problems = kc.settings_render_problems(kpi, cls, docs, health)
    assert any(
        "Deployment/crm-bilog-kpi" in p
        and "readinessProbe checks health name 'crm.bilog.v1.BilogService'" in p
        for p in problems
    )
    docs = kc.render_chart("crm", {})
    _container(_one(docs, "Deployment/crm-bilog-kpi"))["ports"][1]["containerPort"] = 9154
    problems = kc.settings_render_problems(kpi, cls, docs, health)
    assert any(
        "container port metrics 9154 but the process serves it on 9156" in p for p in problems
    )


def test_alert_rules_are_served_by_the_kpi_consumer() -> None:
    rules = kc.load_yaml(kc.CHART / "files" / "prometheus-rules.yaml")
    metrics = kc.rule_metrics(rules)
    assert "crm_kpi_window_offers" in metrics
    assert not any(":" in m for m in metrics)  # recording-rule names are not metrics
    for metric in metrics:
        assert [c.key for c in kc.serving_components(metric)] == ["bilog/kpi"], metric
    assert kc.serving_components("crm_grpc_server_handled_total") == []


def test_rule_scrape_check_passes_where_rules_render(renders: dict[str, Docs]) -> None:
    with_rules = [
        k for k, docs in renders.items() if any(d["kind"] == "PrometheusRule" for d in docs)
    ]
    assert sorted(with_rules) == ["crm/everything-on", "crm/production"]
    for label in with_rules:
        assert kc.rule_scrape_problems(renders[label]) == [], label
    # pod annotations instead of ServiceMonitors
    docs = kc.render_chart("crm", {"prometheusRule": {"enabled": True}})
    assert kc.rule_scrape_problems(docs) == []


def test_rule_scrape_check_catches_an_unscraped_kpi_consumer(renders: dict[str, Docs]) -> None:
    docs = [d for d in renders["crm/production"] if kc.ref(d) != "ServiceMonitor/crm-bilog-kpi"]
    problems = kc.rule_scrape_problems(docs)
    assert problems
    assert all(
        "no ServiceMonitor selects the metrics port of Deployment/crm-bilog-kpi" in p
        for p in problems
    )
    assert any("crm_kpi_tasks_waiting" in p for p in problems)
    # a ServiceMonitor on the wrong port does not count either
    docs = copy.deepcopy(renders["crm/production"])
    _one(docs, "ServiceMonitor/crm-bilog-kpi")["spec"]["endpoints"][0]["port"] = "grpc"
    assert kc.rule_scrape_problems(docs) != []
    # annotation mode: the annotations are the scrape config
    docs = kc.render_chart("crm", {"prometheusRule": {"enabled": True}})
    template = kc.pod_template(_one(docs, "Deployment/crm-bilog-kpi"))
    assert template is not None
    template[0]["annotations"] = {}
    assert any("no scrape annotation on" in p for p in kc.rule_scrape_problems(docs))


def test_rule_scrape_check_catches_rules_without_their_process(renders: dict[str, Docs]) -> None:
    docs = [d for d in renders["crm/production"] if "crm-bilog-kpi" not in kc.ref(d)]
    problems = kc.rule_scrape_problems(docs)
    assert any(
        "alerts on crm_kpi_agents of bilog/kpi, which the release does not run" in p
        for p in problems
    )
    docs = copy.deepcopy(renders["crm/production"])
    rule = _one(docs, "PrometheusRule/crm")
    rule["spec"]["groups"][0]["rules"][0]["expr"] = "sum(crm_grpc_server_in_flight) > 10"
    assert any(
        "crm_grpc_server_in_flight is served by no process known here" in p
        for p in kc.rule_scrape_problems(docs)
    )


def test_netpol_does_not_open_endpoints_the_operator_only_hands_on(
    renders: dict[str, Docs], monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = renders["crm-operator/production"]
    variant = _variant("crm-operator", "production")
    values = kc.deep_merge(kc.chart_defaults(kc.CHARTS["crm-operator"]), variant.values())
    env = _env(docs, "Deployment/crm-operator")
    assert env["CRM_OPERATOR_BILOG_SINK_KAFKA_BOOTSTRAP"] == "crm-kafka-bootstrap.kafka.svc:9092"
    assert kc.network_policy_problems(docs, values) == []
    monkeypatch.setattr(kc, "HANDED_ON_ENV", {})
    assert kc.network_policy_problems(docs, values) == [
        "Deployment/crm-operator: egress to crm-kafka-bootstrap.kafka.svc:9092 "
        "(CRM_OPERATOR_BILOG_SINK_KAFKA_BOOTSTRAP) is not allowed",
        "Deployment/crm-operator: egress to schema-registry.kafka.svc:8081 "
        "(CRM_OPERATOR_BILOG_SINK_SCHEMA_REGISTRY_URL) is not allowed",
    ]


# --------------------------------------------------------------------------- job targets, docs


def test_scheduler_job_targets_are_what_the_workers_reach(
    netpol_render: tuple[Docs, dict[str, Any]],
) -> None:
    docs, values = netpol_render
    assert kc.job_target_problems(docs, values) == []
    assert _env(docs, "Deployment/crm-scheduler")[kc.ALLOWED_TARGETS_ENV] == (
        "crm.assignment.v1.AssignmentService"
    )
    # a prefix (the setting's own default) would let jobs name unreachable services
    wide = copy.deepcopy(docs)
    for env in _container(_one(wide, "Deployment/crm-scheduler"))["env"]:
        if env["name"] == kc.ALLOWED_TARGETS_ENV:
            env["value"] = "crm."
    problems = kc.job_target_problems(wide, values)
    assert any("'crm.' is a prefix or wildcard" in p for p in problems)
    assert any("the workers' NetworkPolicy lets them reach" in p for p in problems)
    # an extra target is listed with the in-release one
    extra = {"scheduler": {"jobTargets": {"extraServices": ["crm.billing.v1.BillingService"]}}}
    docs = kc.render_chart("crm", extra)
    assert _env(docs, "Deployment/crm-scheduler")[kc.ALLOWED_TARGETS_ENV] == (
        "crm.assignment.v1.AssignmentService,crm.billing.v1.BillingService"
    )
    assert kc.job_target_problems(docs, kc.deep_merge(kc.chart_defaults(), extra)) == []


def test_install_commands_in_the_docs_create_their_namespace(tmp_path: Path) -> None:
    assert kc.install_docs_problems() == []
    (tmp_path / "README.md").write_text(
        "```sh\nhelm upgrade --install crm charts/crm -n crm -f values.yaml\n```\n"
    )
    problems = kc.install_docs_problems(tmp_path, ["README.md"])
    assert problems == [
        "README.md:2: crm is installed without --create-namespace",
        "README.md:2: the crm chart's install is not preceded by a pointer to the Secrets it "
        "reads first (docs/kubernetes.md §3)",
    ]


def test_tracing_is_off_by_default_and_wires_every_grpc_process_when_on(
    default_docs: Docs, renders: dict[str, Docs]
) -> None:
    def traced(docs: Docs) -> dict[str, str]:
        out = {}
        for doc in docs:
            template = kc.pod_template(doc)
            for c in template[1]["containers"] if template else []:
                for e in c.get("env") or []:
                    if e["name"].endswith("_TRACING_EXPORTER"):
                        out[kc.ref(doc)] = e["value"]
        return out

    assert traced(default_docs) == {}
    on = renders["crm/everything-on"]
    exporters = traced(on)
    assert set(exporters.values()) == {"otlp"}
    assert "Deployment/crm-bilog-sink" in exporters
    assert "Deployment/crm-bilog-registry" not in exporters  # no gRPC server kit
    assert not [r for r in exporters if r.startswith("Job/")]
    egress = _egress_rules(on, "crm-scheduler-worker")
    assert {"port": 4317, "protocol": "TCP"} in [p for r in egress for p in r.get("ports", [])]
