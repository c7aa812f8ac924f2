"""tools/k8s_check.py: every check passes on the repository, and each one fails when
what it guards is broken (schema, policy, settings drift, skaffold, Dockerfiles).

No cluster, no helm binary, no Docker engine: the chart is rendered by Helm's Go SDK
(helm-python-sdk) and the Dockerfiles are linted by the real hadolint.
"""

from __future__ import annotations

import copy
import importlib.util
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


@pytest.fixture(scope="module")
def default_docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = kc.render({})
    return docs


def _one(docs: list[dict[str, Any]], wanted: str) -> dict[str, Any]:
    found = [d for d in docs if kc.ref(d) == wanted]
    assert len(found) == 1, f"{wanted} not rendered once"
    return found[0]


def _container(doc: dict[str, Any]) -> dict[str, Any]:
    template = kc.pod_template(doc)
    assert template is not None
    container: dict[str, Any] = template[1]["containers"][0]
    return container


# --------------------------------------------------------------------------- all green


def test_helm_lint_is_clean() -> None:
    assert kc.lint_problems() == []


def test_values_schema_and_service_registry() -> None:
    assert kc.values_schema_problems() == []


@pytest.mark.parametrize("variant", kc.VARIANTS, ids=lambda v: v.name)
def test_variant_renders_valid_objects_that_pass_policy(variant: Any) -> None:
    docs = kc.render(variant.values())
    assert kc.render_problems(variant, docs) == []
    assert kc.kube_schema_problems(docs, kc.kube_versions()) == []
    assert kc.policy_problems(docs) == []
    for service in kc.SERVICES:
        settings_cls = kc.load_settings_class(service)
        assert kc.settings_render_problems(service, settings_cls, docs) == []


def test_chart_ports_are_the_service_default_settings() -> None:
    for service in kc.SERVICES:
        settings_cls = kc.load_settings_class(service)
        assert kc.settings_defaults_problems(service, settings_cls, kc.chart_defaults()) == []


def test_kube_versions_cover_chart_minimum_and_newest() -> None:
    versions = kc.kube_versions()
    assert versions[0] == "1.27"
    assert len(versions) == 2


def test_skaffold_config_is_valid_and_consistent() -> None:
    assert kc.skaffold_problems() == []


def test_dockerfiles_pass_hadolint_and_match_the_chart(default_docs: list[dict[str, Any]]) -> None:
    files = kc.dockerfiles()
    assert ROOT / "services" / "assignment" / "Dockerfile" in files
    assert kc.hadolint_problems(files) == []
    uid = kc._chart_run_as_user(default_docs)
    assert uid == 10001
    for service in kc.SERVICES:
        assert kc.dockerfile_service_problems(service, kc.chart_defaults(), uid) == []


def test_main_reports_success(capsys: pytest.CaptureFixture[str]) -> None:
    assert kc.main() == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out
    assert ", 0 failed" in out


# --------------------------------------------------------------------------- schema


def test_schema_rejects_a_string_replica_count() -> None:
    with pytest.raises(helm_python.HelmValuesError, match="replicaCount"):
        kc.render({"assignment": {"replicaCount": "three"}})


def test_schema_rejects_unknown_keys_in_a_service_block() -> None:
    with pytest.raises(helm_python.HelmValuesError, match="replicas"):
        kc.render({"assignment": {"replicas": 3}})


def test_removing_limits_is_caught_by_schema_and_by_policy(
    default_docs: list[dict[str, Any]],
) -> None:
    with pytest.raises(helm_python.HelmValuesError, match="limits"):
        kc.render({"assignment": {"resources": {"limits": None}}})
    # and if a template ever dropped them on its own, the policy check still fails
    docs = copy.deepcopy(default_docs)
    del _container(_one(docs, "Deployment/crm-assignment"))["resources"]["limits"]
    problems = kc.policy_problems(docs)
    assert any("resources.limits.memory is not set" in p for p in problems)
    assert any("resources.limits.cpu is not set" in p for p in problems)


