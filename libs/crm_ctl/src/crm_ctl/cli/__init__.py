"""``crmctl``: the platform from a terminal, for ops and developers.

    crmctl tasks list --line SALE --status UNASSIGNED      # assignment service
    crmctl tasks get 42 | agents list --line SALE --presence IDLE | agents get 7
    crmctl agents presence 7 IDLE | queue stats
    crmctl jobs list --state DEAD | jobs get ID | jobs cancel ID | jobs rerun ID
    crmctl config list | get assignment FINANCE | set assignment SALE --set weights.star=80
    crmctl config history assignment SALE | rollback assignment SALE 41 | rollout ...
    crmctl config apply -f finance.yaml                     # CRMConfig documents
    crmctl bi replay --dry-run                              # failed BI events
    crmctl serve-config-admin                               # the ConfigAdmin gRPC server

Every command prints a readable table, or JSON with ``-o json`` (or ``--json``). Targets
come from flags or ``CRM_CTL_*`` environment variables. A failure prints one line (``error: CODE:
message``, then each field at fault) and exits with a code per kind of failure (below).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Sequence
from typing import IO, Any

import grpc
from crm_common.errors import CrmError, InvalidArgument, error_reason, field_violations
from crm_common.settings import parse_endpoints
from pydantic import ValidationError

from crm_ctl.cli.config_cmds import add_config_commands
from crm_ctl.cli.output import Out
from crm_ctl.cli.remote import Ctx, add_remote_commands
from crm_ctl.settings import CtlSettings

__all__ = ["EXIT_CODES", "main"]

EXIT_CODES: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 3,
    grpc.StatusCode.OUT_OF_RANGE: 3,
    grpc.StatusCode.NOT_FOUND: 4,
    grpc.StatusCode.ABORTED: 5,
    grpc.StatusCode.FAILED_PRECONDITION: 5,
    grpc.StatusCode.ALREADY_EXISTS: 5,
    grpc.StatusCode.UNAVAILABLE: 6,
    grpc.StatusCode.DEADLINE_EXCEEDED: 6,
    grpc.StatusCode.PERMISSION_DENIED: 7,
    grpc.StatusCode.UNAUTHENTICATED: 7,
}
"""Exit status per gRPC code; 0 success, 2 bad command line, 1 anything else."""

EPILOG = """exit status: 0 ok, 1 other failure, 2 bad command line, 3 invalid argument,
4 not found, 5 conflict or wrong state (aborted, failed precondition, already exists),
6 unreachable or too slow (unavailable, deadline exceeded), 7 not allowed.

