"""A stand-in for the Kubernetes API server: kmock's KubernetesEmulator, plus what a real
apiserver does and the emulator leaves out (the operator relies on it):

- ``metadata.resourceVersion`` moves on every write and a JSON patch's ``test`` of it
  answers 409 Conflict when stale (kopf patches with such a test);
- ``metadata.generation`` starts at 1 and moves when ``spec`` changes, never on status or
  metadata writes (observedGeneration depends on it);
- ``metadata.uid`` and ``metadata.creationTimestamp`` are set on create;
- writes to a resource listed in ``forbidden`` answer 403 Forbidden, as the API server
  does for a verb the caller's RBAC lacks (tests of the operator's failure paths).

It is a stand-in, not Kubernetes: no admission chain, no garbage collection by owner
references, no field managers, lists are replaced (not merged) by merge patches.
"""

from __future__ import annotations

import datetime
import itertools
import uuid
from collections.abc import Mapping
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
from kmock._internal import dicts, enums, rendering

__all__ = ["RESOURCE_VERBS", "KubernetesStandIn"]

RESOURCE_VERBS = {"list", "watch", "get", "create", "patch", "update", "delete"}

_DELETE = object()


def _merge_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch turning ``old`` into ``new`` (None deletes a key)."""
    out: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        out[key] = None
    for key, value in new.items():
        before = old.get(key, _DELETE)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            sub = _merge_diff(before, value)
            if sub:
                out[key] = sub
        elif before != value:
            out[key] = value
    return out


def _with_data(request: rendering.Request, data: Any) -> rendering.Request:
    # kmock matches reactions against the very request object it parsed (a frozen attrs
    # class): change its payload in place rather than making a copy.
    object.__setattr__(request, "data", data)
    return request


@attrs.define(kw_only=True)
class KubernetesStandIn(kmock.KubernetesEmulator):  # type: ignore[misc]
    """kmock.KubernetesEmulator with resourceVersion/generation/uid bookkeeping (see module)."""

    _versions: Any = attrs.field(factory=lambda: itertools.count(1), init=False)
    forbidden: set[str] = attrs.field(factory=set, init=False)
    """Resources ("group/version/plural") whose create/patch/delete answer 403."""

    def declare(self, resource: str, *, kind: str, namespaced: bool, status: bool = False) -> None:
        """Declare a resource for discovery (kopf needs namespaces, events and CRDs too)."""
        self.resources[resource] = kmock.ResourceInfo(
            kind=kind,
            singular=kind.lower(),
            namespaced=namespaced,
            verbs=RESOURCE_VERBS,
            subresources={"status"} if status else set(),
        )

    def object(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The stored object as a plain dict, or None when absent or deleted."""
        key = (kmock.resource(resource), namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        raw: dict[str, Any] = self.objects[key].raw
        return raw

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if request.resource is not None:
            if request.action in (
                enums.action.CREATE,
                enums.action.UPDATE,
                enums.action.DELETE,
            ) and any(kmock.resource(r) == request.resource for r in self.forbidden):
                return await self._render_error(
                    kmock.KubernetesError(
                        status=403, reason="Forbidden", message=f"{request.action} is forbidden"
                    )
                )
            try:
                request = await self._bookkeep(request)
            except kmock.KubernetesError as exc:
                return await self._render_error(exc)
        response: aiohttp.web.StreamResponse = await super()._handle(request)
        return response

    async def _bookkeep(self, request: rendering.Request) -> rendering.Request:
        rv = str(next(self._versions))
        if request.action == enums.action.CREATE and isinstance(request.data, Mapping):
            meta = dict(request.data.get("metadata") or {})
            now = datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", now)
            meta["resourceVersion"] = rv
            meta["generation"] = 1
            return _with_data(request, {**request.data, "metadata": meta})
        if request.action != enums.action.UPDATE or request.name is None:
            return request
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            if key not in self.objects or self.objects[key].deleted:
                return request  # the emulator answers 404
            current: dict[str, Any] = self.objects[key].raw
            try:
                new = dict(dicts.patch_dict(current, request.data))
            except jsonpatch.JsonPatchTestFailed as exc:
                raise kmock.KubernetesError(
                    status=409, reason="Conflict", message=f"the object has been modified: {exc}"
                ) from exc
            meta = dict(new.get("metadata") or {})
            meta["resourceVersion"] = rv
            generation = int(current.get("metadata", {}).get("generation") or 1)
            if new.get("spec") != current.get("spec"):
                generation += 1
            meta["generation"] = generation
            new["metadata"] = meta
            return _with_data(request, _merge_diff(current, new))
