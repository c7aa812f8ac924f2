"""Operator test fixtures: real etcd (the shared devstack one, a prefix per test), the
Kubernetes API stand-in (kmock's KubernetesEmulator, see k8s_standin) and the real
operator run by kopf's KopfRunner against it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aiohttp
import kmock
import kopf
import pytest
from crm_devstack.stack import free_port
from k8s_standin import KubernetesStandIn
from kopf.testing import KopfRunner
from operator_testlib import ENTRY, GROUP_VERSION, Kube, Operator, eventually


@pytest.fixture
async def kube() -> AsyncIterator[Kube]:
    server = KubernetesStandIn()
    server.declare("v1/namespaces", kind="Namespace", namespaced=False)
    server.declare("v1/events", kind="Event", namespaced=True)
    server.declare(
        "apiextensions.k8s.io/v1/customresourcedefinitions",
        kind="CustomResourceDefinition",
        namespaced=False,
    )
    server.declare("apps/v1/deployments", kind="Deployment", namespaced=True, status=True)
    server.declare(  # only touched with CRM_OPERATOR_SINK_NETWORK_POLICY set
        "networking.k8s.io/v1/networkpolicies", kind="NetworkPolicy", namespaced=True
    )
    server.declare(  # only touched in kopf's managed webhook mode (webhook_managed)
        "admissionregistration.k8s.io/v1/validatingwebhookconfigurations",
        kind="ValidatingWebhookConfiguration",
        namespaced=False,
    )
    server.declare(f"{GROUP_VERSION}/crmconfigs", kind="CRMConfig", namespaced=True, status=True)
    server.declare(f"{GROUP_VERSION}/bilogsinks", kind="BILogSink", namespaced=True, status=True)
    async with server, kmock.Server(server) as srv, aiohttp.ClientSession() as session:
        yield Kube(server, str(srv.url).rstrip("/"), session)


@pytest.fixture
def operator_env(
    monkeypatch: pytest.MonkeyPatch, kube: Kube, etcd_endpoint: str, config_prefix: str
) -> dict[str, str]:
    env = {
        "CRM_TEST_KUBE_URL": kube.url,
        "CRM_OPERATOR_KUBE_API_SERVER": kube.url,
        "CRM_OPERATOR_ETCD_ENDPOINTS": etcd_endpoint,
        "CRM_OPERATOR_CONFIG_PREFIX": config_prefix,
        "CRM_OPERATOR_WEBHOOK_PORT": str(free_port()),
        "CRM_OPERATOR_METRICS_PORT": "-1",
        "CRM_OPERATOR_STATUS_INTERVAL_S": "0.3",
        "CRM_OPERATOR_SINK_POLL_INTERVAL_S": "0.3",
        "CRM_OPERATOR_CONNECT_TIMEOUT_S": "4",
        "CRM_OPERATOR_TASK_RESTART_BACKOFF_S": "0.4",
        "CRM_OPERATOR_TASK_RESTART_BACKOFF_MAX_S": "5",
        "CRM_OPERATOR_DRIFT_RESYNC_S": "30",
        "CRM_OPERATOR_HISTORY_LIMIT": "5",
        "CRM_OPERATOR_BILOG_SINK_KAFKA_BOOTSTRAP": "kafka.test:9092",
        "CRM_OPERATOR_BILOG_SINK_SCHEMA_REGISTRY_URL": "http://registry.test:8081",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture
async def operator(kube: Kube, operator_env: dict[str, str]) -> AsyncIterator[Operator]:
    """The real operator (all handlers) in kopf's KopfRunner thread, against the stand-in."""
    runner = KopfRunner(["run", "-A", "--standalone", ENTRY], registry=kopf.OperatorRegistry())
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))  # kopf's CLI reconfigures the root logger
    await asyncio.to_thread(runner.__enter__)
    try:

        def watched() -> bool:
            plurals = {
                r.resource.plural
                for r in list(kube.server)
                if r.resource is not None and r.action == kmock.action.WATCH
            }
            return plurals >= {"crmconfigs", "bilogsinks"}

        await eventually(watched, "kopf watching both resources")
        yield Operator(runner, int(operator_env["CRM_OPERATOR_WEBHOOK_PORT"]))
    finally:
        await asyncio.to_thread(runner.__exit__, None, None, None)
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
    assert runner.exception is None, runner.output[-3000:]
