"""The event schemas: ``avsc/<full name>.avsc`` in this package is the single source of
truth (validation, PII protection, keys, topics and docs all derive from it).

Besides standard Avro, a schema may carry:

* on a field, ``"pii": "mask"`` or ``"pii": "hash"`` (string fields only): protected
  before the event leaves the service (see :mod:`crm_bilog.domain.pii`);
* on the record, ``"crm.key"``: field paths whose values, joined with ``:``, make the
  Kafka key (e.g. ``["business_line", "bundle_id"]``: one ordered stream per bundle);
* on the record, ``"crm.event_time"``: the path of the event-time field
  (``timestamp-millis``), used as the Kafka message timestamp and by the sink to pick
  the date/hour directory;
* on the record, ``"crm.internal": true``: written by the service only (bad rows).

``released/<full name>/v<N>.avsc`` are the released versions; ``make schemas-check``
(``tools/crm_tools/schemas_check.py``) keeps every schema BACKWARD compatible with its
newest released version. Releasing a version = copying the schema to the next
``v<N>.avsc``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastavro import parse_schema

from crm_bilog.domain.avro_json import (
    Converter,
    SchemaError,
    compile_converter,
    compile_protector,
)
from crm_bilog.domain.pii import PiiPolicy

__all__ = [
    "AVSC_DIR",
    "FAILED_EVENT",
    "RELEASED_DIR",
    "EventSchema",
    "SchemaCatalog",
    "canonical_text",
    "load_schema_file",
    "released_versions",
    "topic_name",
]

AVSC_DIR = Path(__file__).resolve().parent / "avsc"
RELEASED_DIR = Path(__file__).resolve().parent / "released"
FAILED_EVENT = "crm.bi.FailedEvent"
"""The bad-row schema (internal)."""

_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


def topic_name(full_name: str, prefix: str) -> str:
    """``crm.bi.FactCallRecord`` -> ``<prefix>fact_call_record``."""
    return prefix + _CAMEL.sub("_", full_name.rpartition(".")[2]).lower()


def canonical_text(schema: Mapping[str, Any]) -> str:
    """The text registered for a schema: compact JSON, field order kept, docs and
    custom attributes kept (they are part of what consumers read)."""
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


def load_schema_file(path: Path) -> dict[str, Any]:
    raw = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict) or raw.get("type") != "record":
        raise SchemaError(f"{path.name}: an event schema must be a record")
    return raw


def released_versions(full_name: str, root: Path = RELEASED_DIR) -> list[tuple[int, Path]]:
    """``[(N, path of vN.avsc)]`` of a schema, oldest first."""
    d = root / full_name
    if not d.is_dir():
        return []
    found = []
    for p in d.glob("v*.avsc"):
        m = re.fullmatch(r"v(\d+)\.avsc", p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def _path_of(raw: Any, what: str) -> tuple[str, ...]:
    if not isinstance(raw, str) or not raw:
        raise SchemaError(f"{what} must be a dotted field path")
    return tuple(raw.split("."))


@dataclass(frozen=True)
class EventSchema:
    """One event type: its schema and everything derived from it."""

    name: str
    raw: dict[str, Any]
    text: str
    parsed: Any
    convert: Converter
    convert_unprotected: Converter
    protect_raw: Any
    key_paths: tuple[tuple[str, ...], ...]
    event_time_path: tuple[str, ...] | None
    internal: bool
    pii_fields: tuple[str, ...] = field(default=())

    @classmethod
    def build(cls, raw: dict[str, Any], pii: PiiPolicy) -> EventSchema:
        name = raw["name"] if "." in raw["name"] else f"{raw.get('namespace', '')}.{raw['name']}"
        name = name.strip(".")
        try:
            parsed = parse_schema(raw)
        except Exception as exc:  # fastavro raises several types for a bad schema
            raise SchemaError(f"{name}: {exc}") from exc
        keys = raw.get("crm.key", [])
        if not isinstance(keys, list):
            raise SchemaError(f"{name}: crm.key must be a list of field paths")
        event_time = raw.get("crm.event_time")
        schema = cls(
            name=name,
            raw=raw,
            text=canonical_text(raw),
            parsed=parsed,
            convert=compile_converter(raw, pii),
            convert_unprotected=compile_converter(raw, pii.disabled()),
            protect_raw=compile_protector(raw, pii),
            key_paths=tuple(_path_of(k, f"{name}: crm.key") for k in keys),
            event_time_path=(
                _path_of(event_time, f"{name}: crm.event_time") if event_time else None
            ),
            internal=bool(raw.get("crm.internal", False)),
            pii_fields=tuple(_pii_fields(raw)),
        )
        paths = [*schema.key_paths]
        if schema.event_time_path is not None:
            paths.append(schema.event_time_path)
        for path in paths:
            if not _has_path(raw, path):
                raise SchemaError(f"{name}: no field {'.'.join(path)}")
        return schema

    def key_of(self, datum: Mapping[str, Any]) -> str:
        """The Kafka key of a converted datum."""
        return ":".join(str(_get(datum, p)) for p in self.key_paths)

    def event_time_ms(self, datum: Mapping[str, Any]) -> int | None:
        """The event time of a datum (ms), if the schema names one."""
        if self.event_time_path is None:
            return None
        value = _get(datum, self.event_time_path)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if hasattr(value, "timestamp"):  # a datetime decoded by fastavro
            return int(value.timestamp() * 1000)
        return None


def _get(datum: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(datum, Mapping):
            return None
        datum = datum.get(part)
    return datum


def _has_path(raw: dict[str, Any], path: tuple[str, ...]) -> bool:
    node: Any = raw
    for part in path:
        if not isinstance(node, dict) or node.get("type") not in ("record", "error"):
            return False
        match = [f for f in node.get("fields", []) if f["name"] == part]
        if not match:
            return False
        node = match[0]["type"]
    return True


def _pii_fields(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, list):
        for b in node:
            yield from _pii_fields(b, prefix)
    elif isinstance(node, dict):
        t = node.get("type")
        if t in ("record", "error"):
            for f in node.get("fields", []):
                path = f"{prefix}.{f['name']}" if prefix else f["name"]
                if f.get("pii"):
                    yield f"{path} ({f['pii']})"
                yield from _pii_fields(f["type"], path)
        elif t == "array":
            yield from _pii_fields(node["items"], prefix + "[]")
        elif t == "map":
            yield from _pii_fields(node["values"], prefix + "[]")
        elif isinstance(t, (dict, list)):
            yield from _pii_fields(t, prefix)


class SchemaCatalog:
    """Every event schema of a directory (default: the packaged ``avsc/``), by name."""

    def __init__(self, schemas: Mapping[str, EventSchema]) -> None:
        self._schemas = dict(schemas)

    @classmethod
    def load(cls, pii: PiiPolicy, directory: Path = AVSC_DIR) -> SchemaCatalog:
        schemas: dict[str, EventSchema] = {}
        for path in sorted(directory.glob("*.avsc")):
            schema = EventSchema.build(load_schema_file(path), pii)
            if path.stem != schema.name:
                raise SchemaError(f"{path.name} holds {schema.name}; name the file after it")
            schemas[schema.name] = schema
        if FAILED_EVENT not in schemas:
            raise SchemaError(f"{FAILED_EVENT} is missing from {directory}")
        return cls(schemas)

    def get(self, name: str) -> EventSchema | None:
        return self._schemas.get(name)

    def __getitem__(self, name: str) -> EventSchema:
        return self._schemas[name]

    def __iter__(self) -> Iterator[EventSchema]:
        return iter(self._schemas.values())

    def __len__(self) -> int:
        return len(self._schemas)

    @property
    def names(self) -> list[str]:
        return sorted(self._schemas)
