"""CRDs and RBAC of the operator, generated from Python (the single source).

``python -m crm_operator manifests [DIR]`` writes ``crds/crmconfigs.yaml``,
``crds/bilogsinks.yaml`` and ``rbac.yaml`` (default DIR: the operator/ directory); a test
checks the committed files equal the generated ones. CRMConfig's ``spec.data`` carries the
services' JSON Schemas (exported from the same pydantic models the services validate
with) as a structural schema: the API server checks types and bounds, the admission
webhook checks everything else exactly like the service.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from crm_operator import schemas
from crm_operator.connect import RESERVED_CONFIG

__all__ = [
    "CLUSTER_RULES",
    "SINK_POLICY_RULES",
    "SINK_RULES",
    "WEBHOOK_RULES",
    "bilogsink_crd",
    "cluster_rules",
    "crmconfig_crd",
    "rbac",
    "sink_rules",
    "write_all",
]

GROUP = "crm.platform.io"
VERSION = "v1alpha1"

_DROP = {"title", "default", "$defs", "additionalProperties", "propertyNames", "examples"}


def _structural(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """pydantic JSON Schema -> a Kubernetes structural schema (refs inlined, unsupported
    keywords dropped, maps as additionalProperties)."""
    if "$ref" in schema:
        return _structural(copy.deepcopy(defs[schema["$ref"].split("/")[-1]]), defs)
    if "anyOf" in schema:  # Optional[X] -> X (nullable)
        options = [s for s in schema["anyOf"] if s.get("type") != "null"]
        if len(options) == 1:
            inner = _structural(options[0], defs)
            inner["nullable"] = True
            return inner
        return {"x-kubernetes-preserve-unknown-fields": True}
    out: dict[str, Any] = {k: v for k, v in schema.items() if k not in _DROP}
    # JSON Schema's numeric exclusive bounds -> OpenAPI v3.0's (the API server decodes
    # exclusiveMinimum/exclusiveMaximum as booleans and rejects a number)
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(out.get(bound), int | float) and not isinstance(out[bound], bool):
            out[limit], out[bound] = out[bound], True
    if "properties" in schema:
        out["properties"] = {k: _structural(v, defs) for k, v in schema["properties"].items()}
    if schema.get("type") == "object" and isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = _structural(schema["additionalProperties"], defs)
    if "items" in schema:
        out["items"] = _structural(schema["items"], defs)
    if (
        out.get("type") == "object"
        and "properties" not in out
        and "additionalProperties" not in out
    ):
        out["x-kubernetes-preserve-unknown-fields"] = True
    if "description" in out:
        out["description"] = str(out["description"])[:300]
    return out


def _data_schema() -> dict[str, Any]:
    """spec.data: the union of the services' value schemas (a property that two services
    declare differently is left free-form; the webhook checks it)."""
    props: dict[str, Any] = {}
    conflicts: set[str] = set()
    for service in sorted(schemas.REGISTRY):
        js = schemas.json_schema(service)
        for name, prop in js.get("properties", {}).items():
            s = _structural(prop, js.get("$defs", {}))
            if name in props and props[name] != s:
                conflicts.add(name)
            props.setdefault(name, s)
    for name in conflicts:
        props[name] = {"x-kubernetes-preserve-unknown-fields": True}
    services = ", ".join(
        f"{s.service} (keys {', '.join(s.keys)}{' ' + s.other_keys if s.other_keys else ''}: "
        f"{s.model})"
        for s in schemas.REGISTRY.values()
    )
    return {
        "type": "object",
        "description": "The config value, validated by the service's own schema: " + services,
        "properties": dict(sorted(props.items())),
        "x-kubernetes-preserve-unknown-fields": True,
    }


def _conditions() -> dict[str, Any]:
    return {
        "type": "array",
        "description": "Ready (and Synced for CRMConfig): True/False/Unknown; "
        "lastTransitionTime moves only when status changes.",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": {
            "type": "object",
            "required": ["type", "status"],
            "properties": {
                "type": {"type": "string"},
                "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
                "reason": {"type": "string"},
                "message": {"type": "string"},
                "lastTransitionTime": {"type": "string", "format": "date-time"},
                "observedGeneration": {"type": "integer", "nullable": True},
            },
        },
    }


def _ready_column() -> dict[str, Any]:
    return {
        "name": "Ready",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
    }


def _age() -> dict[str, Any]:
    return {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


def _crd(
    kind: str,
    plural: str,
    short: list[str],
    spec: dict[str, Any],
    status: dict[str, Any],
    columns: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "crm"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short,
                "categories": ["crm"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "required": ["spec"],
                            "properties": {
                                "spec": spec,
                                "status": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                    "properties": status,
                                },
                            },
                        }
                    },
                }
            ],
        },
    }


def crmconfig_crd() -> dict[str, Any]:
    spec = {
        "type": "object",
        "required": ["service", "key", "data"],
        "x-kubernetes-validations": [
            {
                "rule": "self.service == oldSelf.service && self.key == oldSelf.key",
                "message": "service and key are immutable",
            },
        ],
        "properties": {
            "service": {
                "type": "string",
                "enum": sorted(schemas.REGISTRY),
                "description": "The service that reads the key.",
            },
            "key": {
                "type": "string",
                "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
                "description": "The config key (a business line for assignment); etcd key "
                "<config_prefix>/<service>/<key>.",
            },
            "data": _data_schema(),
            "rollout": {
                "type": "object",
                "description": "Roll spec.data out to a share of the instances first "
                "(stable hash of the instance name); 100 or no rollout promotes it.",
                "required": ["percent"],
                "properties": {"percent": {"type": "integer", "minimum": 0, "maximum": 100}},
            },
        },
    }
    status = {
        "observedGeneration": {"type": "integer"},
        "revision": {"type": "integer", "description": "etcd mod revision of the stable key."},
        "rollout": {
            "type": "object",
            "nullable": True,
            "properties": {"percent": {"type": "integer"}, "revision": {"type": "integer"}},
        },
        "history": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "revision": {"type": "integer"},
                    "generation": {"type": "integer", "nullable": True},
                    "time": {"type": "string"},
                },
            },
        },
        "appliedBy": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "instance": {"type": "string"},
                    "revision": {"type": "integer"},
                    "candidate": {"type": "boolean"},
                    "time": {"type": "string"},
                },
            },
        },
        "appliedCount": {"type": "integer"},
        "instances": {"type": "integer"},
        "conditions": _conditions(),
    }
    columns = [
        {"name": "Service", "type": "string", "jsonPath": ".spec.service"},
        {"name": "Key", "type": "string", "jsonPath": ".spec.key"},
        {"name": "Version", "type": "integer", "jsonPath": ".status.revision"},
        _ready_column(),
        {"name": "Applied", "type": "integer", "jsonPath": ".status.appliedCount"},
        {
            "name": "Rollout",
            "type": "integer",
            "jsonPath": ".status.rollout.percent",
            "priority": 1,
        },
        _age(),
    ]
    return _crd("CRMConfig", "crmconfigs", ["crmc"], spec, status, columns)


def bilogsink_crd() -> dict[str, Any]:
    reserved = ", ".join(sorted(RESERVED_CONFIG))
    spec = {
        "type": "object",
        "required": ["topics", "target"],
        "properties": {
            "topics": {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
            "format": {"type": "string", "enum": ["avro"], "default": "avro"},
            "partitioning": {
                "type": "string",
                "enum": ["hourly", "daily"],
                "default": "hourly",
                "description": "Time partitioning of the files.",
            },
            "flushSize": {"type": "integer", "minimum": 1, "default": 1000},
            "rotateIntervalMs": {"type": "integer", "minimum": 0, "default": 600000},
            "tasksMax": {"type": "integer", "minimum": 1, "default": 1},
            "state": {
                "type": "string",
                "enum": ["running", "paused", "stopped"],
                "default": "running",
            },
            "target": {
                "type": "object",
                "description": "Exactly one of kafkaConnect, builtin.",
                "x-kubernetes-validations": [
                    {
                        "rule": "has(self.kafkaConnect) != has(self.builtin)",
                        "message": "set exactly one of kafkaConnect, builtin",
                    },
                ],
                "properties": {
                    "kafkaConnect": {
                        "type": "object",
                        "required": ["url"],
                        "properties": {
                            "url": {"type": "string", "pattern": "^https?://"},
                            "connectorClass": {"type": "string"},
                            "config": {
                                "type": "object",
                                "additionalProperties": {"type": "string"},
                                "description": "Extra connector settings (e.g. hdfs.url). "
                                f"Reserved (derived from the typed fields): {reserved}.",
                            },
                        },
                    },
                    "builtin": {
                        "type": "object",
                        "description": "A Deployment of the bilog sink (python -m crm_bilog "
                        "sink) writing hourly-partitioned Avro files; format avro, "
                        "partitioning hourly and tasksMax 1 only.",
                        "properties": {
                            "image": {"type": "string"},
                            "replicas": {"type": "integer", "minimum": 1, "default": 1},
                            "claimName": {
                                "type": "string",
                                "description": "Existing PersistentVolumeClaim for the files "
                                "(one writer: keep replicas 1 unless it is ReadWriteMany); "
                                "empty: an emptyDir, lost with the pod (development only).",
                            },
                        },
                    },
                },
            },
        },
    }
    status = {
        "observedGeneration": {"type": "integer"},
        "connectorName": {"type": "string"},
        "connectorStatus": {
            "type": "object",
            "nullable": True,
            "x-kubernetes-preserve-unknown-fields": True,
        },
        "deployment": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        "conditions": _conditions(),
    }
    columns = [
        {"name": "State", "type": "string", "jsonPath": ".spec.state"},
        {"name": "Connector", "type": "string", "jsonPath": ".status.connectorStatus.state"},
        _ready_column(),
        {
            "name": "Connect",
            "type": "string",
            "jsonPath": ".spec.target.kafkaConnect.url",
            "priority": 1,
        },
        _age(),
    ]
    return _crd("BILogSink", "bilogsinks", ["bls"], spec, status, columns)


CLUSTER_RULES: list[dict[str, Any]] = [
    {
        "apiGroups": [GROUP],
        "resources": ["crmconfigs", "bilogsinks"],
        "verbs": ["get", "list", "watch", "patch", "update"],
    },
    {
        "apiGroups": [GROUP],
        "resources": ["crmconfigs/status", "bilogsinks/status"],
        "verbs": ["get", "patch", "update"],
    },
    # kopf: discovery of the served resources and namespaces
    {
        "apiGroups": ["apiextensions.k8s.io"],
        "resources": ["customresourcedefinitions"],
        "verbs": ["get", "list", "watch"],
    },
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
    # kopf: Events about the objects (Written, DriftRepaired, RolledBack, TaskRestarted, ...)
    {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create"]},
]
"""What the operator calls cluster-wide whatever it watches."""

SINK_RULES: list[dict[str, Any]] = [
    # the builtin BILogSink target: crm_operator.builtin.DeploymentClient (read, create,
    # patch, delete one Deployment by name; it never lists or watches them)
    {
        "apiGroups": ["apps"],
        "resources": ["deployments"],
        "verbs": ["get", "create", "patch", "delete"],
    },
]
"""What the operator calls in the namespaces it serves: a Role per watched namespace
(CRM_OPERATOR_NAMESPACES), in the ClusterRole only when it serves all of them."""

SINK_POLICY_RULES: list[dict[str, Any]] = [
    # each builtin sink's NetworkPolicy (CRM_OPERATOR_SINK_NETWORK_POLICY):
    # crm_operator.builtin.NetworkPolicyClient, by name like the Deployment
    {
        "apiGroups": ["networking.k8s.io"],
        "resources": ["networkpolicies"],
        "verbs": ["get", "create", "patch", "delete"],
    },
]
"""Beside SINK_RULES (same place), only when the sinks get a NetworkPolicy."""

WEBHOOK_RULES: list[dict[str, Any]] = [
    # kopf keeps its ValidatingWebhookConfiguration current (CRM_OPERATOR_WEBHOOK_MANAGED)
    {
        "apiGroups": ["admissionregistration.k8s.io"],
        "resources": ["validatingwebhookconfigurations"],
        "verbs": ["get", "list", "watch", "create", "patch"],
    },
]
"""Only in kopf's managed webhook mode; otherwise the chart installs the configuration."""


