"""Commands over the services' gRPC APIs: tasks, agents, queue (assignment), jobs
(scheduler). Each command builds one request, calls with a deadline, renders the answer."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from typing import Any, TypeVar, cast

import grpc
from crm.assignment.v1 import assignment_pb2 as apb
from crm.assignment.v1 import assignment_pb2_grpc
from crm.common.v1 import common_pb2
from crm.scheduler.v1 import scheduler_pb2 as spb
from crm.scheduler.v1 import scheduler_pb2_grpc
from crm_common.errors import CrmError, InvalidArgument
from crm_common.lines import LINE_NAME, WELL_KNOWN_LINES

from crm_ctl.cli.output import Out, fmt_time, proto_dict

__all__ = ["add_remote_commands", "enum_arg", "enum_name"]

T = TypeVar("T")
_WELL_KNOWN_NAMES = {c: n for n, c in WELL_KNOWN_LINES.items()}


def enum_arg(enum: Any, prefix: str) -> Callable[[str], int]:
    """An argparse type accepting ``SALE``, ``sale`` or ``BUSINESS_LINE_SALE`` (``enum``: a
    generated protobuf enum)."""
    known: list[str] = list(enum.keys())
    names = [n.removeprefix(prefix) for n in known if not n.endswith("UNSPECIFIED")]

    def parse(text: str) -> int:
        name = text.strip().upper().replace("-", "_")
        name = name if name.startswith(prefix) else prefix + name
        if name.endswith("UNSPECIFIED") or name not in known:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not one of {', '.join(names)} (case-insensitive)"
            )
        return int(enum.Value(name))

    parse.__name__ = prefix.rstrip("_").lower()
    return parse


def enum_name(enum: Any, prefix: str, value: int) -> str:
    try:
        return str(enum.Name(value)).removeprefix(prefix)
    except ValueError:
        return str(value)


def LINE(text: str) -> str:
    """A business line as typed: a code (``4``) or a name (``sale``, ``LEASING``); names
    other than the well-known ones are resolved against the live config (``Ctx.line``)."""
    s = text.strip()
    if s.isdigit() and int(s) >= 1:
        return s
    name = s.upper().replace("-", "_").removeprefix("BUSINESS_LINE_")
    if LINE_NAME.fullmatch(name) is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a business line: a code >= 1 or a name such as "
            f"{', '.join(WELL_KNOWN_LINES)} (case-insensitive)"
        )
    return name


LINE.__name__ = "business_line"
CATEGORY = enum_arg(apb.Category, "CATEGORY_")
STATUS = enum_arg(apb.Status, "STATUS_")
PRESENCE = enum_arg(apb.Presence, "PRESENCE_")
JOB_STATE = enum_arg(spb.JobState, "JOB_STATE_")


def _configured_lines(args: argparse.Namespace) -> dict[str, int]:
    """Name -> code of the business lines in the live config (etcd)."""
    from crm_ctl.config.admin import ConfigAdmin

    async def go() -> dict[str, int]:
        admin = ConfigAdmin.connect(args.etcd, args.config_prefix)
        try:
            return await asyncio.wait_for(admin.business_lines(), args.timeout)
        finally:
            await admin.close()

    return asyncio.run(go())


def _cat(v: int) -> str:
    return enum_name(apb.Category, "CATEGORY_", v)


def _status(v: int) -> str:
    return enum_name(apb.Status, "STATUS_", v)


def _presence(v: int) -> str:
    return enum_name(apb.Presence, "PRESENCE_", v)


def _state(v: int) -> str:
    return enum_name(spb.JobState, "JOB_STATE_", v)


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return value


class Ctx:
    """What a command needs: its arguments, the output, and channels opened on demand."""

    def __init__(self, args: argparse.Namespace, out: Out) -> None:
        self.args = args
        self.out = out
        self._channels: list[grpc.Channel] = []
        self._lines: dict[str, int] | None = None
        self._lines_error = ""

    def channel(self, target: str) -> grpc.Channel:
        ch = grpc.insecure_channel(target)
        self._channels.append(ch)
        return ch

    def assignment(self) -> assignment_pb2_grpc.AssignmentServiceStub:
        return assignment_pb2_grpc.AssignmentServiceStub(self.channel(self.args.assignment))

    def scheduler(self) -> scheduler_pb2_grpc.SchedulerServiceStub:
        return scheduler_pb2_grpc.SchedulerServiceStub(self.channel(self.args.scheduler))

    def lines(self) -> dict[str, int]:
        """Business line name -> code: the well-known lines and, read once when first
        needed, those of the live config (lines are data; without etcd: the well-known)."""
        if self._lines is None:
            self._lines = dict(WELL_KNOWN_LINES)
            try:
                self._lines.update(_configured_lines(self.args))
            except (CrmError, OSError, TimeoutError) as exc:
                self._lines_error = str(exc) or type(exc).__name__
        return self._lines

    def line(self, ref: str | None) -> int:
        """The code of a ``--line`` argument (0: none given); INVALID_ARGUMENT if unknown."""
        if not ref:
            return 0
        if ref.isdigit():
            return int(ref)
        lines = WELL_KNOWN_LINES if ref in WELL_KNOWN_LINES else self.lines()
        if ref not in lines:
            why = f" (live config unreadable: {self._lines_error})" if self._lines_error else ""
            raise InvalidArgument.single(
                "--line",
                f"unknown business line {ref}: expected a code or one of "
                f"{', '.join(sorted(lines, key=lines.__getitem__))}{why}",
            )
        return lines[ref]

    def line_name(self, code: int) -> str:
        """A line for display: its name (well-known or configured), else its code."""
        if code in _WELL_KNOWN_NAMES:
            return _WELL_KNOWN_NAMES[code]
        if code <= 0:
            return str(code) if code else ""
        names = {c: n for n, c in sorted(self.lines().items(), reverse=True)}
        return names.get(code, str(code))

    def call(self, method: Callable[..., T], request: Any) -> T:
        return method(request, timeout=self.args.timeout)

    def close(self) -> None:
        for ch in self._channels:
            ch.close()


# --------------------------------------------------------------------------- tasks


def _page(args: argparse.Namespace) -> common_pb2.PageRequest:
    return common_pb2.PageRequest(page_size=args.limit, page_token=args.page_token or "")


def _next_page(ctx: Ctx, token: str) -> None:
    if token:
        ctx.out.line(f"(more: --page-token {token})")


def tasks_list(ctx: Ctx) -> int:
    a = ctx.args
    req = apb.ListTasksRequest(
        business_line=cast(Any, ctx.line(a.line)),
        category=cast(Any, a.category or 0),
        statuses=a.status or [],
        agent_id=a.agent or 0,
        city=a.city or "",
        page=_page(a),
    )
    resp = ctx.call(ctx.assignment().ListTasks, req)
    if ctx.out.json:
        ctx.out.doc(proto_dict(resp))
        return 0
    ctx.out.table(
        ["id", "line", "category", "status", "agent", "city", "prio", "recycles", "created", "due"],
        [
            (
                t.id,
                ctx.line_name(t.business_line),
                _cat(t.category),
                _status(t.status),
                t.agent_id or None,
                t.city,
                t.priority,
                t.recycle_count,
                fmt_time(t.created_at),
                fmt_time(t.due_at),
            )
            for t in resp.tasks
        ],
    )
    _next_page(ctx, resp.page.next_page_token)
    return 0


def tasks_get(ctx: Ctx) -> int:
    resp = ctx.call(ctx.assignment().GetTask, apb.GetTaskRequest(id=ctx.args.id))
    if ctx.out.json:
        ctx.out.doc(proto_dict(resp))
        return 0
    t, c = resp.task, resp.customer
    ctx.out.fields(
        [
            ("Task", t.id),
            ("Line", ctx.line_name(t.business_line)),
            ("Category", _cat(t.category)),
            ("Status", _status(t.status)),
            ("Agent", t.agent_id or None),
            ("City", t.city),
            ("Priority", t.priority),
            ("Brands", ", ".join(t.brands)),
            ("Customer", f"{c.id} {c.phone.masked}{' ★' if c.star else ''}"),
            ("Created", fmt_time(t.created_at)),
            ("Due", fmt_time(t.due_at)),
            ("Offer deadline", fmt_time(t.offer_deadline, has=t.HasField("offer_deadline"))),
            ("Recycles", t.recycle_count),
            ("Clues", t.clue_count),
            ("Parent task", t.parent_task_id or None),
        ]
    )
    ctx.out.line()
    ctx.out.line("History:")
    ctx.out.table(
        ["at", "event", "from", "to", "agent", "reason"],
        [
            (
                fmt_time(e.at),
                e.kind,
                _status(e.from_status) if e.from_status else None,
                _status(e.to_status),
                e.agent_id or None,
                e.reason,
            )
            for e in resp.history
        ],
    )
    rec = resp.recommendations
    ctx.out.line()
    if rec.available:
        ctx.out.line("Recommended cars:")
        ctx.out.table(
            ["car", "brand", "series", "year", "price", "score", "why"],
            [
                (
                    r.car.id,
                    r.car.brand,
                    r.car.series,
                    r.car.model_year,
                    r.car.price_yuan,
                    f"{r.score:.3f}",
                    r.reasons[0].text if r.reasons else None,
                )
                for r in rec.cars
            ],
        )
    else:
        ctx.out.line(f"Recommended cars: unavailable ({rec.unavailable_reason or 'unknown'})")
    return 0


# --------------------------------------------------------------------------- agents


def _agent_fields(ctx: Ctx, a: apb.Agent) -> None:
    ctx.out.fields(
        [
            ("Agent", a.id),
            ("Name", a.name),
            ("Line", ctx.line_name(a.business_line)),
            ("Presence", _presence(a.presence)),
            ("Tasks", f"{a.active_tasks}/{a.capacity}"),
            ("Cities", ", ".join(a.cities) or "all"),
            ("Categories", ", ".join(_cat(c) for c in a.categories) or "all"),
            ("Brands", ", ".join(a.brands)),
        ]
    )


def agents_list(ctx: Ctx) -> int:
    a = ctx.args
    req = apb.ListAgentsRequest(
        business_line=cast(Any, ctx.line(a.line)), presences=a.presence or [], page=_page(a)
    )
    resp = ctx.call(ctx.assignment().ListAgents, req)
    if ctx.out.json:
        ctx.out.doc(proto_dict(resp))
        return 0
    ctx.out.table(
        ["id", "name", "line", "presence", "tasks", "cities", "categories", "brands"],
        [
            (
                ag.id,
                ag.name,
                ctx.line_name(ag.business_line),
                _presence(ag.presence),
                f"{ag.active_tasks}/{ag.capacity}",
                ",".join(ag.cities) or "all",
                ",".join(_cat(c) for c in ag.categories) or "all",
                ",".join(ag.brands) or None,
            )
            for ag in resp.agents
        ],
    )
    _next_page(ctx, resp.page.next_page_token)
    return 0


def agents_get(ctx: Ctx) -> int:
    resp = ctx.call(ctx.assignment().GetAgent, apb.GetAgentRequest(id=ctx.args.id))
    if ctx.out.json:
        ctx.out.doc(proto_dict(resp))
        return 0
    _agent_fields(ctx, resp.agent)
    return 0


def agents_presence(ctx: Ctx) -> int:
    stub = ctx.assignment()
    if ctx.args.presence is None:
        agent = ctx.call(stub.GetAgent, apb.GetAgentRequest(id=ctx.args.id)).agent
    else:
        req = apb.SetPresenceRequest(agent_id=ctx.args.id, presence=ctx.args.presence)
        agent = ctx.call(stub.SetPresence, req).agent
    if ctx.out.json:
        ctx.out.doc({"agent_id": agent.id, "presence": _presence(agent.presence)})
    else:
        ctx.out.line(f"agent {agent.id} ({agent.name}): {_presence(agent.presence)}")
    return 0


def queue_stats(ctx: Ctx) -> int:
    req = apb.QueueStatsRequest(business_line=cast(Any, ctx.line(ctx.args.line)))
    resp = ctx.call(ctx.assignment().QueueStats, req)
    if ctx.out.json:
        ctx.out.doc(proto_dict(resp))
        return 0
    ctx.out.table(
        ["line", "category", "waiting", "offered", "in progress", "scheduled", "oldest wait"],
        [
            (
                ctx.line_name(q.business_line),
                _cat(q.category),
                q.waiting,
                q.offered,
                q.in_progress,
                q.scheduled,
                f"{q.oldest_wait_seconds:.0f}s" if q.waiting else None,
            )
            for q in resp.queues
        ],
    )
    ctx.out.line()
    ctx.out.table(
        ["line", "presence", "agents"],
        [(ctx.line_name(p.business_line), _presence(p.presence), p.agents) for p in resp.agents],
    )
    return 0


# --------------------------------------------------------------------------- jobs


def _job_rows(jobs: Any) -> list[tuple[object, ...]]:
    return [
        (
            j.id,
            j.name,
            _state(j.state),
            f"{j.attempts}/{j.max_retries + 1}",
            fmt_time(j.eta),
            fmt_time(j.next_run_time, has=j.HasField("next_run_time")),
            j.target.method,
            j.last_error_code,
        )
        for j in jobs
    ]


_JOB_HEADERS = ["id", "name", "state", "attempts", "eta", "next run", "method", "last error"]


def jobs_list(ctx: Ctx) -> int:
    a = ctx.args
    req = spb.ListRequest(
        states=a.state or [],
        name=a.name or "",
        target_method=a.method or "",
        target_address=a.address or "",
        page=_page(a),
    )
    resp = ctx.call(ctx.scheduler().List, req)
    if ctx.out.json:
        ctx.out.doc(proto_dict(resp))
        return 0
    ctx.out.table(_JOB_HEADERS, _job_rows(resp.jobs))
    _next_page(ctx, resp.page.next_page_token)
    return 0


def _job_ref(args: argparse.Namespace) -> dict[str, str]:
    return {"idempotency_key": args.key} if args.key else {"id": args.id or ""}


def _job_detail(ctx: Ctx, job: spb.Job) -> None:
    ctx.out.fields(
        [
            ("Job", job.id),
            ("Name", job.name),
            ("Idempotency key", job.idempotency_key),
            ("State", _state(job.state)),
            ("Target", f"{job.target.method} @ {job.target.address}"),
            ("ETA", fmt_time(job.eta)),
            ("Next run", fmt_time(job.next_run_time, has=job.HasField("next_run_time"))),
            ("Attempts", f"{job.attempts} (of {job.max_retries + 1}; {job.total_attempts} in all)"),
            ("Reruns", job.reruns),
            (
                "Last error",
                f"{job.last_error_code}: {job.last_error_message}" if job.last_error_code else None,
            ),
            ("Created", fmt_time(job.create_time)),
            ("Finished", fmt_time(job.finish_time, has=job.HasField("finish_time"))),
        ]
    )


def _job_call(name: str) -> Callable[[Ctx], int]:
    requests = {"get": spb.GetRequest, "cancel": spb.CancelRequest, "rerun": spb.RerunRequest}
    methods = {"get": "Get", "cancel": "Cancel", "rerun": "Rerun"}

    def run(ctx: Ctx) -> int:
        stub = ctx.scheduler()
        resp = ctx.call(getattr(stub, methods[name]), requests[name](**_job_ref(ctx.args)))
        if ctx.out.json:
            ctx.out.doc(proto_dict(resp))
        else:
            _job_detail(ctx, resp.job)
        return 0

    return run


# --------------------------------------------------------------------------- parser


def add_remote_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """``tasks``, ``agents``, ``queue``, ``jobs``; each leaf sets ``func(ctx) -> int``."""
    tasks = sub.add_parser("tasks", help="tasks of the assignment service").add_subparsers(
        dest="sub", required=True, metavar="{list,get}"
    )
    p = tasks.add_parser("list", parents=[common], help="list tasks (newest first)")
    p.add_argument(
        "--line",
        type=LINE,
        help="business line: SALE, AFTER_SALE, FINANCE, a configured one, a code",
    )
    p.add_argument("--category", type=CATEGORY, help="NEW_CLUE, REVISIT, FAILED_ORDER")
    p.add_argument("--status", type=STATUS, action="append", help="repeatable, e.g. UNASSIGNED")
    p.add_argument("--agent", type=positive, help="only tasks of this agent")
    p.add_argument("--city", help="only this city")
    _paging(p)
    p.set_defaults(func=tasks_list)
    p = tasks.add_parser("get", parents=[common], help="one task with its history")
    p.add_argument("id", type=positive)
    p.set_defaults(func=tasks_get)

    agents = sub.add_parser("agents", help="agents of the assignment service").add_subparsers(
        dest="sub", required=True, metavar="{list,get,presence}"
    )
    p = agents.add_parser("list", parents=[common], help="list agents (by id)")
    p.add_argument(
        "--line",
        type=LINE,
        help="business line: SALE, AFTER_SALE, FINANCE, a configured one, a code",
    )
    p.add_argument(
        "--presence", type=PRESENCE, action="append", help="repeatable: OFFLINE, IDLE, BUSY, BREAK"
    )
    _paging(p)
    p.set_defaults(func=agents_list)
    p = agents.add_parser("get", parents=[common], help="one agent")
    p.add_argument("id", type=positive)
    p.set_defaults(func=agents_get)
    p = agents.add_parser("presence", parents=[common], help="show or set an agent's presence")
    p.add_argument("id", type=positive)
    p.add_argument("presence", nargs="?", type=PRESENCE, help="OFFLINE, IDLE, BUSY, BREAK")
    p.set_defaults(func=agents_presence)

    queue = sub.add_parser("queue", help="queues of the assignment service").add_subparsers(
        dest="sub", required=True, metavar="{stats}"
    )
    p = queue.add_parser("stats", parents=[common], help="queue depths and agents by presence")
    p.add_argument("--line", type=LINE, help="only this business line")
    p.set_defaults(func=queue_stats)

    jobs = sub.add_parser("jobs", help="jobs of the scheduler service").add_subparsers(
        dest="sub", required=True, metavar="{list,get,cancel,rerun}"
    )
    p = jobs.add_parser("list", parents=[common], help="list jobs (oldest first)")
    p.add_argument("--state", type=JOB_STATE, action="append", help="repeatable, e.g. DEAD")
    p.add_argument("--name", help="only jobs with this name")
    p.add_argument("--method", help="only jobs calling this full method name")
    p.add_argument("--address", help="only jobs calling this address")
    _paging(p)
    p.set_defaults(func=jobs_list)
    for name, text in (
        ("get", "one job"),
        ("cancel", "cancel a job that has not run"),
        ("rerun", "run a DEAD job again"),
    ):
        p = jobs.add_parser(name, parents=[common], help=text)
        g = p.add_mutually_exclusive_group(required=True)
        g.add_argument("id", nargs="?", help="job id")
        g.add_argument("--key", help="the job's idempotency key instead of its id")
        p.set_defaults(func=_job_call(name))


def _paging(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=positive, default=50, help="page size (default 50)")
    p.add_argument("--page-token", help="the token printed after the previous page")
