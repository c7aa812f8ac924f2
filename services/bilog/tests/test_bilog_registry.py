"""The dev schema registry, driven by confluent-kafka's own SchemaRegistryClient,
AvroSerializer and AvroDeserializer (real aiohttp server, real MariaDB)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest
from bilog_testlib import RegistryThread
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext

V1 = {
    "type": "record",
    "name": "Call",
    "namespace": "t",
    "fields": [{"name": "id", "type": "long"}, {"name": "phone", "type": "string"}],
}
V2 = {**V1, "fields": [*V1["fields"], {"name": "tag", "type": "string", "default": ""}]}
BREAKING = {**V1, "fields": [*V1["fields"], {"name": "tag", "type": "string"}]}


def avro(schema: dict[str, Any]) -> Schema:
    return Schema(json.dumps(schema), "AVRO")


@pytest.fixture
def client(registry: RegistryThread) -> SchemaRegistryClient:
    return SchemaRegistryClient({"url": registry.url})


@pytest.fixture
def subject() -> str:
    return f"calls-{uuid.uuid4().hex[:8]}-value"


def test_register_fetch_versions_and_lookup(client: SchemaRegistryClient, subject: str) -> None:
    id1 = client.register_schema(subject, avro(V1))
    assert client.register_schema(subject, avro(V1)) == id1  # same schema: same id
    id2 = client.register_schema(subject, avro(V2))
    assert id2 != id1
    assert json.loads(client.get_schema(id1).schema_str) == V1
    assert client.get_versions(subject) == [1, 2]
    latest = client.get_latest_version(subject)
    assert (latest.version, latest.schema_id) == (2, id2)
    assert client.get_version(subject, 1).schema_id == id1
    assert client.lookup_schema(subject, avro(V1)).version == 1
    assert subject in client.get_subjects()
    # another subject registering the same schema shares its id (Confluent semantics)
    assert client.register_schema(subject + "-copy", avro(V1)) == id1


def test_incompatible_schema_is_rejected_with_409(
    client: SchemaRegistryClient, subject: str
) -> None:
    client.register_schema(subject, avro(V1))
    assert client.get_compatibility() == "BACKWARD"
    assert client.test_compatibility(subject, avro(V2)) is True
    assert client.test_compatibility(subject, avro(BREAKING)) is False
    with pytest.raises(SchemaRegistryError) as err:
        client.register_schema(subject, avro(BREAKING))
    assert (err.value.http_status_code, err.value.error_code) == (409, 409)
    assert "reader_field_missing_default_value" in err.value.error_message
    client.set_compatibility(subject, "NONE")
    assert client.get_compatibility(subject) == "NONE"
    assert client.register_schema(subject, avro(BREAKING)) > 0


def test_confluent_error_codes(client: SchemaRegistryClient, subject: str, registry: Any) -> None:
    with pytest.raises(SchemaRegistryError) as err:
        client.get_latest_version(subject)
    assert err.value.error_code == 40401
    with pytest.raises(SchemaRegistryError) as err:
        client.register_schema(subject, Schema('{"type": "record"', "AVRO"))
    assert (err.value.http_status_code, err.value.error_code) == (422, 42201)
    with pytest.raises(SchemaRegistryError) as err:
        client.register_schema(subject, Schema('{"type": "nonsense"}', "AVRO"))
    assert err.value.error_code == 42201
    client.register_schema(subject, avro(V1))
    with pytest.raises(SchemaRegistryError) as err:
        client.get_version(subject, 7)
    assert err.value.error_code == 40402
    with pytest.raises(SchemaRegistryError) as err:
        client.get_schema(999_999)
    assert err.value.error_code == 40403
    with pytest.raises(SchemaRegistryError) as err:
        client.lookup_schema(subject, avro(V2))
    assert err.value.error_code == 40403
    with pytest.raises(SchemaRegistryError) as err:
        client.set_compatibility(subject, "SIDEWAYS")
    assert err.value.error_code == 42203
    r = httpx.get(f"{registry.url}/subjects/{subject}/versions/abc")
    assert (r.status_code, r.json()["error_code"]) == (422, 42202)


def test_delete_subject_soft_then_permanent(client: SchemaRegistryClient, subject: str) -> None:
    client.register_schema(subject, avro(V1))
    client.register_schema(subject, avro(V2))
    assert client.delete_subject(subject) == [1, 2]
    assert subject not in client.get_subjects()
    assert subject in client.get_subjects(deleted=True)
    assert client.delete_subject(subject, permanent=True) == [1, 2]
    assert subject not in client.get_subjects(deleted=True)
    # a deleted subject starts over without compatibility history
    assert client.register_schema(subject, avro(BREAKING)) > 0


def test_avro_serializer_and_deserializer_round_trip(
    client: SchemaRegistryClient, subject: str
) -> None:
    topic = subject.removesuffix("-value")
    ctx = SerializationContext(topic, MessageField.VALUE)
    serializer = AvroSerializer(client, json.dumps(V2))
    value = {"id": 7, "phone": "138****5678", "tag": "vip"}
    data = serializer(value, ctx)
    assert data is not None
    assert data[0] == 0
    schema_id = int.from_bytes(data[1:5], "big")
    assert client.get_latest_version(subject).schema_id == schema_id
    assert AvroDeserializer(client)(data, ctx) == value
    # a reader on the old schema reads the new data (BACKWARD the other way round works
    # through schema resolution)
    old_reader = AvroDeserializer(client, json.dumps(V1))
    assert old_reader(data, ctx) == {"id": 7, "phone": "138****5678"}
