"""The built-in sink's Deployment against the bilog image it runs: its environment is
made of real ``BilogSettings`` fields the settings class accepts, its args are a
subcommand of the image's entrypoint (``python -m crm_bilog``), and the pod passes the
same workload policy and Kubernetes schemas as the charts' pods (tools/k8s_check.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from crm_bilog.__main__ import CLI as BILOG_CLI
from crm_bilog.settings import BilogSettings
from crm_operator.builtin import (
    DATA_DIR,
    builtin_spec_problems,
    render_deployment,
    sink_environment,
)
from crm_operator.settings import OperatorSettings

ROOT = Path(__file__).resolve().parents[2]


def _spec(**extra: Any) -> dict[str, Any]:
    return {
        "topics": ["bi.task_transition", "bi.fact_call_record"],
        "format": "avro",
        "partitioning": "hourly",
        "flushSize": 250,
        "rotateIntervalMs": 90_500,
        "tasksMax": 1,
        "state": "running",
        "target": {"builtin": {"replicas": 1}},
        **extra,
    }


def _deployment(spec: dict[str, Any] | None = None) -> dict[str, Any]:
    settings = OperatorSettings()
    return render_deployment(
        "files",
        "bi",
        spec or _spec(),
        settings.bilog_sink_image,
        kafka_bootstrap=settings.bilog_sink_kafka_bootstrap,
        schema_registry_url=settings.bilog_sink_schema_registry_url,
    )


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]
    return container


@pytest.fixture
def clean_bilog_env() -> Iterator[None]:
    """No CRM_BILOG_* variable of this process leaks into the settings under test."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("CRM_BILOG_")}
    for key in saved:
        del os.environ[key]
    yield
    for key in [k for k in os.environ if k.startswith("CRM_BILOG_")]:
        del os.environ[key]
    os.environ.update(saved)


def test_every_variable_the_sink_gets_is_a_bilog_setting(clean_bilog_env: None) -> None:
    container = _container(_deployment())
    env = {e["name"]: e["value"] for e in container["env"]}
    prefix = str(BilogSettings.model_config.get("env_prefix"))
    fields = {prefix + name.upper() for name in BilogSettings.model_fields}
    assert set(env) <= fields, sorted(set(env) - fields)
    # and the settings class accepts them, with the spec's meaning
    os.environ.update(env)
    settings = BilogSettings()
    assert settings.sink_topics == "bi.task_transition,bi.fact_call_record"
    assert settings.sink_flush_records == 250
    assert settings.sink_rotate_interval_s == 90.5
    assert str(settings.sink_dir) == DATA_DIR
    assert settings.sink_group_id == "crm-bilog-sink.bi.files"
    assert settings.kafka_bootstrap == OperatorSettings().bilog_sink_kafka_bootstrap
    assert settings.schema_registry_url == OperatorSettings().bilog_sink_schema_registry_url
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert DATA_DIR in mounts


def test_the_args_are_a_bilog_subcommand() -> None:
    args = _container(_deployment())["args"]
    assert BILOG_CLI.parser().parse_args(args).command == "sink"
    # the image's entrypoint is python -m crm_bilog: the args carry the command only
    dockerfile = (ROOT / "services" / "bilog" / "Dockerfile").read_text()
    entrypoint = re.findall(r"^ENTRYPOINT (.+)$", dockerfile, re.M)
    assert [json.loads(e) for e in entrypoint] == [["python", "-m", "crm_bilog"]]
    assert "command" not in _container(_deployment())


def test_sink_group_is_one_per_sink() -> None:
    a = sink_environment("a", "bi", _spec(), kafka_bootstrap="k:9092", schema_registry_url="u")
    b = sink_environment("b", "bi", _spec(), kafka_bootstrap="k:9092", schema_registry_url="u")
    other_ns = sink_environment(
        "a", "x", _spec(), kafka_bootstrap="k:9092", schema_registry_url="u"
    )
    groups = {e["CRM_BILOG_SINK_GROUP_ID"] for e in (a, b, other_ns)}
    assert len(groups) == 3
    assert "crm-bilog-sink" not in groups  # the crm chart's own sink group


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"partitioning": "daily"}, "spec.partitioning"),
        ({"tasksMax": 3}, "spec.tasksMax"),
        ({"rotateIntervalMs": 0}, "spec.rotateIntervalMs"),
        ({"format": "parquet"}, "spec.format"),
    ],
)
def test_spec_fields_without_a_setting_are_refused(extra: dict[str, Any], field: str) -> None:
    assert builtin_spec_problems(_spec()) == []
    problems = builtin_spec_problems(_spec(**extra))
    assert [f for f, _ in problems] == [field]


def _load_k8s_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "k8s_check_for_operator", ROOT / "tools" / "k8s_check.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("claim", ["", "bi-files"])
def test_the_pod_passes_the_charts_workload_policy(claim: str) -> None:
    kc = _load_k8s_check()
    image = "registry.example.com/crm/crm-bilog:0.1.0"  # the operator chart pins the tag
    deployment = _deployment(_spec(target={"builtin": {"claimName": claim, "image": image}}))
    _, pod = kc.pod_template(deployment)
    problems = [
        p
        for c in pod["containers"]
        for p in kc.container_policy_problems(
            "Deployment/bilog-sink-files", pod, c, long_running=True, probes=True
        )
    ]
    assert problems == []
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    assert "terminationGracePeriodSeconds" in pod
    assert kc.kube_schema_problems([deployment], kc.kube_versions()) == []
    data = next(v for v in pod["volumes"] if v["name"] == "data")
    assert ("persistentVolumeClaim" in data) == bool(claim)
