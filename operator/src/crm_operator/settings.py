"""Operator settings, read from ``CRM_OPERATOR_<SETTING>`` environment variables."""

from __future__ import annotations

import json
from functools import cached_property
from typing import Any

from crm_common.settings import ServiceSettings
from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

__all__ = ["SINK_POLICY_KEYS", "OperatorSettings", "parse_sink_network_policy"]

SINK_POLICY_KEYS = ("policyTypes", "ingress", "egress")
"""What ``sink_network_policy`` may hold: a NetworkPolicy spec without its podSelector."""
_POLICY_TYPES = ("Ingress", "Egress")


def parse_sink_network_policy(raw: str) -> dict[str, Any] | None:
    """``CRM_OPERATOR_SINK_NETWORK_POLICY`` -> the NetworkPolicy spec of every built-in
    sink (without podSelector), or None when empty. Normalised so that a patch replaces
    the whole spec: ``ingress`` and ``egress`` are always present (empty: nothing allowed
    for a listed policy type) and ``policyTypes`` defaults like the API server's (Ingress,
    plus Egress when egress rules are given). Raises ValueError naming what is wrong."""
    if not raw.strip():
        return None
    try:
        spec = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(spec, dict):
        raise ValueError(
            f"must be a JSON object (a NetworkPolicy spec without podSelector: "
            f"{', '.join(SINK_POLICY_KEYS)}), got {type(spec).__name__}"
        )
    unknown = sorted(set(spec) - set(SINK_POLICY_KEYS))
    if unknown:
        raise ValueError(
            f"unknown key(s) {', '.join(unknown)}: only {', '.join(SINK_POLICY_KEYS)} "
            "(the operator sets podSelector to the sink's pods)"
        )
    for key in ("ingress", "egress"):
        rules = spec.get(key, [])
        if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
            raise ValueError(f"{key}: must be a list of NetworkPolicy rules (objects)")
    types = spec.get("policyTypes")
    if types is None:
        types = ["Ingress", *(["Egress"] if spec.get("egress") else [])]
    if not isinstance(types, list) or not types or not set(types) <= set(_POLICY_TYPES):
        raise ValueError(f"policyTypes: must be a non-empty subset of {list(_POLICY_TYPES)}")
    return {
        "policyTypes": [t for t in _POLICY_TYPES if t in types],
        "ingress": spec.get("ingress", []),
        "egress": spec.get("egress", []),
    }


class OperatorSettings(ServiceSettings):
    """Settings of ``python -m crm_operator`` (``host``/``port`` are unused: no gRPC)."""

    model_config = SettingsConfigDict(env_prefix="CRM_OPERATOR_", extra="ignore")

    metrics_port: int = Field(
        default=9464, ge=-1, le=65535, description="Prometheus /metrics port; -1 disables it."
    )
    namespaces: str = Field(
        default="",
        description="Comma-separated namespaces (globs allowed) to serve; empty: all namespaces.",
    )
    liveness_endpoint: str = Field(
        default="http://0.0.0.0:8080/healthz",
        description="kopf's liveness endpoint (probes: GET it); empty disables it.",
    )
    peering: str = Field(
        default="",
        description="kopf peering name for several replicas (needs kopf's peering CRDs); "
        "empty: standalone, run exactly one replica (Deployment strategy Recreate).",
    )
    webhook_port: int = Field(default=9443, ge=0, le=65535, description="Admission webhook port.")
    webhook_host: str = Field(
        default="",
        description="Host name the API server reaches the webhook at (the Service's DNS name); "
        "empty: 127.0.0.1 and plain HTTP (local runs and tests only).",
    )
    webhook_cert_file: str = Field(default="", description="TLS certificate of the webhook.")
    webhook_key_file: str = Field(default="", description="TLS private key of the webhook.")
    webhook_ca_file: str = Field(
        default="",
        description="CA of the webhook's certificate, written into the configuration kopf "
        "manages (webhook_managed); empty: kopf's own choice.",
    )
    webhook_managed: str = Field(
        default="",
        description="Name of the ValidatingWebhookConfiguration kopf keeps up to date "
        "(e.g. crm-operator.crm.platform.io); empty: installed by the chart.",
    )
    history_limit: int = Field(
        default=10, ge=1, le=100, description="Past versions kept per CRMConfig (rollback)."
    )
    status_interval_s: float = Field(
        default=5.0, gt=0, description="How often acks are mirrored into CRMConfig status."
    )
    drift_resync_s: float = Field(
        default=30.0,
        gt=0,
        description="Backstop full comparison of etcd with the declared values (the watch "
        "repairs drift at once; this catches a lost watch).",
    )
    connect_timeout_s: float = Field(
        default=10.0, gt=0, description="Time box of one Kafka Connect REST call."
    )
    sink_poll_interval_s: float = Field(
        default=15.0, gt=0, description="How often connector/task states are polled."
    )
    task_restart_backoff_s: float = Field(
        default=10.0, gt=0, description="First delay before restarting a failed task again."
    )
    task_restart_backoff_max_s: float = Field(
        default=600.0, gt=0, description="Cap of the exponential task restart backoff."
    )
    bilog_sink_image: str = Field(
        default="crm-bilog:latest", description="Image of the built-in BI log sink."
    )
    bilog_sink_kafka_bootstrap: str = Field(
        default="kafka:9092",
        description="Kafka bootstrap servers the built-in sinks read (their "
        "CRM_BILOG_KAFKA_BOOTSTRAP).",
    )
    bilog_sink_schema_registry_url: str = Field(
        default="http://crm-bilog-registry.crm.svc:8081",
        description="Schema registry of the built-in sinks (their CRM_BILOG_SCHEMA_REGISTRY_URL); "
        "the default is the crm chart's dev registry of release crm in namespace crm.",
    )
    sink_network_policy: str = Field(
        default="",
        description="JSON NetworkPolicy spec without podSelector (policyTypes, ingress, "
        "egress): each built-in sink gets a NetworkPolicy with it that selects its pods, in "
        "its namespace; empty: none (and no RBAC on networkpolicies needed).",
    )
    kube_api_server: str = Field(
        default="",
        description="Kubernetes API URL for the operator's own API calls (Deployments, "
        "NetworkPolicies); empty: "
        "in-cluster config, else ~/.kube/config. Only for local runs and tests.",
    )

    @field_validator("sink_network_policy")
    @classmethod
    def _check_sink_network_policy(cls, value: str) -> str:
        parse_sink_network_policy(value)
        return value

    @cached_property
    def sink_network_policy_spec(self) -> dict[str, Any] | None:
        """The validated, normalised ``sink_network_policy`` (None: no policies)."""
        return parse_sink_network_policy(self.sink_network_policy)

    @property
    def namespace_list(self) -> list[str]:
        return [n.strip() for n in self.namespaces.split(",") if n.strip()]
