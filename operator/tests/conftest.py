"""Operator test fixtures: real etcd (the shared devstack one, a prefix per test), the
Kubernetes API stand-in (kmock's KubernetesEmulator, see k8s_standin) and the real
operator run by kopf's KopfRunner against it."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import kopf
import pytest
from k8s_standin import KubernetesStandIn
from kopf.testing import KopfRunner

ENTRY = str(Path(__file__).with_name("kopf_entry.py"))
GROUP_VERSION = "crm.platform.io/v1alpha1"
WAIT = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def eventually(
    cond: Callable[[], Awaitable[Any] | Any], what: str, timeout: float = WAIT
) -> Any:
    """Poll ``cond`` (sync or async) until it returns something truthy; return it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while True:
        result = cond()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        last = result
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what} (last: {last!r})")
        await asyncio.sleep(0.05)


class Kube:
    """A tiny client of the API stand-in (what kubectl would do)."""

    def __init__(self, server: KubernetesStandIn, url: str, session: aiohttp.ClientSession):
        self.server = server
        self.url = url
        self.session = session

    def _path(self, plural: str, ns: str, name: str = "") -> str:
        group = "apis/apps/v1" if plural == "deployments" else f"apis/{GROUP_VERSION}"
        return f"{self.url}/{group}/namespaces/{ns}/{plural}" + (f"/{name}" if name else "")

    async def create(
        self,
        plural: str,
        kind: str,
        ns: str,
        name: str,
        spec: dict[str, Any],
        annotations: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": name, "namespace": ns}
        if annotations:
            meta["annotations"] = annotations
        body = {"apiVersion": GROUP_VERSION, "kind": kind, "metadata": meta, "spec": spec}
        async with self.session.post(self._path(plural, ns), json=body) as r:
            assert r.status < 300, await r.text()
            doc: dict[str, Any] = await r.json()
            return doc

    async def patch(self, plural: str, ns: str, name: str, patch: dict[str, Any]) -> None:
        headers = {"Content-Type": "application/merge-patch+json"}
        async with self.session.patch(
            self._path(plural, ns, name), json=patch, headers=headers
        ) as r:
            assert r.status < 300, await r.text()

    async def delete(self, plural: str, ns: str, name: str) -> None:
        async with self.session.delete(self._path(plural, ns, name)) as r:
            assert r.status < 300, await r.text()

    def get(self, plural: str, ns: str, name: str) -> dict[str, Any] | None:
        group = "apps/v1" if plural == "deployments" else GROUP_VERSION
        return self.server.object(f"{group}/{plural}", ns, name)

    def events(self, name: str, reason: str | None = None) -> list[dict[str, Any]]:
        out = []
        for (res, _, _), obj in list(self.server.objects.items()):
            if res.plural != "events" or obj.deleted:
                continue
            raw = obj.raw
            if raw.get("involvedObject", {}).get("name") == name and (
                reason is None or raw.get("reason") == reason
            ):
                out.append(raw)
        return out


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
    server.declare(f"{GROUP_VERSION}/crmconfigs", kind="CRMConfig", namespaced=True, status=True)
    server.declare(f"{GROUP_VERSION}/bilogsinks", kind="BILogSink", namespaced=True, status=True)
    async with server, kmock.Server(server) as srv, aiohttp.ClientSession() as session:
        yield Kube(server, str(srv.url).rstrip("/"), session)


class Operator:
    def __init__(self, runner: KopfRunner, webhook_port: int) -> None:
        self.runner = runner
        self.webhook_url = f"http://127.0.0.1:{webhook_port}"


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
