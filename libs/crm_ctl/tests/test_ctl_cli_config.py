"""``crmctl config ...`` straight on a real etcd: tables and JSON, set -> history ->
rollback -> get, apply of CRMConfig documents, and one readable line + exit code per
failure."""

from __future__ import annotations

import json
from pathlib import Path

from crm_devstack.stack import refusing_port
from ctl_testlib import args, crmctl, table_rows

FINANCE_DOCS = """\
apiVersion: crm.platform.io/v1alpha1
kind: CRMConfig
metadata: {name: finance}
spec:
  service: assignment
  key: FINANCE
  data:
    accept_timeout_s: 25
    source_priority: {400-hotline: 8}
    weights: {star: 70}
---
apiVersion: crm.platform.io/v1alpha1
kind: CRMConfig
metadata: {name: ranking}
spec:
  service: recommendation
  key: ranking
  data: {}
  rollout: {percent: 40}
"""


def test_set_history_rollback_get(etcd_endpoint: str, config_prefix: str) -> None:
    a = args(etcd_endpoint, config_prefix, "alice")
    first = crmctl(*a, "config", "set", "assignment", "SALE", "--value", '{"accept_timeout_s": 20}')
    assert first.code == 0, first.err
    assert "written at revision" in first.out
    second = crmctl(*a, "--user", "bob", "config", "set", "assignment", "SALE",
                    "--set", "weights.star=90", "--set", "accept_timeout_s=40")  # fmt: skip
    assert second.code == 0, second.err

    hist = crmctl(*a, "config", "history", "assignment", "SALE")
    assert hist.code == 0
    assert hist.out.splitlines()[0].split() == ["REVISION", "TIME", "AUTHOR", "CHANGES"]
    rows = table_rows(hist.out)
    assert [r[2] for r in rows] == ["bob", "alice"]
    assert rows[0][3] == 'accept_timeout_s: 20 -> 40; +weights={"star":90}'
    assert rows[1][3] == "(oldest kept)"
    old_revision = rows[1][0]

    hist_json = crmctl(*a, "config", "history", "assignment", "SALE", "-o", "json").json()
    assert [v["author"] for v in hist_json] == ["bob", "alice"]
    assert hist_json[0]["changes"][0] == {
        "path": "accept_timeout_s", "kind": "CHANGE_KIND_CHANGED", "old_json": "20",
        "new_json": "40",
    }  # fmt: skip

    back = crmctl(*a, "config", "rollback", "assignment", "SALE", old_revision)
    assert back.code == 0, back.err
    assert f"rolled back to the value of revision {old_revision}" in back.out

    got = crmctl(*a, "-o", "json", "config", "get", "assignment", "SALE").json()
    assert got["present"] is True
    assert json.loads(got["current"]["value_json"]) == {"accept_timeout_s": 20}
    assert got["current"]["author"] == "alice"
    assert int(got["current"]["revision"]) > int(hist_json[0]["revision"])

    table = crmctl(*a, "config", "get", "assignment", "SALE")
    assert "Author:    alice" in table.out
    assert json.loads(table.out[table.out.index("{") :]) == {"accept_timeout_s": 20}


def test_invalid_value_one_line_with_field_path(etcd_endpoint: str, config_prefix: str) -> None:
    a = args(etcd_endpoint, config_prefix)
    r = crmctl(*a, "config", "set", "assignment", "SALE", "--set", "weights.star=lots")
    assert r.code == 3
    assert r.out == ""
    assert r.err.startswith("error: INVALID_ARGUMENT: ")
    assert "value.weights.star" in r.err
    assert len(r.err.strip().splitlines()) == 1
    bad_json = crmctl(*a, "config", "set", "assignment", "SALE", "--value", "{oops")
    assert bad_json.code == 3
    assert "--value: is not valid JSON" in bad_json.err
    unknown = crmctl(*a, "config", "get", "billing", "SALE")
    assert unknown.code == 3
    assert "unknown service 'billing'" in unknown.err
    assert crmctl(*a, "config", "get", "assignment", "SALE").out.startswith(
        "assignment/SALE: not set"
    )


def test_a_business_line_is_one_config_set(etcd_endpoint: str, config_prefix: str) -> None:
    """Lines are data: ``config set`` on a new name adds a line; its code is required."""
    a = args(etcd_endpoint, config_prefix)
    no_code = crmctl(*a, "config", "set", "assignment", "LEASING", "--set", "accept_timeout_s=45")
    assert no_code.code == 3
    assert "value.code" in no_code.err
    r = crmctl(*a, "config", "set", "assignment", "LEASING", "--set", "code=4",
               "--set", "accept_timeout_s=45")  # fmt: skip
    assert r.code == 0, r.err
    got = crmctl(*a, "-o", "json", "config", "get", "assignment", "LEASING").json()
    value = json.loads(got["current"]["value_json"])
    assert (value["code"], value["accept_timeout_s"]) == (4, 45)
    bad_key = crmctl(*a, "config", "get", "assignment", "leasing")
    assert bad_key.code == 3
    assert "not a business line name" in bad_key.err


