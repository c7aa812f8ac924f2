"""``crmctl config ...``: the config-admin library directly on etcd (works without any
server: a local etcd is enough)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml
from crm_common.errors import FieldViolation, InvalidArgument

from crm_ctl.api import rollout_pb, version_pb
from crm_ctl.cli.output import Out, fmt_time, proto_dict
from crm_ctl.cli.remote import positive
from crm_ctl.config import ChangeKind, ConfigAdmin, Version
from crm_ctl.config.diff import Change, to_json
from crm_ctl.config.document import parse_documents, set_path

__all__ = ["add_config_commands"]

Command = Callable[[ConfigAdmin, argparse.Namespace, Out], Awaitable[int]]


def _source(v: Version) -> str:
    if v.source.value == "crmconfig":
        return f"operator (gen {v.generation})"
    return v.author or ("-" if v.source.value == "unknown" else "?")


def _changes(changes: tuple[Change, ...], has_previous: bool) -> str:
    if not has_previous:
        return "(oldest kept)"
    parts = []
    for c in changes:
        if c.kind is ChangeKind.ADDED:
            parts.append(f"+{c.path}={to_json(c.new)}")
        elif c.kind is ChangeKind.REMOVED:
            parts.append(f"-{c.path}")
        else:
            parts.append(f"{c.path}: {to_json(c.old)} -> {to_json(c.new)}")
    return "; ".join(parts) or "(no change)"


def _version_doc(v: Version) -> dict[str, Any]:
    return proto_dict(version_pb(v))


async def config_list(admin: ConfigAdmin, a: argparse.Namespace, out: Out) -> int:
    keys = await admin.list(a.service)
    if out.json:
        out.doc(
            [
                {
                    "service": k.service,
                    "key": k.key,
                    "known": k.known,
                    "present": k.present,
                    "revision": k.revision,
                    "author": k.author,
                    "time": k.time,
                    "rollout_percent": k.rollout_percent,
                }
                for k in keys
            ]
        )
        return 0
    out.table(
        ["service", "key", "revision", "author", "updated", "rollout"],
        [
            (
                k.service,
                k.key if k.known else f"{k.key} (unknown)",
                k.revision if k.present else "defaults",
                k.author or ("operator" if k.source.value == "crmconfig" else None),
                fmt_time(k.time),
                f"{k.rollout_percent}%" if k.rollout_percent is not None else None,
            )
            for k in keys
        ],
    )
    return 0


async def config_get(admin: ConfigAdmin, a: argparse.Namespace, out: Out) -> int:
    current = await admin.get(a.service, a.key)
    v = current.version
    if out.json:
        out.doc({"present": current.present, "current": _version_doc(v)})
        return 0
    if not current.present:
        out.line(f"{a.service}/{a.key}: not set; the service applies its defaults:")
        out.mapping(ConfigAdmin.defaults(a.service, a.key) or {})
        return 0
    out.fields(
        [
            ("Key", f"{a.service}/{a.key}"),
            ("Revision", v.revision),
            ("Author", _source(v)),
            ("Updated", fmt_time(v.time)),
        ]
    )
    out.mapping(v.value or {})
    return 0


def _load_value(a: argparse.Namespace, base: dict[str, Any] | None) -> dict[str, Any]:
    """The value of ``config set`` from --value, -f or --set (on top of the current one)."""
    if a.value is not None:
        value: dict[str, Any] = ConfigAdmin.parse_value(a.value, "--value")
        return value
    if a.file is not None:
        text = sys.stdin.read() if a.file == "-" else Path(a.file).read_text()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InvalidArgument.single("--file", f"is not valid YAML/JSON: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidArgument.single("--file", "must hold one object")
        return data
    patched: dict[str, Any] = dict(base or {})
    for item in a.set:
        path, sep, text = item.partition("=")
        if not sep:
            raise InvalidArgument.single("--set", f"{item!r} is not path=value")
        try:
            field_value = json.loads(text)
        except ValueError:
            field_value = text  # a bare word: a string
        patched = set_path(patched, path.strip(), field_value)
    return patched


async def config_set(admin: ConfigAdmin, a: argparse.Namespace, out: Out) -> int:
    if sum(x is not None and x != [] for x in (a.value, a.file, a.set)) != 1:
        raise InvalidArgument.single("value", "give exactly one of --value, -f/--file, --set")
    base = None
    if a.set:
        current = await admin.get(a.service, a.key)
        base = current.version.value if current.present else admin.defaults(a.service, a.key)
        if a.expect_revision is None:  # patching what we read: do not overwrite a newer one
            a.expect_revision = current.version.revision
    data = _load_value(a, base)
    result = await admin.set(
        a.service,
        a.key,
        data,
        author=a.user,
        expected_revision=a.expect_revision,
        rollout_percent=a.rollout_percent,
        force=a.force,
        field="value",
    )
    if out.json:
        out.doc(
            {
                "changed": result.changed,
                "rollout_revision": result.rollout_revision,
                "version": _version_doc(result.version),
            }
        )
        return 0
    if result.rollout_revision:
        out.line(
            f"{a.service}/{a.key}: rollout to {a.rollout_percent}% at revision "
            f"{result.rollout_revision} (stable stays at {result.version.revision})"
        )
    elif result.changed:
        out.line(f"{a.service}/{a.key}: written at revision {result.version.revision}")
    else:
        out.line(f"{a.service}/{a.key}: unchanged (revision {result.version.revision})")
    return 0


async def config_history(admin: ConfigAdmin, a: argparse.Namespace, out: Out) -> int:
    versions = await admin.history(a.service, a.key)
    if out.json:
        out.doc([_version_doc(v) for v in versions])
        return 0
    out.table(
        ["revision", "time", "author", "changes"],
        [
            (v.revision, fmt_time(v.time), _source(v), _changes(v.changes, v.has_previous))
            for v in versions
        ],
    )
    return 0


async def config_rollback(admin: ConfigAdmin, a: argparse.Namespace, out: Out) -> int:
    result = await admin.rollback(
        a.service,
        a.key,
        a.revision,
        author=a.user,
        expected_revision=a.expect_revision,
        force=a.force,
    )
    if out.json:
        out.doc({"changed": result.changed, "version": _version_doc(result.version)})
        return 0
    if result.changed:
        out.line(
            f"{a.service}/{a.key}: rolled back to the value of revision {a.revision}, "
            f"now revision {result.version.revision}"
        )
    else:
        out.line(
            f"{a.service}/{a.key}: already holds the value of revision {a.revision} "
            f"(revision {result.version.revision})"
        )
    return 0


async def config_rollout(admin: ConfigAdmin, a: argparse.Namespace, out: Out) -> int:
    state = await admin.rollout(a.service, a.key)
    resp = rollout_pb(state)
    if out.json:
        out.doc(proto_dict(resp))
        return 0
    stable = state.stable
    out.fields(
        [
            ("Key", f"{a.service}/{a.key}"),
            ("Stable", stable.revision if stable.revision else "absent (defaults)"),
            (
                "Rollout",
                f"{state.candidate_percent}% of instances, revision {state.candidate_revision}"
                if state.candidate_revision
                else "none",
            ),
            (
                "Instances",
                f"{len(state.instances)} live: {resp.on_stable} stable, "
                f"{resp.on_candidate} candidate, {resp.lagging} lagging",
            ),
        ]
    )
    out.line()
    out.table(
        ["instance", "applied", "version", "bucket", "rejected", "acked"],
        [
            (
                i.instance,
                i.applied_revision or None,
                i.version.value,
                i.bucket,
                i.rejected_revision or None,
                fmt_time(i.ack_time),
            )
            for i in state.instances
        ],
    )
    return 0


async def config_apply(admin: ConfigAdmin, a: argparse.Namespace, out: Out) -> int:
    text = sys.stdin.read() if a.file == "-" else await asyncio.to_thread(Path(a.file).read_text)
    decls = parse_documents(text)
    # validate everything before writing anything
    problems: list[FieldViolation] = []
    for d in decls:
        try:
            admin.check_target(d.service, d.key)
            admin.validate(d.service, d.key, d.data, field=f"{d.where}.spec.data")
        except InvalidArgument as exc:
            problems.extend(
                v
                if v.field.startswith(d.where)
                else FieldViolation(f"{d.where}.spec.{v.field}", v.description)
                for v in exc.violations
            )
    if problems:
        raise InvalidArgument(problems)
    rows: list[tuple[object, ...]] = []
    docs: list[dict[str, Any]] = []
    for d in decls:
        if a.dry_run:
            result = "valid (dry run)"
            revision: object = None
        else:
            r = await admin.set(
                d.service,
                d.key,
                d.data,
                author=a.user,
                rollout_percent=d.rollout_percent,
                force=a.force,
            )
            revision = r.rollout_revision or r.version.revision
            if r.rollout_revision:
                result = f"rollout {d.rollout_percent}%"
            else:
                result = "configured" if r.changed else "unchanged"
        rows.append((d.name, d.service, d.key, result, revision))
        docs.append(
            {
                "name": d.name,
                "service": d.service,
                "key": d.key,
                "result": result,
                "revision": revision,
            }
        )
    if out.json:
        out.doc(docs)
    else:
        out.table(["name", "service", "key", "result", "revision"], rows)
    return 0


def add_config_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """``config list|get|set|history|rollback|rollout|apply``; leaves set ``config_func``."""
    cfg = sub.add_parser(
        "config", help="live configuration in etcd (validated like the operator does)"
    ).add_subparsers(
        dest="sub", required=True, metavar="{list,get,set,history,rollback,rollout,apply}"
    )

    def target(p: argparse.ArgumentParser) -> None:
        p.add_argument("service", help="e.g. assignment, recommendation")
        p.add_argument("key", help="e.g. SALE, FINANCE, ranking")

    p = cfg.add_parser("list", parents=[common], help="services and their keys")
    p.add_argument("service", nargs="?", help="only this service")
    p.set_defaults(config_func=config_list)

    p = cfg.add_parser("get", parents=[common], help="the current value of a key")
    target(p)
    p.set_defaults(config_func=config_get)

    p = cfg.add_parser("set", parents=[common], help="validate and write a value")
    target(p)
    p.add_argument("--value", help="the whole value as JSON")
    p.add_argument("-f", "--file", help="the whole value from a JSON/YAML file (- : stdin)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="change one field of the current value (repeatable), e.g. "
        "weights.star=80; VALUE is JSON or a bare string",
    )
    _write_flags(p)
    p.add_argument(
        "--rollout-percent",
        type=int,
        metavar="P",
        help="roll out to P%% of the instances instead (100 promotes)",
    )
    p.set_defaults(config_func=config_set)

    p = cfg.add_parser("history", parents=[common], help="kept versions with their changes")
    target(p)
    p.set_defaults(config_func=config_history)

    p = cfg.add_parser("rollback", parents=[common], help="write a kept version again")
    target(p)
    p.add_argument("revision", type=positive, help="a revision from `config history`")
    _write_flags(p)
    p.set_defaults(config_func=config_rollback)

    p = cfg.add_parser("rollout", parents=[common], help="which instances applied what")
    target(p)
    p.set_defaults(config_func=config_rollout)

    p = cfg.add_parser("apply", parents=[common], help="apply CRMConfig documents from YAML")
    p.add_argument(
        "-f", "--file", required=True, help="YAML file of CRMConfig documents (-: stdin)"
    )
    p.add_argument("--dry-run", action="store_true", help="validate only")
    p.add_argument("--force", action="store_true", help="write keys a CRMConfig declares too")
    p.set_defaults(config_func=config_apply)


def _write_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--expect-revision",
        type=int,
        metavar="REV",
        help="write only if the key is still at REV (0: only if absent)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write even though a CRMConfig declares the key (it will be reverted)",
    )
