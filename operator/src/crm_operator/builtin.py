"""The built-in BI log sink: a Deployment of the bilog image running ``python -m crm_bilog
sink``, managed over the Kubernetes API (``kubernetes`` client in a worker thread, every
call time-boxed).

The image's entrypoint is ``python -m crm_bilog``: the container passes only the command
(``args: ["sink"]``). The BILogSink spec maps onto the sink's own settings
(``crm_bilog.settings.BilogSettings``, ``CRM_BILOG_*``):

==================  =========================================================================
spec                environment of the sink
==================  =========================================================================
topics              ``CRM_BILOG_SINK_TOPICS`` (comma-separated)
flushSize           ``CRM_BILOG_SINK_FLUSH_RECORDS``
rotateIntervalMs    ``CRM_BILOG_SINK_ROTATE_INTERVAL_S`` (seconds; must be > 0)
format              nothing: the sink writes Avro container files only (``avro``)
partitioning        nothing: the sink partitions files by UTC hour (``dt=.../hour=...``);
                    only ``hourly`` is accepted
tasksMax            a Kafka Connect setting; the built-in sink scales with
                    ``target.builtin.replicas`` instead: only 1 is accepted
state               replicas: running -> ``target.builtin.replicas`` (default 1),
                    paused/stopped -> 0
(operator)          ``CRM_BILOG_KAFKA_BOOTSTRAP`` / ``CRM_BILOG_SCHEMA_REGISTRY_URL`` from the
                    operator's settings; ``CRM_BILOG_SINK_GROUP_ID`` =
                    ``crm-bilog-sink.<namespace>.<name>`` (every BILogSink gets every
                    record); ``CRM_BILOG_SINK_DIR`` = the data volume;
                    ``CRM_BILOG_SINK_PORT`` / ``CRM_BILOG_SINK_METRICS_PORT`` = the
                    container ports ``grpc`` (health) and ``metrics``
==================  =========================================================================

Probes are the crm chart's ``bilog.sink`` ones (tools/k8s_check.py compares them): native
gRPC probes on the sink's health port, readiness on :data:`SINK_HEALTH_NAME` (NOT_SERVING
while no broker answers), liveness on ``liveness`` (NOT_SERVING only when the consume loop
is stuck), so a hung sink is restarted and a broker outage is not a restart.

:func:`builtin_spec_problems` names the spec fields the built-in sink cannot honour (the
admission webhook refuses them; the handler reports them as ``Ready=False InvalidSpec``).

With ``CRM_OPERATOR_SINK_NETWORK_POLICY`` set, a NetworkPolicy of the same name selects
exactly that sink's pods (:func:`sink_labels`) in its namespace: the configured ``spec``
(policyTypes, ingress, egress) with ``podSelector`` added (:func:`render_network_policy`).
The crm chart's own policy (``crm.operatorSinkPolicy``) covers only the release's namespace.

The pod runs like every pod of the charts: uid 10001, read-only root filesystem, all
capabilities dropped, seccomp RuntimeDefault, no service-account token, requests and
limits, ``/tmp`` an emptyDir; the files go to ``target.builtin.claimName`` (an existing
PersistentVolumeClaim: one writer, strategy Recreate) or, without it, to an emptyDir
(lost with the pod: development only).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import kubernetes

__all__ = [
    "DATA_DIR",
    "HEALTH_PORT",
    "METRICS_PORT",
    "SINK_ARGS",
    "SINK_HEALTH_NAME",
    "DeploymentClient",
    "NetworkPolicyClient",
    "builtin_spec_problems",
    "deployment_name",
    "probes",
    "render_deployment",
    "render_network_policy",
    "sink_environment",
    "sink_labels",
]

_TIMEOUT = 10.0
RUN_AS_USER = 10001
DATA_DIR = "/var/lib/crm/bilog-sink"
SINK_ARGS = ("sink",)
"""The command passed to the image's entrypoint ``python -m crm_bilog``."""
RESOURCES: dict[str, dict[str, str]] = {
    "requests": {"cpu": "100m", "memory": "192Mi"},
    "limits": {"cpu": "1", "memory": "512Mi"},
}
"""The charts' bilog.sink defaults."""
TERMINATION_GRACE_S = 60
"""Room to publish the open files on SIGTERM."""
HEALTH_PORT = 50057
"""The sink's gRPC health port (``CRM_BILOG_SINK_PORT``)."""
METRICS_PORT = 9157
"""The sink's Prometheus /metrics port (``CRM_BILOG_SINK_METRICS_PORT``)."""
SINK_HEALTH_NAME = "crm.bilog.sink"
"""``crm_bilog.sink.process.SINK_HEALTH_NAME``: the readiness probe's health name."""
LIVENESS_HEALTH_NAME = "liveness"
PROBE_TIMING: dict[str, dict[str, int]] = {
    "startupProbe": {"periodSeconds": 5, "failureThreshold": 60},
    "readinessProbe": {"periodSeconds": 10, "failureThreshold": 3},
    "livenessProbe": {"periodSeconds": 10, "failureThreshold": 6},
}
"""The charts' bilog.sink.probes timing."""


