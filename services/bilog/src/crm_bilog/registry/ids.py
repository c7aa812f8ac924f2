"""Schema ids of the packaged schemas, from a Confluent-compatible registry.

Subjects follow Confluent's TopicNameStrategy (``<topic>-value``), so any
Confluent-compatible consumer finds them. With ``auto_register`` the schemas are
registered (the registry answers the existing id when nothing changed, or 409 when a
change is incompatible); without it they are only looked up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

__all__ = ["SchemaIds", "subject_for"]

log = logging.getLogger("crm.bilog.registry")


def subject_for(topic: str) -> str:
    """TopicNameStrategy: the value subject of ``topic``."""
    return f"{topic}-value"


class SchemaIds:
    """``subject -> schema id`` for the schemas this process writes; resolved once."""

    def __init__(self, url: str, *, auto_register: bool = True, timeout_s: float = 5.0) -> None:
        self.url = url
        self.auto_register = auto_register
        self._client = SchemaRegistryClient({"url": url, "timeout": timeout_s, "max.retries": 1})
        self._ids: dict[str, int] = {}

    @property
    def resolved(self) -> bool:
        return bool(self._ids)

    def get(self, subject: str) -> int:
        return self._ids[subject]

    def resolve_blocking(self, schemas: Iterable[tuple[str, str]]) -> dict[str, int]:
        """Registers (or looks up) every ``(subject, schema text)``; returns their ids."""
        ids: dict[str, int] = {}
        for subject, text in schemas:
            schema = Schema(text, "AVRO")
            if self.auto_register:
                ids[subject] = int(self._client.register_schema(subject, schema))
            else:
                found = self._client.lookup_schema(subject, schema).schema_id
                if found is None:
                    raise LookupError(f"the registry has no id for {subject}")
                ids[subject] = int(found)
        return ids

    async def resolve(self, schemas: Iterable[tuple[str, str]]) -> None:
        pairs = list(schemas)
        ids = await asyncio.to_thread(self.resolve_blocking, pairs)
        if not self._ids:
            log.info("schema ids resolved", extra={"schema_ids": ids, "registry": self.url})
        self._ids = ids

    def close(self) -> None:
        self._client.close()