def sink_rules(*, sink_network_policy: bool = False) -> list[dict[str, Any]]:
    """The rules of the built-in sinks' objects (ClusterRole or a Role per namespace)."""
    return [*SINK_RULES, *(SINK_POLICY_RULES if sink_network_policy else [])]


def cluster_rules(
    *,
    webhook_managed: bool = False,
    namespaces: Sequence[str] = (),
    sink_network_policy: bool = False,
) -> list[dict[str, Any]]:
    """The ClusterRole's rules for a mode: everything the operator calls on the API."""
    rules = list(CLUSTER_RULES)
    if not namespaces:
        rules += sink_rules(sink_network_policy=sink_network_policy)
    if webhook_managed:
        rules += WEBHOOK_RULES
    return rules


def rbac(
    namespace: str = "crm-system",
    name: str = "crm-operator",
    *,
    webhook_managed: bool = False,
    namespaces: Sequence[str] = (),
    sink_network_policy: bool = False,
) -> list[dict[str, Any]]:
    """ServiceAccount, ClusterRole and its binding, and a Role + RoleBinding (the sink
    Deployments, and their NetworkPolicies with ``sink_network_policy``) in each of
    ``namespaces`` (none: the ClusterRole has those rules).
    Peering (several replicas) needs kopf's peering CRDs and get/list/watch/patch on
    them in addition."""
    meta = {"name": name, "labels": {"app.kubernetes.io/name": name}}
    subjects = [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {**meta, "namespace": namespace},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": meta,
            "rules": cluster_rules(
                webhook_managed=webhook_managed,
                namespaces=namespaces,
                sink_network_policy=sink_network_policy,
            ),
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": meta,
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": name,
            },
            "subjects": subjects,
        },
    ]
    for ns in namespaces:
        docs += [
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {**meta, "namespace": ns},
                "rules": sink_rules(sink_network_policy=sink_network_policy),
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {**meta, "namespace": ns},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                "subjects": subjects,
            },
        ]
    return docs


HEADER = "# Generated by `python -m crm_operator manifests`; do not edit by hand.\n"


def render() -> dict[str, str]:
    """{relative path: YAML text} of every generated manifest."""

    def dump(doc: Any) -> str:
        text: str = yaml.safe_dump(doc, sort_keys=False, width=100)
        return text

    # the default mode: every namespace, the webhook configuration installed by the chart
    every: str = yaml.safe_dump_all(rbac(), sort_keys=False, width=100)
    return {
        "crds/crmconfigs.yaml": HEADER + dump(crmconfig_crd()),
        "crds/bilogsinks.yaml": HEADER + dump(bilogsink_crd()),
        "rbac.yaml": HEADER + every,
    }


def write_all(root: Path) -> list[Path]:
    written = []
    for rel, text in render().items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written
