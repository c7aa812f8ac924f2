"""Schemas as the single source of truth: conversion with paths, PII, keys, compatibility
of released versions (schemas_check) and fuzzing of the converter (pure, no servers)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from bilog_testlib import MASKED, PHONE, call_record
from crm_bilog.domain.avro_json import ConversionError
from crm_bilog.domain.pii import PiiPolicy, mask_text
from crm_bilog.schemas import AVSC_DIR, RELEASED_DIR, SchemaCatalog, topic_name
from fastavro import schemaless_reader, schemaless_writer
from hypothesis import given, settings
from hypothesis import strategies as st

PII = PiiPolicy(b"test-key-0123456789")
CHECK = Path(__file__).resolve().parents[3] / "tools" / "crm_tools" / "schemas_check.py"


def schemas_check(*args: str) -> int:
    res = subprocess.run([sys.executable, str(CHECK), *args], capture_output=True, text=True)
    return res.returncode


@pytest.fixture(scope="module")
def catalog() -> SchemaCatalog:
    return SchemaCatalog.load(PII)


def errors_of(catalog: SchemaCatalog, name: str, payload: Any) -> dict[str, str]:
    with pytest.raises(ConversionError) as err:
        catalog[name].convert(payload)
    return dict(err.value.errors)


def test_catalog_derives_topics_keys_and_pii(catalog: SchemaCatalog) -> None:
    assert catalog.names == [
        "crm.bi.AgentPresenceChanged",
        "crm.bi.FactCallRecord",
        "crm.bi.FailedEvent",
        "crm.bi.RecommendationClick",
        "crm.bi.RecommendationImpression",
        "crm.bi.TaskTransition",
    ]
    assert topic_name("crm.bi.FactCallRecord", "bi.") == "bi.fact_call_record"
    fcr = catalog["crm.bi.FactCallRecord"]
    datum = fcr.convert(call_record(3))
    assert datum["contact_phone"] == MASKED
    assert fcr.key_of(datum) == "2:bundle-3"
    assert fcr.event_time_ms(datum) == call_record(3)["operator_header"]["timestamp"]
    assert catalog["crm.bi.FailedEvent"].internal


def test_paths_for_nested_array_union_and_unknown_fields(catalog: SchemaCatalog) -> None:
    bad = call_record(1)
    bad["operator_header"]["operator_id"] = 2**40
    bad["provider_type"] = "XX"
    bad["extra"] = True
    del bad["call_tag_id"]
    assert errors_of(catalog, "crm.bi.FactCallRecord", bad) == {
        "operator_header.operator_id": "out of range for int, 32-bit",
        "provider_type": "unknown symbol; expected one of ZT, RL, TR",
        "call_tag_id": "required field is missing",
        "extra": "unknown field (not in crm.bi.FactCallRecord)",
    }
    impression = {
        "impression_id": "i1",
        "business_line": 1,
        "customer_id": 5,
        "items": [{"car_id": 1, "rank": 1, "score": 0.9}, {"car_id": "x", "rank": 2, "score": 1}],
        "at": 1,
    }
    assert errors_of(catalog, "crm.bi.RecommendationImpression", impression) == {
        "items[1].car_id": "expected an integer (long, 64-bit), got string"
    }
    assert errors_of(catalog, "crm.bi.FactCallRecord", [1]) == {
        "": "expected an object (record crm.bi.FactCallRecord), got array"
    }


def test_union_tagged_form_defaults_and_hash(catalog: SchemaCatalog) -> None:
    payload = call_record(2)
    payload["operator_header"]["operator_id"] = {"int": 9}
    assert catalog["crm.bi.FactCallRecord"].convert(payload)["operator_header"]["operator_id"] == 9
    base = {"impression_id": "i", "business_line": 1, "customer_id": 5, "items": [], "at": 1}
    imp = catalog["crm.bi.RecommendationImpression"]
    a = imp.convert({**base, "customer_phone": "+86 138-1234-5678"})
    b = imp.convert({**base, "customer_phone": "8613812345678"})
    assert a["customer_phone"] == b["customer_phone"]
    assert len(a["customer_phone"]) == 64
    assert "1381234" not in a["customer_phone"]
    assert a["task_id"] is None
    assert a["agent_id"] is None
    assert mask_text(MASKED) == MASKED  # idempotent: bad rows can be replayed


def test_protector_masks_pii_and_redacts_unknown(catalog: SchemaCatalog) -> None:
    bad = call_record(1)
    bad["note"] = PHONE
    bad["operator_header"]["who"] = {"phone": PHONE}
    safe = catalog["crm.bi.FactCallRecord"].protect_raw(bad)
    assert PHONE not in json.dumps(safe)
    assert safe["contact_phone"] == MASKED
    assert safe["note"] == "**redacted**"


def test_schemas_check_passes_on_the_repository() -> None:
    assert schemas_check() == 0


def test_schemas_check_catches_breaking_change_and_unreleased_removal(tmp_path: Path) -> None:
    avsc, released = tmp_path / "avsc", tmp_path / "released"
    shutil.copytree(AVSC_DIR, avsc)
    shutil.copytree(RELEASED_DIR, released)
    args = ["--avsc", str(avsc), "--released", str(released)]
    assert schemas_check(*args) == 0
    path = avsc / "crm.bi.TaskTransition.avsc"
    schema = json.loads(path.read_text())
    schema["fields"].append({"name": "queue", "type": "string"})  # no default: breaking
    path.write_text(json.dumps(schema))
    assert schemas_check(*args) == 1
    schema["fields"][-1]["default"] = "main"  # compatible again; unreleased is fine
    path.write_text(json.dumps(schema))
    assert schemas_check(*args) == 0
    (avsc / "crm.bi.RecommendationClick.avsc").unlink()
    assert schemas_check(*args) == 1


_CATALOG = SchemaCatalog.load(PII)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=6)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(
        [
            "crm.bi.FactCallRecord",
            "crm.bi.TaskTransition",
            "crm.bi.AgentPresenceChanged",
            "crm.bi.RecommendationImpression",
            "crm.bi.RecommendationClick",
        ]
    ),
    field=st.text(max_size=12) | st.sampled_from(["business_line", "operator_header", "items"]),
    value=json_values,
)
def test_converter_is_total(name: str, field: str, value: Any) -> None:
    schema = _CATALOG[name]
    for payload in (value, {**call_record(1), field: value}):
        errors: list[tuple[str, str]] = []
        try:
            datum = schema.convert(payload)
        except ConversionError as err:
            errors = err.errors
            assert errors
        else:
            buf = io.BytesIO()
            schemaless_writer(buf, schema.parsed, datum)
            buf.seek(0)
            schemaless_reader(buf, schema.parsed, None)
        assert all(isinstance(p, str) and isinstance(r, str) for p, r in errors)
        json.dumps(schema.protect_raw(payload))