environment: CRM_CTL_ASSIGNMENT_TARGET, CRM_CTL_SCHEDULER_TARGET, CRM_CTL_ETCD_ENDPOINTS,
CRM_CTL_CONFIG_PREFIX, CRM_CTL_USER, CRM_CTL_TIMEOUT_S (flags win); bi replay reads the
CRM_BILOG_* settings of the bilog service."""


def _endpoints(text: str) -> str:
    try:
        parse_endpoints(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _parser(defaults: CtlSettings) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-o",
        "--output",
        choices=["table", "json"],
        default=argparse.SUPPRESS,
        help="output format (default table)",
    )
    common.add_argument(
        "--json",
        dest="output",
        action="store_const",
        const="json",
        default=argparse.SUPPRESS,
        help="same as -o json",
    )
    parser = argparse.ArgumentParser(
        prog="crmctl",
        description="CRM platform CLI: tasks, agents, queues, jobs, live config, BI replay.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    parser.add_argument(
        "--assignment",
        default=defaults.assignment_target,
        metavar="HOST:PORT",
        help="assignment service (default %(default)s)",
    )
    parser.add_argument(
        "--scheduler",
        default=defaults.scheduler_target,
        metavar="HOST:PORT",
        help="scheduler service (default %(default)s)",
    )
    parser.add_argument(
        "--etcd",
        type=_endpoints,
        default=defaults.etcd_endpoints,
        metavar="HOST:PORT,...",
        help="etcd endpoints of the live config (default %(default)s)",
    )
    parser.add_argument(
        "--config-prefix",
        default=defaults.config_prefix,
        help="etcd key prefix of the live config (default %(default)s)",
    )
    parser.add_argument(
        "--user",
        default=defaults.user,
        help="author recorded in the config history (default %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=defaults.timeout_s,
        metavar="SECONDS",
        help="deadline of one call (default %(default)s)",
    )
    parser.set_defaults(history_limit=defaults.history_limit)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_remote_commands(sub, common)
    add_config_commands(sub, common)

    bi = sub.add_parser("bi", help="BI log pipeline").add_subparsers(
        dest="sub", required=True, metavar="{replay}"
    )
    p = bi.add_parser(
        "replay", parents=[common], help="re-submit failed BI events (bad rows) after a fix"
    )
    p.add_argument("--from-beginning", action="store_true", help="ignore committed offsets")
    p.add_argument("--schema", help="only bad rows of this schema (full name)")
    p.add_argument("--dry-run", action="store_true", help="validate only; produce nothing")
    p.add_argument("--kafka-bootstrap", help="overrides CRM_BILOG_KAFKA_BOOTSTRAP")
    p.add_argument("--schema-registry-url", help="overrides CRM_BILOG_SCHEMA_REGISTRY_URL")
    p.set_defaults(func=bi_replay)

    p = sub.add_parser(
        "serve-config-admin", help="run the ConfigAdmin gRPC server (settings: CRM_CONFIG_ADMIN_*)"
    )
    p.add_argument("--host", help="overrides CRM_CONFIG_ADMIN_HOST")
    p.add_argument("--port", type=int, help="overrides CRM_CONFIG_ADMIN_PORT (default 50056)")
    p.set_defaults(func=serve_config_admin)
    return parser


def bi_replay(ctx: Ctx) -> int:
    from crm_bilog.replay import replay
    from crm_bilog.settings import BilogSettings

    a = ctx.args
    overrides: dict[str, Any] = {}
    if a.kafka_bootstrap:
        overrides["kafka_bootstrap"] = a.kafka_bootstrap
    if a.schema_registry_url:
        overrides["schema_registry_url"] = a.schema_registry_url
    settings = BilogSettings(**overrides)
    report = asyncio.run(
        replay(settings, from_beginning=a.from_beginning, only_schema=a.schema, dry_run=a.dry_run)
    )
    doc = {
        "read": report.read,
        "replayed": report.replayed,
        "still_failing": report.still_failing,
        "unrecoverable": report.unrecoverable,
        "by_schema": report.by_schema,
        "dry_run": a.dry_run,
    }
    if ctx.out.json:
        ctx.out.doc(doc)
    else:
        ctx.out.fields(
            [
                ("Read", report.read),
                ("Replayed", report.replayed if not a.dry_run else f"{report.replayed} (dry run)"),
                ("Still failing", report.still_failing),
                ("Unrecoverable", report.unrecoverable),
            ]
        )
        if report.by_schema:
            ctx.out.line()
            ctx.out.table(["schema", "replayed"], sorted(report.by_schema.items()))
    return 0 if report.still_failing == 0 else 1


def serve_config_admin(ctx: Ctx) -> int:
    from crm_common.logs import configure_logging

    from crm_ctl.app import build_app
    from crm_ctl.settings import ConfigAdminSettings

    overrides: dict[str, Any] = {}
    if ctx.args.host:
        overrides["host"] = ctx.args.host
    if ctx.args.port is not None:
        overrides["port"] = ctx.args.port
    settings = ConfigAdminSettings(**overrides)
    configure_logging("config-admin", settings.log_level)
    asyncio.run(build_app(settings).run_until_signal())
    return 0


def _check_user(user: str) -> None:
    """The author recorded by config writes: the same rule as ConfigAdmin's header."""
    from crm_ctl.config import ConfigAdmin

    try:
        ConfigAdmin.check_author(user)
    except InvalidArgument:
        raise InvalidArgument.single(
            "--user", "must be 1..128 printable ASCII characters"
        ) from None


async def _run_config(ctx: Ctx) -> int:
    from crm_ctl.config import ConfigAdmin

    a = ctx.args
    admin = ConfigAdmin.connect(a.etcd, a.config_prefix, a.history_limit)
    try:
        code: int = await a.config_func(admin, a, ctx.out)
        return code
    finally:
        await admin.close()


def _report(
    err: IO[str],
    code: grpc.StatusCode,
    message: str,
    violations: Sequence[tuple[str, str]],
    reason: str | None,
) -> int:
    line = f"error: {code.name}: {message}"
    if reason and reason not in message:
        line += f" [{reason}]"
    err.write(line.rstrip() + "\n")
    if len(violations) > 1 or (violations and violations[0][0] not in message):
        for field, description in violations:
            err.write(f"  {field}: {description}\n")
    return EXIT_CODES.get(code, 1)


def main(
    argv: Sequence[str] | None = None, stdout: IO[str] | None = None, stderr: IO[str] | None = None
) -> int:
    """Run one command; returns the exit status (see :data:`EXIT_CODES`)."""
    out_stream = stdout or sys.stdout
    err = stderr or sys.stderr
    try:
        defaults = CtlSettings()
    except ValidationError as exc:
        bad = "; ".join(
            f"CRM_CTL_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()
        )
        err.write(f"error: bad environment: {bad}\n")
        return 2
    parser = _parser(defaults)
    try:
        with contextlib.redirect_stdout(out_stream), contextlib.redirect_stderr(err):
            args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed the usage and the problem
        return int(exc.code or 0)
    ctx = Ctx(args, Out(out_stream, getattr(args, "output", "table")))
    try:
        if hasattr(args, "config_func"):
            _check_user(args.user)
            return asyncio.run(_run_config(ctx))
        code: int = args.func(ctx)
        return code
    except grpc.RpcError as exc:
        status = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
        details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
        return _report(err, status, details or "", field_violations(exc), error_reason(exc))
    except CrmError as exc:
        violations = [
            (v.field, v.description)
            for v in getattr(exc, "violations", ())
            if isinstance(exc, InvalidArgument)
        ]
        return _report(err, exc.code, exc.message, violations, exc.reason)
    except OSError as exc:  # a file named on the command line
        err.write(f"error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        err.write("interrupted\n")
        return 130
    finally:
        ctx.close()