def test_chart_refuses_a_grace_period_shorter_than_the_drain() -> None:
    with pytest.raises(helm_python.HelmError, match="must exceed"):
        kc.render({"assignment": {"terminationGracePeriodSeconds": 12}})


def test_chart_refuses_env_that_overrides_a_chart_owned_setting() -> None:
    with pytest.raises(helm_python.HelmError, match="CRM_ASSIGNMENT_PORT"):
        kc.render({"assignment": {"env": {"CRM_ASSIGNMENT_PORT": "1234"}}})


# --------------------------------------------------------------------------- variants


def test_variant_expectations_catch_a_missing_object(default_docs: list[dict[str, Any]]) -> None:
    variant = kc.Variant("hpa", expect=kc.VARIANTS[0].expect | {"HorizontalPodAutoscaler/x"})
    assert kc.render_problems(variant, default_docs) == [
        "expected HorizontalPodAutoscaler/x, not rendered"
    ]


def test_main_reports_failure(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = kc.Variant("broken", sets=("assignment.replicaCount=three",))
    monkeypatch.setattr(kc, "VARIANTS", (*kc.VARIANTS, broken))
    assert kc.main() == 1
    out = capsys.readouterr().out
    assert "FAIL render broken" in out
    assert "replicaCount" in out


# --------------------------------------------------------------------------- kubernetes schemas


def test_kube_schema_catches_unknown_fields_and_wrong_types(
    default_docs: list[dict[str, Any]],
) -> None:
    deployment = copy.deepcopy(_one(default_docs, "Deployment/crm-assignment"))
    deployment["spec"]["replicaz"] = 3
    problems = kc.kube_schema_problems([deployment], ["1.37"])
    assert any("'replicaz' was unexpected" in p for p in problems)
    deployment = copy.deepcopy(_one(default_docs, "Deployment/crm-assignment"))
    _container(deployment)["ports"][0]["containerPort"] = "50051"
    assert kc.kube_schema_problems([deployment], ["1.27"]) != []


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
    "no readiness": (_set(f"{_C}.readinessProbe", _DELETE), "no readinessProbe"),
    "no liveness": (_set(f"{_C}.livenessProbe", _DELETE), "no livenessProbe"),
    "probe port": (_set(f"{_C}.readinessProbe.grpc.port", 1234), "not a container port"),
    "latest": (_set(f"{_C}.image", "crm-assignment:latest"), "no pinned tag"),
    "no requests": (_set(f"{_C}.resources.requests", _DELETE), "requests.cpu"),
    "token": (_set("spec.template.spec.automountServiceAccountToken", True), "automount"),
    "service links": (_set("spec.template.spec.enableServiceLinks", _DELETE), "ServiceLinks"),
    "no scrape": (
        _set("spec.template.metadata.annotations", {}),
        "prometheus.io/scrape",
    ),
}


@pytest.mark.parametrize("name", sorted(POLICY_BREAKS))
def test_policy_catches(name: str, default_docs: list[dict[str, Any]]) -> None:
    mutate, expected = POLICY_BREAKS[name]
    docs = copy.deepcopy(default_docs)
    mutate(_one(docs, "Deployment/crm-assignment"))
    problems = kc.policy_problems(docs)
    assert any(expected in p for p in problems), problems


def test_policy_catches_a_service_that_also_selects_the_migrations_job(
    default_docs: list[dict[str, Any]],
) -> None:
    docs = copy.deepcopy(default_docs)
    del _one(docs, "Service/crm-assignment")["spec"]["selector"]["app.kubernetes.io/component"]
    problems = kc.policy_problems(docs)
    assert any("selector also matches Job/crm-assignment-migrate" in p for p in problems)


def test_policy_catches_replicas_fighting_the_hpa() -> None:
    docs = kc.render({"assignment": {"autoscaling": {"enabled": True}}})
    assert kc.policy_problems(docs) == []
    _one(docs, "Deployment/crm-assignment")["spec"]["replicas"] = 2
    assert any("sets replicas although" in p for p in kc.policy_problems(docs))