def probes() -> dict[str, dict[str, Any]]:
    """startup/readiness/liveness probes of the sink container (native gRPC)."""
    return {
        kind: {
            "grpc": {
                "port": HEALTH_PORT,
                "service": LIVENESS_HEALTH_NAME if kind == "livenessProbe" else SINK_HEALTH_NAME,
            },
            **timing,
        }
        for kind, timing in PROBE_TIMING.items()
    }


def deployment_name(name: str) -> str:
    return f"bilog-sink-{name}"[:63]


def sink_labels(name: str) -> dict[str, str]:
    """The labels of a sink's Deployment and pods (its selector, and its NetworkPolicy's
    podSelector); name and managed-by are the crm chart's ``crm.operatorSinkLabels``."""
    return {
        "app.kubernetes.io/name": "crm-bilog-sink",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": "crm-operator",
    }


def builtin_spec_problems(spec: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(field path, message)`` of every spec field the built-in sink has no setting for
    (or a value it cannot honour); empty when it can run the spec as declared."""
    problems: list[tuple[str, str]] = []
    if spec.get("format", "avro") != "avro":
        problems.append(("spec.format", "the built-in sink writes Avro files only"))
    if spec.get("partitioning", "hourly") != "hourly":
        problems.append(
            (
                "spec.partitioning",
                "the built-in sink partitions files by hour (dt=YYYY-MM-DD/hour=HH) only; "
                "use hourly or a kafkaConnect target",
            )
        )
    if int(spec.get("tasksMax", 1)) != 1:
        problems.append(
            (
                "spec.tasksMax",
                "a Kafka Connect setting: the built-in sink scales with target.builtin.replicas",
            )
        )
    if int(spec.get("rotateIntervalMs", 600_000)) <= 0:
        problems.append(
            ("spec.rotateIntervalMs", "the built-in sink needs a rotate interval above 0")
        )
    return problems


def sink_environment(
    name: str,
    namespace: str,
    spec: Mapping[str, Any],
    *,
    kafka_bootstrap: str,
    schema_registry_url: str,
) -> dict[str, str]:
    """The ``CRM_BILOG_*`` settings of the sink process for a BILogSink spec."""
    rotate_s = int(spec.get("rotateIntervalMs", 600_000)) / 1000
    return {
        "CRM_BILOG_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "CRM_BILOG_SCHEMA_REGISTRY_URL": schema_registry_url,
        "CRM_BILOG_SINK_TOPICS": ",".join(spec["topics"]),
        "CRM_BILOG_SINK_GROUP_ID": f"crm-bilog-sink.{namespace}.{name}",
        "CRM_BILOG_SINK_DIR": DATA_DIR,
        "CRM_BILOG_SINK_FLUSH_RECORDS": str(int(spec.get("flushSize", 1000))),
        "CRM_BILOG_SINK_ROTATE_INTERVAL_S": str(rotate_s),
        "CRM_BILOG_SINK_PORT": str(HEALTH_PORT),
        "CRM_BILOG_SINK_METRICS_PORT": str(METRICS_PORT),
    }


def render_deployment(
    name: str,
    namespace: str,
    spec: Mapping[str, Any],
    default_image: str,
    *,
    kafka_bootstrap: str = "kafka:9092",
    schema_registry_url: str = "http://schema-registry:8081",
) -> dict[str, Any]:
    """The Deployment of a BILogSink with a ``builtin`` target (see the module doc)."""
    builtin = spec["target"]["builtin"] or {}
    running = spec.get("state", "running") == "running"
    claim = str(builtin.get("claimName") or "")
    labels = sink_labels(name)
    env = sink_environment(
        name,
        namespace,
        spec,
        kafka_bootstrap=kafka_bootstrap,
        schema_registry_url=schema_registry_url,
    )
    data_volume: dict[str, Any] = (
        {"name": "data", "persistentVolumeClaim": {"claimName": claim}}
        if claim
        else {"name": "data", "emptyDir": {"sizeLimit": "1Gi"}}
    )
    strategy: dict[str, Any] = (
        {"type": "Recreate"}  # one writer of the claim at a time
        if claim
        else {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    )
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": deployment_name(name), "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": int(builtin.get("replicas", 1)) if running else 0,
            "selector": {"matchLabels": labels},
            "strategy": strategy,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": RUN_AS_USER,
                        "runAsGroup": RUN_AS_USER,
                        "fsGroup": RUN_AS_USER,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [
                        {
                            "name": "sink",
                            "image": builtin.get("image") or default_image,
                            "args": list(SINK_ARGS),
                            "ports": [
                                {"name": "grpc", "containerPort": HEALTH_PORT, "protocol": "TCP"},
                                {
                                    "name": "metrics",
                                    "containerPort": METRICS_PORT,
                                    "protocol": "TCP",
                                },
                            ],
                            "env": [{"name": k, "value": v} for k, v in env.items()],
                            **probes(),
                            "resources": json.loads(json.dumps(RESOURCES)),
                            "securityContext": {
                                "runAsNonRoot": True,
                                "runAsUser": RUN_AS_USER,
                                "runAsGroup": RUN_AS_USER,
                                "privileged": False,
                                "readOnlyRootFilesystem": True,
                                "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]},
                                "seccompProfile": {"type": "RuntimeDefault"},
                            },
                            "volumeMounts": [
                                {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 (emptyDir)
                                {"name": "data", "mountPath": DATA_DIR},
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
                        data_volume,
                    ],
                },
            },
        },
    }


def render_network_policy(
    name: str, namespace: str, policy_spec: Mapping[str, Any]
) -> dict[str, Any]:
    """The NetworkPolicy of a BILogSink's built-in sink: named like its Deployment,
    selecting exactly its pods, with ``policy_spec`` (policyTypes, ingress, egress: the
    operator's ``sink_network_policy`` setting)."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": deployment_name(name),
            "namespace": namespace,
            "labels": sink_labels(name),
        },
        "spec": {
            "podSelector": {"matchLabels": sink_labels(name)},
            **json.loads(json.dumps(dict(policy_spec))),
        },
    }


