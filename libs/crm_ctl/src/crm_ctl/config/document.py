"""``crmctl config apply -f``: CRMConfig documents read from YAML (pure, no I/O).

The same shape as the operator's custom resource (``operator/crds/crmconfigs.yaml``)::

    apiVersion: crm.platform.io/v1alpha1
    kind: CRMConfig
    metadata: {name: finance}
    spec:
      service: assignment
      key: FINANCE
      data: {accept_timeout_s: 20, weights: {star: 80}}
      rollout: {percent: 25}      # optional

Several documents may follow each other (``---``), or be items of a ``kind: List``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml
from crm_common.errors import FieldViolation, InvalidArgument

__all__ = ["API_VERSION", "KIND", "Declaration", "parse_documents", "set_path"]

API_VERSION = "crm.platform.io/v1alpha1"
KIND = "CRMConfig"


@dataclass(frozen=True, slots=True)
class Declaration:
    """One CRMConfig document: what one key must hold."""

    where: str
    """``docs[i]``: the document's place, prefixed to field paths in errors."""
    name: str
    service: str
    key: str
    data: Any
    rollout_percent: int | None


def _items(text: str) -> list[Any]:
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise InvalidArgument.single("file", f"is not valid YAML: {exc}") from None
    out: list[Any] = []
    for d in docs:
        if isinstance(d, dict) and d.get("kind") == "List" and isinstance(d.get("items"), list):
            out.extend(d["items"])
        else:
            out.append(d)
    return out


def parse_documents(text: str) -> list[Declaration]:
    """Every CRMConfig of a YAML text; INVALID_ARGUMENT naming ``docs[i].<field>`` for each
    malformed one (shape only: the values are validated by the service's schema later)."""
    problems: list[FieldViolation] = []
    out: list[Declaration] = []
    items = _items(text)
    if not items:
        raise InvalidArgument.single("file", "holds no document")
    for i, doc in enumerate(items):
        where = f"docs[{i}]"
        if not isinstance(doc, dict):
            problems.append(FieldViolation(where, "must be a mapping (a CRMConfig)"))
            continue
        if doc.get("kind") != KIND:
            problems.append(FieldViolation(f"{where}.kind", f"must be {KIND}"))
        if doc.get("apiVersion", API_VERSION) != API_VERSION:
            problems.append(FieldViolation(f"{where}.apiVersion", f"must be {API_VERSION}"))
        spec = doc.get("spec")
        if not isinstance(spec, dict):
            problems.append(FieldViolation(f"{where}.spec", "is required (a mapping)"))
            continue
        service, key = spec.get("service"), spec.get("key")
        for name, value in (("service", service), ("key", key)):
            if not isinstance(value, str) or not value:
                problems.append(FieldViolation(f"{where}.spec.{name}", "is required (a string)"))
        if "data" not in spec:
            problems.append(FieldViolation(f"{where}.spec.data", "is required"))
        rollout, percent = spec.get("rollout"), None
        if isinstance(rollout, dict):
            percent = rollout.get("percent")
        elif rollout is not None:
            problems.append(FieldViolation(f"{where}.spec.rollout", "must be a mapping"))
        if percent is not None and (
            isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100
        ):
            problems.append(
                FieldViolation(f"{where}.spec.rollout.percent", "must be an integer 0..100")
            )
            percent = None
        meta = doc.get("metadata")
        meta = meta if isinstance(meta, dict) else {}
        out.append(
            Declaration(
                where,
                str(meta.get("name") or f"{service}-{key}"),
                str(service),
                str(key),
                spec.get("data"),
                percent,
            )
        )
    if problems:
        raise InvalidArgument(problems)
    return out


def set_path(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``data`` with the dotted ``path`` set to ``value`` (objects created on the
    way). ``weights.star=60`` -> ``{"weights": {"star": 60}}``."""
    parts = path.split(".")
    if not path or any(not p for p in parts):
        raise InvalidArgument.single("set", f"{path!r} is not a dotted field path")
    out = dict(data)
    node = out
    for p in parts[:-1]:
        child = node.get(p)
        child = dict(child) if isinstance(child, dict) else {}
        node[p] = child
        node = child
    node[parts[-1]] = value
    return out
