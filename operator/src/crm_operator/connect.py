"""Kafka Connect REST API client and the BILogSink -> connector config mapping.

Every call is time-boxed (``timeout`` seconds, connection included): one slow or
unreachable Connect cluster only delays the sink that points at it (kopf runs handlers
of different objects concurrently).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp

__all__ = [
    "DEFAULT_CONNECTOR_CLASS",
    "RESERVED_CONFIG",
    "ConnectClient",
    "ConnectError",
    "ConnectorState",
    "connector_config",
    "connector_name",
]

DEFAULT_CONNECTOR_CLASS = "io.confluent.connect.hdfs3.Hdfs3SinkConnector"
_FORMATS = {"avro": "io.confluent.connect.hdfs3.avro.AvroFormat"}
_PARTITIONS = {
    "hourly": (3_600_000, "'year'=YYYY/'month'=MM/'day'=dd/'hour'=HH"),
    "daily": (86_400_000, "'year'=YYYY/'month'=MM/'day'=dd"),
}
RESERVED_CONFIG = frozenset(
    {
        "name",
        "connector.class",
        "tasks.max",
        "topics",
        "format.class",
        "flush.size",
        "rotate.interval.ms",
        "partitioner.class",
        "partition.duration.ms",
        "path.format",
        "timestamp.extractor",
    }
)
"""Connector settings the operator derives from typed spec fields; ``config`` may not set
them (the admission webhook refuses it)."""


class ConnectError(Exception):
    """A Connect call failed: unreachable, timed out or answered with an error status."""

    def __init__(self, message: str, status: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason or ("ConnectUnreachable" if status is None else "ConnectError")


def connector_name(namespace: str, name: str) -> str:
    return f"{namespace}.{name}"


def connector_config(spec: Mapping[str, Any], name: str) -> dict[str, str]:
    """The connector's config for a BILogSink spec (all values strings, as Connect has them)."""
    target = spec["target"]["kafkaConnect"]
    duration, path = _PARTITIONS[spec.get("partitioning", "hourly")]
    config = {str(k): str(v) for k, v in (target.get("config") or {}).items()}
    config.update(
        {
            "name": name,
            "connector.class": target.get("connectorClass") or DEFAULT_CONNECTOR_CLASS,
            "tasks.max": str(spec.get("tasksMax", 1)),
            "topics": ",".join(spec["topics"]),
            "format.class": _FORMATS[spec.get("format", "avro")],
            "flush.size": str(spec.get("flushSize", 1000)),
            "rotate.interval.ms": str(spec.get("rotateIntervalMs", 600_000)),
            "partitioner.class": "io.confluent.connect.storage.partitioner.TimeBasedPartitioner",
            "partition.duration.ms": str(duration),
            "path.format": path,
            "timestamp.extractor": "Record",
            "locale": config.get("locale", "en-US"),
            "timezone": config.get("timezone", "UTC"),
        }
    )
    return config


@dataclass(frozen=True, slots=True)
class TaskState:
    id: int
    state: str
    worker_id: str = ""
    trace: str = ""


@dataclass(frozen=True, slots=True)
class ConnectorState:
    """GET /connectors/{name}/status, parsed."""

    state: str
    worker_id: str = ""
    tasks: tuple[TaskState, ...] = field(default_factory=tuple)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ConnectorState:
        connector = doc.get("connector") or {}
        tasks = tuple(
            TaskState(
                int(t.get("id", 0)),
                str(t.get("state", "UNASSIGNED")),
                str(t.get("worker_id", "")),
                str(t.get("trace", ""))[:300],
            )
            for t in doc.get("tasks") or ()
        )
        return cls(str(connector.get("state", "UNASSIGNED")), str(connector.get("worker_id", "")),
                   tasks)  # fmt: skip

    def to_status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "workerId": self.worker_id,
            "tasks": [
                {"id": t.id, "state": t.state, "workerId": t.worker_id}
                | ({"trace": t.trace} if t.trace else {})
                for t in self.tasks
            ],
        }


class ConnectClient:
    """Kafka Connect REST calls over one shared aiohttp session, each time-boxed."""

    def __init__(self, session: aiohttp.ClientSession, timeout: float) -> None:
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def _call(self, method: str, url: str, json: Any = None) -> Any:
        try:
            async with self._session.request(method, url, json=json, timeout=self._timeout) as r:
                text = await r.text()
                if r.status >= 400:
                    raise ConnectError(f"{method} {url}: HTTP {r.status}: {text[:300]}", r.status)
                if not text:
                    return None
                return await r.json(content_type=None)
        except TimeoutError as exc:
            raise ConnectError(f"{method} {url}: no answer within {self._timeout.total}s") from exc
        except aiohttp.ClientError as exc:
            raise ConnectError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _url(base: str, name: str, *parts: str) -> str:
        return "/".join([base.rstrip("/"), "connectors", quote(name, safe=""), *parts])

    async def put_config(self, base: str, name: str, config: Mapping[str, str]) -> None:
        """Create or update (PUT /connectors/{name}/config is idempotent)."""
        await self._call("PUT", self._url(base, name, "config"), dict(config))

    async def get_config(self, base: str, name: str) -> dict[str, str] | None:
        try:
            doc: dict[str, str] = await self._call("GET", self._url(base, name, "config"))
        except ConnectError as exc:
            if exc.status == 404:
                return None
            raise
        return doc

    async def status(self, base: str, name: str) -> ConnectorState | None:
        try:
            doc = await self._call("GET", self._url(base, name, "status"))
        except ConnectError as exc:
            if exc.status == 404:
                return None
            raise
        return ConnectorState.from_json(doc or {})

    async def pause(self, base: str, name: str) -> None:
        await self._call("PUT", self._url(base, name, "pause"))

    async def resume(self, base: str, name: str) -> None:
        await self._call("PUT", self._url(base, name, "resume"))

    async def stop(self, base: str, name: str) -> None:
        await self._call("PUT", self._url(base, name, "stop"))

    async def delete(self, base: str, name: str) -> None:
        try:
            await self._call("DELETE", self._url(base, name))
        except ConnectError as exc:
            if exc.status != 404:
                raise

    async def restart_task(self, base: str, name: str, task_id: int) -> None:
        await self._call("POST", self._url(base, name, "tasks", str(task_id), "restart"))