class _NamespacedClient:
    """Create/patch/read/delete one namespaced kind by name; raw JSON in and out (no model
    classes). Subclasses name the API class and the kind's snake_case name."""

    _API = ""
    _KIND = ""

    def __init__(self, api_server: str = "") -> None:
        k8s: Any = kubernetes  # raw JSON in and out: the model types do not apply
        if api_server:
            config = k8s.client.Configuration()
            config.host = api_server
            config.verify_ssl = False
            self._api: Any = k8s.client.ApiClient(config)
        else:
            try:
                k8s.config.load_incluster_config()
            except k8s.config.ConfigException:
                k8s.config.load_kube_config()
            self._api = k8s.client.ApiClient()
        group: Any = getattr(k8s.client, self._API)(self._api)
        self._read = getattr(group, f"read_namespaced_{self._KIND}")
        self._create = getattr(group, f"create_namespaced_{self._KIND}")
        self._patch = getattr(group, f"patch_namespaced_{self._KIND}")
        self._delete = getattr(group, f"delete_namespaced_{self._KIND}")

    def close(self) -> None:
        self._api.close()

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        def call() -> dict[str, Any] | None:
            try:
                r = self._read(name, namespace, _preload_content=False, _request_timeout=_TIMEOUT)
            except kubernetes.client.ApiException as exc:
                if exc.status == 404:
                    return None
                raise
            doc: dict[str, Any] = json.loads(r.data)
            return doc

        return await asyncio.to_thread(call)

    async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Create the object, or patch it to the manifest when it exists."""
        ns, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]

        def call() -> dict[str, Any]:
            try:
                r = self._create(ns, manifest, _preload_content=False, _request_timeout=_TIMEOUT)
            except kubernetes.client.ApiException as exc:
                if exc.status != 409:
                    raise
                r = self._patch(
                    name, ns, {"metadata": manifest["metadata"], "spec": manifest["spec"]},
                    _preload_content=False, _request_timeout=_TIMEOUT,
                )  # fmt: skip
            doc: dict[str, Any] = json.loads(r.data)
            return doc

        return await asyncio.to_thread(call)

    async def delete(self, namespace: str, name: str) -> None:
        def call() -> None:
            try:
                self._delete(name, namespace, _preload_content=False, _request_timeout=_TIMEOUT)
            except kubernetes.client.ApiException as exc:
                if exc.status != 404:
                    raise

        await asyncio.to_thread(call)


class DeploymentClient(_NamespacedClient):
    """The sinks' Deployments (apps/v1)."""

    _API = "AppsV1Api"
    _KIND = "deployment"


class NetworkPolicyClient(_NamespacedClient):
    """The sinks' NetworkPolicies (networking.k8s.io/v1)."""

    _API = "NetworkingV1Api"
    _KIND = "network_policy"
