"""The status shapes of CRMConfig and BILogSink (pure functions, no I/O).

A handler computes the whole desired status and :func:`patch_status` patches only the
fields that differ from the object's current status, so an unchanged fact never rewrites
the object (and lastTransitionTime only moves when a condition's status changes).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from crm_common.config_watch import Ack, rollout_bucket

from crm_operator.conditions import Status, condition, merge
from crm_operator.connect import ConnectorState
from crm_operator.etcd import HistoryEntry

__all__ = [
    "ConfigState",
    "builtin_status",
    "config_status",
    "merge_patch",
    "patch_status",
    "sink_status",
]

_ABSENT = object()


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch that turns ``old`` into ``new`` (None removes a key)."""
    out: dict[str, Any] = {k: None for k in old.keys() - new.keys()}
    for k, v in new.items():
        before = old.get(k, _ABSENT)
        if isinstance(v, Mapping) and isinstance(before, Mapping):
            sub = merge_patch(before, v)
            if sub:
                out[k] = sub
        elif before != v:
            out[k] = v
    return out


class _Patch(Protocol):
    @property
    def status(self) -> Any: ...


def patch_status(
    patch: _Patch,
    current: Mapping[str, Any],
    fields: Mapping[str, Any],
    conditions: Iterable[Mapping[str, Any]],
) -> None:
    """Put into ``patch.status`` what differs from ``current`` (None removes a field)."""
    merged = merge(current.get("conditions"), conditions)
    desired = {**fields, "conditions": merged}
    for key, value in desired.items():
        if current.get(key) != value and not (value is None and key not in current):
            patch.status[key] = value


# --------------------------------------------------------------------------- CRMConfig


@dataclass(frozen=True, slots=True)
class ConfigState:
    """What the last reconcile of a CRMConfig wrote (kept in memory for the status timer)."""

    service: str
    key: str
    generation: int | None
    revision: int
    rollout_percent: int | None
    rollout_revision: int
    history: Sequence[HistoryEntry] = field(default_factory=tuple)

    def expected(self, instance: str) -> int:
        """The revision ``instance`` should apply: the candidate's when it is in the
        rollout, the stable one otherwise."""
        if self.rollout_percent is not None and rollout_bucket(instance) < self.rollout_percent:
            return self.rollout_revision
        return self.revision


def config_status(
    state: ConfigState, acks: Sequence[Ack]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    gen = state.generation
    applied_by = []
    done, rejected = 0, []
    for ack in acks:
        want = state.expected(ack.instance)
        have = ack.keys.get(state.key, 0)
        candidate = state.rollout_percent is not None and want == state.rollout_revision
        applied_by.append(
            {"instance": ack.instance, "revision": have, "candidate": candidate, "time": ack.time}
        )
        if have == want:
            done += 1
        elif ack.rejected.get(state.key) == want:
            rejected.append(ack.instance)
    fields: dict[str, Any] = {
        "observedGeneration": gen,
        "revision": state.revision,
        "rollout": (
            {"percent": state.rollout_percent, "revision": state.rollout_revision}
            if state.rollout_percent is not None
            else None
        ),
        "history": [
            {"revision": h.revision, "generation": h.generation, "time": h.time}
            for h in state.history
        ],
        "appliedBy": applied_by,
        "appliedCount": done,
        "instances": len(acks),
    }
    if state.rollout_percent is not None:
        synced = (
            f"candidate at revision {state.rollout_revision} for {state.rollout_percent}% "
            f"of instances; stable revision {state.revision}"
        )
    else:
        synced = f"etcd holds the declared value at revision {state.revision}"
    ready: tuple[Status, str, str]
    if rejected:
        ready = ("False", "Rejected", f"rejected by {', '.join(rejected)} (see their logs)")
    elif not acks:
        ready = ("True", "NoInstances", f"stored; no live {state.service} instance acknowledges")
    elif done == len(acks):
        ready = ("True", "Applied", f"{done}/{len(acks)} instances applied the declared version")
    else:
        ready = ("False", "Applying", f"{done}/{len(acks)} instances applied the declared version")
    conds = [
        condition("Synced", "True", "Written", synced, gen),
        condition("Ready", ready[0], ready[1], ready[2], gen),
    ]
    return fields, conds


# --------------------------------------------------------------------------- BILogSink

_WANT = {"running": "RUNNING", "paused": "PAUSED", "stopped": "STOPPED"}


def sink_status(
    spec: Mapping[str, Any],
    state: ConnectorState | None,
    gen: int | None,
    connector: str,
    backoffs: Mapping[int, Any],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    want = _WANT[spec.get("state", "running")]
    fields: dict[str, Any] = {"observedGeneration": gen, "connectorName": connector}
    ready: tuple[Status, str, str]
    if state is None:
        fields["connectorStatus"] = None
        ready = ("False", "ConnectorMissing", f"connector {connector} does not exist")
    else:
        cs = state.to_status()
        for t in cs["tasks"]:
            b = backoffs.get(t["id"])
            if b is not None and b.restarts:
                t["restarts"] = b.restarts
        fields["connectorStatus"] = cs
        failed = [t.id for t in state.tasks if t.state == "FAILED"]
        if state.state == "FAILED":
            ready = ("False", "ConnectorFailed", f"connector {connector} FAILED")
        elif state.state != want:
            ready = ("False", "Pending", f"connector is {state.state}, want {want}")
        elif want == "RUNNING" and failed:
            ready = ("False", "TaskFailed", f"task(s) {failed} FAILED (restarted with backoff)")
        elif want == "RUNNING" and not all(t.state == "RUNNING" for t in state.tasks):
            ready = ("False", "TasksStarting", "not every task is RUNNING yet")
        else:
            ready = ("True", want.capitalize(), f"connector {connector} is {want}")
    return fields, [condition("Ready", ready[0], ready[1], ready[2], gen)]


def builtin_status(
    spec: Mapping[str, Any], deployment: Mapping[str, Any], gen: int | None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    want = int((deployment.get("spec") or {}).get("replicas") or 0)
    have = int((deployment.get("status") or {}).get("readyReplicas") or 0)
    name = (deployment.get("metadata") or {}).get("name", "")
    fields = {
        "observedGeneration": gen,
        "deployment": {"name": name, "replicas": want, "readyReplicas": have},
    }
    ready: tuple[Status, str, str]
    if want == 0:
        ready = ("True", "ScaledDown", f"deployment {name} scaled to 0 ({spec.get('state')})")
    elif have >= want:
        ready = ("True", "DeploymentReady", f"{have}/{want} replicas ready")
    else:
        ready = ("False", "DeploymentProgressing", f"{have}/{want} replicas ready")
    return fields, [condition("Ready", ready[0], ready[1], ready[2], gen)]
