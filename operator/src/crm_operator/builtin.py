"""The built-in BI log sink: a Deployment of the bilog sink image, managed over the
Kubernetes API (``kubernetes`` client in a worker thread, every call time-boxed).

The sink process reads its settings from ``CRM_BILOG_SINK_*`` environment variables
(topics, format, partitioning, flush size, rotate interval); ``state`` maps to replicas:
running -> ``target.builtin.replicas`` (default 1), paused/stopped -> 0.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import kubernetes

__all__ = ["DeploymentClient", "deployment_name", "render_deployment"]

_TIMEOUT = 10.0


def deployment_name(name: str) -> str:
    return f"bilog-sink-{name}"[:63]


def render_deployment(
    name: str, namespace: str, spec: Mapping[str, Any], default_image: str
) -> dict[str, Any]:
    builtin = spec["target"]["builtin"] or {}
    running = spec.get("state", "running") == "running"
    labels = {
        "app.kubernetes.io/name": "crm-bilog-sink",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": "crm-operator",
    }
    env = {
        "CRM_BILOG_SINK_NAME": name,
        "CRM_BILOG_SINK_TOPICS": ",".join(spec["topics"]),
        "CRM_BILOG_SINK_FORMAT": spec.get("format", "avro"),
        "CRM_BILOG_SINK_PARTITIONING": spec.get("partitioning", "hourly"),
        "CRM_BILOG_SINK_FLUSH_SIZE": str(spec.get("flushSize", 1000)),
        "CRM_BILOG_SINK_ROTATE_INTERVAL_MS": str(spec.get("rotateIntervalMs", 600_000)),
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": deployment_name(name), "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": int(builtin.get("replicas", 1)) if running else 0,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "securityContext": {"runAsNonRoot": True},
                    "containers": [
                        {
                            "name": "sink",
                            "image": builtin.get("image") or default_image,
                            "args": ["python", "-m", "crm_bilog.sink"],
                            "env": [{"name": k, "value": v} for k, v in env.items()],
                            "securityContext": {
                                "readOnlyRootFilesystem": True,
                                "allowPrivilegeEscalation": False,
                            },
                        }
                    ],
                },
            },
        },
    }


class DeploymentClient:
    """Create/patch/read/delete Deployments; raw JSON in and out (no model classes)."""

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
        self._apps: Any = k8s.client.AppsV1Api(self._api)

    def close(self) -> None:
        self._api.close()

    async def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        def call() -> dict[str, Any] | None:
            try:
                r = self._apps.read_namespaced_deployment(
                    name, namespace, _preload_content=False, _request_timeout=_TIMEOUT
                )
            except kubernetes.client.ApiException as exc:
                if exc.status == 404:
                    return None
                raise
            doc: dict[str, Any] = json.loads(r.data)
            return doc

        return await asyncio.to_thread(call)

    async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Create the Deployment, or patch it to the manifest when it exists."""
        ns, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]

        def call() -> dict[str, Any]:
            try:
                r = self._apps.create_namespaced_deployment(
                    ns, manifest, _preload_content=False, _request_timeout=_TIMEOUT
                )
            except kubernetes.client.ApiException as exc:
                if exc.status != 409:
                    raise
                r = self._apps.patch_namespaced_deployment(
                    name, ns, {"metadata": manifest["metadata"], "spec": manifest["spec"]},
                    _preload_content=False, _request_timeout=_TIMEOUT,
                )  # fmt: skip
            doc: dict[str, Any] = json.loads(r.data)
            return doc

        return await asyncio.to_thread(call)

    async def delete(self, namespace: str, name: str) -> None:
        def call() -> None:
            try:
                self._apps.delete_namespaced_deployment(
                    name, namespace, _preload_content=False, _request_timeout=_TIMEOUT
                )
            except kubernetes.client.ApiException as exc:
                if exc.status != 404:
                    raise

        await asyncio.to_thread(call)