def test_conflict_exit_code(etcd_endpoint: str, config_prefix: str) -> None:
    a = args(etcd_endpoint, config_prefix)
    ok = crmctl(
        *a, "config", "set", "assignment", "SALE", "--value", "{}", "--expect-revision", "0"
    )
    assert ok.code == 0, ok.err
    again = crmctl(*a, "config", "set", "assignment", "SALE", "--value", '{"candidate_limit": 9}',
                   "--expect-revision", "0")  # fmt: skip
    assert again.code == 5
    assert again.err.startswith("error: ABORTED: assignment/SALE is at revision ")
    assert "[REVISION_CONFLICT]" in again.err


def test_apply_crmconfig_documents(etcd_endpoint: str, config_prefix: str, tmp_path: Path) -> None:
    a = args(etcd_endpoint, config_prefix)
    f = tmp_path / "finance.yaml"
    f.write_text(FINANCE_DOCS)
    r = crmctl(*a, "config", "apply", "-f", str(f))
    assert r.code == 0, r.err
    rows = table_rows(r.out)
    assert [(x[0], x[1], x[2], x[3]) for x in rows] == [
        ("finance", "assignment", "FINANCE", "configured"),
        ("ranking", "recommendation", "ranking", "rollout 40%"),
    ]
    got = crmctl(*a, "-o", "json", "config", "get", "assignment", "FINANCE").json()
    assert json.loads(got["current"]["value_json"])["source_priority"] == {"400-hotline": 8}
    again = crmctl(*a, "-o", "json", "config", "apply", "-f", "-", stdin=FINANCE_DOCS)
    assert [d["result"] for d in again.json()] == ["unchanged", "rollout 40%"]
    listed = table_rows(crmctl(*a, "config", "list").out)
    assert ["recommendation", "ranking", "defaults", "-", "-", "40%"] in listed
    rollout = crmctl(*a, "config", "rollout", "recommendation", "ranking")
    assert "40% of instances" in rollout.out
    assert "0 live" in rollout.out


def test_apply_writes_nothing_when_one_document_is_invalid(
    etcd_endpoint: str, config_prefix: str
) -> None:
    a = args(etcd_endpoint, config_prefix)
    text = (
        FINANCE_DOCS
        + """\
---
kind: CRMConfig
spec: {service: assignment, key: SALE, data: {weights: {star: "x"}}}
---
kind: Deployment
spec: {service: assignment, key: no-pe}
"""
    )
    r = crmctl(*a, "config", "apply", "-f", "-", stdin=text)
    assert r.code == 3
    lines = r.err.splitlines()
    assert lines[0].startswith("error: INVALID_ARGUMENT: ")
    fields = [ln.strip().split(":")[0] for ln in lines[1:]]
    assert fields == ["docs[3].kind", "docs[3].spec.data"]
    r = crmctl(
        *a,
        "config",
        "apply",
        "-f",
        "-",
        stdin=text.replace("kind: Deployment\n", "kind: CRMConfig\n").replace(
            "no-pe}", "no-pe, data: {}}"
        ),
    )
    assert r.code == 3
    fields = [ln.strip().split(":")[0] for ln in r.err.splitlines()[1:]]
    assert fields == ["docs[2].spec.data.weights.star", "docs[3].spec.key"]
    # nothing was written
    assert not crmctl(*a, "-o", "json", "config", "get", "assignment", "FINANCE").json()["present"]


def test_command_line_and_environment_errors(etcd_endpoint: str, config_prefix: str) -> None:
    a = args(etcd_endpoint, config_prefix)
    assert crmctl(*a, "config", "rollback", "assignment", "SALE", "zero").code == 2
    assert crmctl(*a, "config", "set", "assignment", "SALE").code == 3  # no value given
    missing = crmctl(*a, "config", "rollback", "assignment", "SALE", "12345")
    assert missing.code == 4
    assert missing.err.startswith("error: NOT_FOUND: revision 12345 of assignment/SALE")
    nofile = crmctl(*a, "config", "apply", "-f", "/nonexistent/x.yaml")
    assert nofile.code == 1
    assert "No such file" in nofile.err
    with refusing_port() as dead:
        down = crmctl("--etcd", f"127.0.0.1:{dead}", "config", "get", "assignment", "SALE")
    assert down.code == 6
    assert down.err.startswith("error: UNAVAILABLE: etcd d")
    bad_etcd = crmctl("--etcd", "nonsense", "config", "list")
    assert bad_etcd.code == 2
    assert "is not host:port" in bad_etcd.err
    assert "Traceback" not in bad_etcd.err


def test_the_finance_example_applies(etcd_endpoint: str, config_prefix: str) -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "finance.yaml"
    a = args(etcd_endpoint, config_prefix)
    r = crmctl(*a, "-o", "json", "config", "apply", "-f", str(example))
    assert r.code == 0, r.err
    assert r.json()[0]["result"] == "configured"
    got = crmctl(*a, "-o", "json", "config", "get", "assignment", "FINANCE").json()
    assert json.loads(got["current"]["value_json"])["weights"]["star"] == 80