# --------------------------------------------------------------------------- settings


def test_settings_catch_chart_ports_drifting_from_the_service_defaults() -> None:
    settings_cls = kc.load_settings_class("assignment")
    drifted = kc.deep_merge(kc.chart_defaults(), {"assignment": {"port": 50052}})
    problems = kc.settings_defaults_problems("assignment", settings_cls, drifted)
    assert problems == [
        "assignment.port is 50052 in values.yaml but the service's default port is 50051"
    ]


def test_settings_catch_a_container_port_the_service_does_not_listen_on() -> None:
    settings_cls = kc.load_settings_class("assignment")
    # a moved port is fine as long as env, container port and probes move together
    docs = kc.render({"assignment": {"port": 50052}})
    assert kc.settings_render_problems("assignment", settings_cls, docs) == []
    _container(_one(docs, "Deployment/crm-assignment"))["ports"][0]["containerPort"] = 50051
    problems = kc.settings_render_problems("assignment", settings_cls, docs)
    assert any("container port grpc 50051 but the service listens on 50052" in p for p in problems)


def test_settings_catch_unknown_and_invalid_environment() -> None:
    settings_cls = kc.load_settings_class("assignment")
    docs = kc.render(
        {"assignment": {"env": {"CRM_ASSIGNMENT_NO_SUCH": "1", "CRM_ASSIGNMENT_DB_POOL_SIZE": 0}}}
    )
    problems = kc.settings_render_problems("assignment", settings_cls, docs)
    assert any("CRM_ASSIGNMENT_NO_SUCH is not a setting" in p for p in problems)
    assert any("rejects the rendered environment" in p and "db_pool_size" in p for p in problems)


def test_settings_class_missing_is_a_clear_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(kc.SERVICES, "assignment", "crm_assignment.no_such_module:Settings")
    with pytest.raises(kc.CheckError, match=r"cannot import crm_assignment\.no_such_module"):
        kc.load_settings_class("assignment")


# --------------------------------------------------------------------------- skaffold


@pytest.fixture
def skaffold_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((ROOT / "skaffold.yaml").read_text())
    return config


def test_skaffold_catches_a_built_image_the_chart_does_not_use(
    skaffold_config: dict[str, Any],
) -> None:
    del skaffold_config["deploy"]["helm"]["releases"][0]["setValueTemplates"]
    problems = kc.skaffold_problems(config=skaffold_config)
    assert any("runs crm-assignment:0.1.0, which skaffold does not build" in p for p in problems)
    assert any(
        "artifact crm-assignment is built but no rendered workload uses it" in p for p in problems
    )


def test_skaffold_catches_a_template_naming_no_artifact(skaffold_config: dict[str, Any]) -> None:
    templates = skaffold_config["deploy"]["helm"]["releases"][0]["setValueTemplates"]
    templates["assignment.image.tag"] = "{{.IMAGE_TAG_crm_assignmnt}}"
    problems = kc.skaffold_problems(config=skaffold_config)
    assert any("IMAGE_TAG_crm_assignmnt" in p and "names no built artifact" in p for p in problems)


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
    sync = skaffold_config["profiles"][0]["patches"][0]["value"]
    sync["manual"][0]["dest"] = "/opt/venv/lib/python3.11/site-packages"
    problems = kc.skaffold_problems(config=skaffold_config)
    assert any("is on the read-only root filesystem" in p for p in problems)


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


def test_dockerfile_must_match_the_chart_ports_and_user() -> None:
    drifted = kc.deep_merge(kc.chart_defaults(), {"assignment": {"metricsPort": 9999}})
    problems = kc.dockerfile_service_problems("assignment", drifted, 1000)
    assert any("EXPOSE [9151, 50051]" in p for p in problems)
    assert any("USER 10001 but the chart runs as uid 1000" in p for p in problems)
