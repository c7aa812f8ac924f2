"""The Confluent wire format: magic byte 0, the schema id (4 bytes, big-endian), then the
Avro binary encoding of the value. Any Confluent-compatible consumer (AvroDeserializer,
Kafka Connect's AvroConverter) reads it with the writer schema fetched by id."""

from __future__ import annotations

import io
import struct
from typing import Any

from fastavro import schemaless_reader, schemaless_writer

__all__ = ["MAGIC", "WireFormatError", "decode", "encode", "split"]

MAGIC = 0
_HEADER = struct.Struct(">bI")


class WireFormatError(ValueError):
    """The bytes are not a Confluent-framed value."""


def encode(schema_id: int, parsed_schema: Any, datum: object) -> bytes:
    """Frames ``datum`` (valid for ``parsed_schema``, a fastavro parsed schema)."""
    buf = io.BytesIO()
    buf.write(_HEADER.pack(MAGIC, schema_id))
    schemaless_writer(buf, parsed_schema, datum)
    return buf.getvalue()


def split(value: bytes) -> tuple[int, bytes]:
    """``(schema_id, avro_body)`` of a framed value."""
    if len(value) < _HEADER.size:
        raise WireFormatError(f"{len(value)} bytes is too short for the wire format header")
    magic, schema_id = _HEADER.unpack_from(value)
    if magic != MAGIC:
        raise WireFormatError(f"unknown magic byte {magic}")
    return schema_id, value[_HEADER.size :]


def decode(value: bytes, parsed_schema: Any) -> Any:
    """The datum of a framed value written with ``parsed_schema``."""
    _, body = split(value)
    return schemaless_reader(io.BytesIO(body), parsed_schema, None)
