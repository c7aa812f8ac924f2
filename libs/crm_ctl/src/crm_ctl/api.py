"""``crm.config.v1.ConfigAdminService``: a thin servicer over :class:`ConfigAdmin`."""

from __future__ import annotations

import datetime
from typing import Any

from crm.config.v1 import config_pb2 as pb
from crm.config.v1 import config_pb2_grpc
from crm_common.errors import InvalidArgument
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio

from crm_ctl.config import (
    AppliedVersion,
    ChangeKind,
    ConfigAdmin,
    RolloutState,
    SetResult,
    Source,
    Version,
)
from crm_ctl.config.diff import to_json

__all__ = ["AUTHOR_HEADER", "ConfigAdminServicer", "version_pb"]

AUTHOR_HEADER = "x-crm-author"
"""Request metadata naming the author of a change (e.g. the web console's user)."""
ANONYMOUS = "anonymous"

Context = aio.ServicerContext[Any, Any]

_SOURCE = {
    Source.UNKNOWN: pb.SOURCE_UNSPECIFIED,
    Source.CRMCONFIG: pb.SOURCE_CRMCONFIG,
    Source.ADMIN: pb.SOURCE_ADMIN,
}
_KIND = {
    ChangeKind.ADDED: pb.CHANGE_KIND_ADDED,
    ChangeKind.REMOVED: pb.CHANGE_KIND_REMOVED,
    ChangeKind.CHANGED: pb.CHANGE_KIND_CHANGED,
}
_APPLIED = {
    AppliedVersion.STABLE: pb.APPLIED_VERSION_STABLE,
    AppliedVersion.ROLLOUT: pb.APPLIED_VERSION_ROLLOUT,
    AppliedVersion.DEFAULTS: pb.APPLIED_VERSION_DEFAULTS,
    AppliedVersion.OUTDATED: pb.APPLIED_VERSION_OUTDATED,
    AppliedVersion.REJECTED: pb.APPLIED_VERSION_REJECTED,
}


def _ts(t: datetime.datetime | None) -> Timestamp | None:
    if t is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(t)
    return ts


def version_pb(v: Version) -> pb.ConfigVersion:
    return pb.ConfigVersion(
        service=v.service,
        key=v.key,
        revision=v.revision,
        value_json="" if v.value is None else to_json(v.value),
        author=v.author or "",
        time=_ts(v.time),
        source=_SOURCE[v.source],
        generation=v.generation or 0,
        has_previous=v.has_previous,
        changes=[
            pb.ConfigChange(
                path=c.path,
                kind=_KIND[c.kind],
                old_json="" if c.kind is ChangeKind.ADDED else to_json(c.old),
                new_json="" if c.kind is ChangeKind.REMOVED else to_json(c.new),
            )
            for c in v.changes
        ],
    )


def _author(context: Context) -> str:
    for k, v in context.invocation_metadata() or ():
        if k == AUTHOR_HEADER:
            author = v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
            try:
                return ConfigAdmin.check_author(author)
            except InvalidArgument:
                raise InvalidArgument.single(
                    f"metadata.{AUTHOR_HEADER}", "must be 1..128 printable ASCII characters"
                ) from None
    return ANONYMOUS


def _set_response(result: SetResult) -> pb.SetResponse:
    return pb.SetResponse(
        version=version_pb(result.version),
        changed=result.changed,
        rollout_revision=result.rollout_revision,
    )


def rollout_pb(state: RolloutState) -> pb.RolloutResponse:
    candidate = None
    if state.candidate_revision:
        candidate = pb.Candidate(
            percent=state.candidate_percent or 0,
            revision=state.candidate_revision,
            value_json="" if state.candidate_value is None else to_json(state.candidate_value),
        )
    return pb.RolloutResponse(
        stable=version_pb(state.stable),
        candidate=candidate,
        instances=[
            pb.InstanceAck(
                instance=i.instance,
                applied_revision=i.applied_revision,
                version=_APPLIED[i.version],
                ack_time=_ts(i.ack_time),
                bucket=i.bucket,
                rejected_revision=i.rejected_revision,
            )
            for i in state.instances
        ],
        on_stable=state.count(AppliedVersion.STABLE, AppliedVersion.DEFAULTS),
        on_candidate=state.count(AppliedVersion.ROLLOUT),
        lagging=state.count(AppliedVersion.OUTDATED, AppliedVersion.REJECTED),
    )


class ConfigAdminServicer(config_pb2_grpc.ConfigAdminServiceServicer):
    """Validates the request shape, calls the library, converts the result."""

    def __init__(self, admin: ConfigAdmin) -> None:
        self._admin = admin

    async def List(self, request: pb.ListRequest, context: Context) -> pb.ListResponse:
        keys = await self._admin.list(request.service or None)
        by_service: dict[str, list[pb.KeySummary]] = {}
        for k in keys:
            by_service.setdefault(k.service, []).append(
                pb.KeySummary(
                    key=k.key,
                    known=k.known,
                    present=k.present,
                    revision=k.revision,
                    author=k.author or "",
                    time=_ts(k.time),
                    rollout_percent=k.rollout_percent,
                )
            )
        return pb.ListResponse(
            services=[pb.ServiceKeys(service=s, keys=ks) for s, ks in sorted(by_service.items())]
        )

    async def Get(self, request: pb.GetRequest, context: Context) -> pb.GetResponse:
        current = await self._admin.get(request.service, request.key)
        defaults = ConfigAdmin.defaults(request.service, request.key)
        return pb.GetResponse(
            present=current.present,
            current=version_pb(current.version),
            json_schema=to_json(ConfigAdmin.json_schema(request.service)),
            default_json="" if defaults is None else to_json(defaults),
        )

    async def Set(self, request: pb.SetRequest, context: Context) -> pb.SetResponse:
        author = _author(context)
        ConfigAdmin.check_target(request.service, request.key)
        data = ConfigAdmin.parse_value(request.value_json)
        result = await self._admin.set(
            request.service,
            request.key,
            data,
            author=author,
            expected_revision=(
                request.expected_revision if request.HasField("expected_revision") else None
            ),
            rollout_percent=(
                request.rollout_percent if request.HasField("rollout_percent") else None
            ),
            force=request.force,
        )
        return _set_response(result)

    async def History(self, request: pb.HistoryRequest, context: Context) -> pb.HistoryResponse:
        versions = await self._admin.history(request.service, request.key)
        return pb.HistoryResponse(versions=[version_pb(v) for v in versions])

    async def Rollback(self, request: pb.RollbackRequest, context: Context) -> pb.RollbackResponse:
        result = await self._admin.rollback(
            request.service,
            request.key,
            request.revision,
            author=_author(context),
            expected_revision=(
                request.expected_revision if request.HasField("expected_revision") else None
            ),
            force=request.force,
        )
        return pb.RollbackResponse(version=version_pb(result.version), changed=result.changed)

    async def Rollout(self, request: pb.RolloutRequest, context: Context) -> pb.RolloutResponse:
        return rollout_pb(await self._admin.rollout(request.service, request.key))
