"""Helpers of the operator tests (imported by conftest.py and the tests): the Kubernetes
API stand-in client, the operator handle, polling. A uniquely named module, because
`conftest` is not importable by name when several test folders have one."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from k8s_standin import KubernetesStandIn
from kopf.testing import KopfRunner

ENTRY = str(Path(__file__).with_name("kopf_entry.py"))
GROUP_VERSION = "crm.platform.io/v1alpha1"
WAIT = 20.0
# plural -> group/version of the built-in kinds the operator manages (else: ours)
BUILTIN_GROUPS = {"deployments": "apps/v1", "networkpolicies": "networking.k8s.io/v1"}


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
        group = f"apis/{BUILTIN_GROUPS.get(plural, GROUP_VERSION)}"
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
        group = BUILTIN_GROUPS.get(plural, GROUP_VERSION)
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


class Operator:
    def __init__(self, runner: KopfRunner, webhook_port: int) -> None:
        self.runner = runner
        self.webhook_url = f"http://127.0.0.1:{webhook_port}"
