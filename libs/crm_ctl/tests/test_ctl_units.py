"""Pure parts: JSON diffs, CRMConfig document parsing, dotted-path patches, tables."""

from __future__ import annotations

import pytest
from crm_common.errors import InvalidArgument
from crm_ctl.cli.output import table
from crm_ctl.config.diff import Change, ChangeKind, diff
from crm_ctl.config.document import parse_documents, set_path


def test_diff_objects_field_by_field() -> None:
    old = {"a": 1, "w": {"x": 1, "y": 2}, "l": [1, 2], "gone": True}
    new = {"a": 1, "w": {"x": 3, "z": 4}, "l": [1, 2, 3], "b": "new"}
    assert diff(old, new) == [
        Change("b", ChangeKind.ADDED, None, "new"),
        Change("gone", ChangeKind.REMOVED, True, None),
        Change("l", ChangeKind.CHANGED, [1, 2], [1, 2, 3]),
        Change("w.x", ChangeKind.CHANGED, 1, 3),
        Change("w.y", ChangeKind.REMOVED, 2, None),
        Change("w.z", ChangeKind.ADDED, None, 4),
    ]
    assert diff(old, old) == []
    assert diff({"n": 1}, {"n": 1.5}) == [Change("n", ChangeKind.CHANGED, 1, 1.5)]
    assert diff({"n": {"a": 1}}, {"n": 2}) == [Change("n", ChangeKind.CHANGED, {"a": 1}, 2)]


def test_documents_and_list() -> None:
    text = """
kind: List
items:
- kind: CRMConfig
  metadata: {name: a}
  spec: {service: assignment, key: SALE, data: {x: 1}, rollout: {percent: 10}}
---
kind: CRMConfig
spec: {service: recommendation, key: ranking, data: {}}
"""
    docs = parse_documents(text)
    assert [(d.where, d.name, d.service, d.key, d.rollout_percent) for d in docs] == [
        ("docs[0]", "a", "assignment", "SALE", 10),
        ("docs[1]", "recommendation-ranking", "recommendation", "ranking", None),
    ]


@pytest.mark.parametrize(
    ("text", "fields"),
    [
        ("", ["file"]),
        ("a: [", ["file"]),
        ("- 1\n", ["docs[0]"]),
        ("kind: CRMConfig\n", ["docs[0].spec"]),
        ("kind: CRMConfig\nspec: {key: 3}\n", ["docs[0].spec.service", "docs[0].spec.key",
                                               "docs[0].spec.data"]),
        ("kind: CRMConfig\napiVersion: v1\nspec: {service: s, key: k, data: {},"
         " rollout: {percent: 101}}\n", ["docs[0].apiVersion", "docs[0].spec.rollout.percent"]),
        ("kind: CRMConfig\nspec: {service: s, key: k, data: {}, rollout: 5}\n",
         ["docs[0].spec.rollout"]),
    ],
)  # fmt: skip
def test_malformed_documents(text: str, fields: list[str]) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_documents(text)
    assert [v.field for v in info.value.violations] == fields


def test_set_path() -> None:
    base = {"weights": {"star": 1, "priority": 2}, "a": 1}
    out = set_path(base, "weights.star", 9)
    assert out == {"weights": {"star": 9, "priority": 2}, "a": 1}
    assert base["weights"]["star"] == 1  # not changed in place
    assert set_path({}, "x.y.z", "v") == {"x": {"y": {"z": "v"}}}
    assert set_path({"a": 5}, "a.b", 1) == {"a": {"b": 1}}
    for bad in ("", "a..b", ".a"):
        with pytest.raises(InvalidArgument):
            set_path({}, bad, 1)


def test_table_alignment() -> None:
    text = table(["id", "name"], [(1, "alpha"), (22, None)])
    assert text.splitlines() == ["ID  NAME", "1   alpha", "22  -"]
