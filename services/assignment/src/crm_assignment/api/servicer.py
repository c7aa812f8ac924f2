"""``AssignmentServicer``: the thin grpc.aio servicer of ``crm.assignment.v1``.

Each handler validates the request (``validation``), runs the store call in the blocking
executor (CreateClue through the ``ClueBatcher``: one transaction per batch of concurrent
calls), converts the result (``convert``) and wakes the offer streams that may now find
work (``offers``). Errors are raised as ``crm_common.errors`` exceptions; the server
interceptor turns them into statuses with field details.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from crm.assignment.v1 import assignment_pb2 as pb
from crm.assignment.v1 import assignment_pb2_grpc
from crm_common.aio import BlockingExecutor
from crm_common.errors import (
    Aborted,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    PreconditionViolation,
    Unavailable,
    Validator,
)
from crm_common.logs import request_id_var
from crm_common.tracing import request_origin

from crm_assignment.api import convert, validation
from crm_assignment.api.action_batcher import ActionBatcher
from crm_assignment.api.auth import AgentAuth
from crm_assignment.api.clue_batcher import ClueBatcher
from crm_assignment.api.dispatch_batcher import DispatchBatcher
from crm_assignment.api.offers import CONTENDED_RETRY_S, OfferHub
from crm_assignment.clients.recommendation import NotConfigured, TaskRecommender
from crm_assignment.clients.timeouts import OfferTimeouts
from crm_assignment.config import RoutingConfig
from crm_assignment.domain import rules
from crm_assignment.domain.agent_query import AgentCursor
from crm_assignment.domain.model import (
    WAITING_STATUSES,
    BusinessLine,
    Clock,
    Offer,
    Presence,
    Task,
)
from crm_assignment.domain.paging import Cursor
from crm_assignment.domain.phone import PhoneProtector
from crm_assignment.store import AssignmentStore, NoOffer
from crm_assignment.store.repository import ActionKind, TaskAction

if TYPE_CHECKING:
    from grpc import aio

    Context = aio.ServicerContext[Any, Any]
else:
    Context = Any

__all__ = ["AssignmentServicer"]

log = logging.getLogger("crm.assignment.api")

RESERVATION_SLACK_S = 0.05
"""How long after a revisit's reservation ends its line is woken (the dispatch must see
the reservation over by its own clock)."""


class AssignmentServicer(assignment_pb2_grpc.AssignmentServiceServicer):
    """Every RPC of ``crm.assignment.v1.AssignmentService``."""

    def __init__(
        self,
        *,
        store: AssignmentStore,
        executor: BlockingExecutor,
        clock: Clock,
        routing: Callable[[], RoutingConfig],
        hub: OfferHub,
        protector: PhoneProtector,
        timeouts: OfferTimeouts,
        dispatch_poll_s: float,
        on_offer: Callable[[Offer], None] | None = None,
        clue_batch_max: int = 64,
        recommendations: TaskRecommender | None = None,
        on_recycled: Callable[[list[Task]], None] | None = None,
        auth: AgentAuth,
        token_ttl_s: int = 43200,
        host_name: str = "",
    ) -> None:
        self._store = store
        self.clues = ClueBatcher(store, executor, clue_batch_max)
        self.actions = ActionBatcher(store, executor, clue_batch_max)
        self.dispatcher = DispatchBatcher(
            store, executor, clock, routing, clue_batch_max, on_unclaimed=self._offer_unclaimed
        )
        self._run = executor.run
        self._clock = clock
        self._routing = routing
        self._hub = hub
        self._protector = protector
        self._timeouts = timeouts
        self._poll_s = dispatch_poll_s
        self._recommendations = recommendations or NotConfigured()
        self._on_offer = on_offer
        self._on_recycled = on_recycled
        self._auth = auth
        self._token_ttl_s = token_ttl_s
        self._host = host_name or socket.gethostname()

    # ------------------------------------------------------------------ clues & reads

    async def CreateClue(
        self, request: pb.CreateClueRequest, context: Context
    ) -> pb.CreateClueResponse:
        self._auth.require_service(context, "CreateClue")
        routing = self._routing()
        # the request's origin goes with the clue: its batch runs in a context of its own
        clue = validation.new_clue(request, self._protector, routing, request_origin())
        _check_line_open(routing, clue.business_line)
        cfg = routing.line(clue.business_line)
        now = self._clock()
        result = await self.clues.submit(clue, now, cfg)  # group commit with concurrent calls
        task = result.task
        if not result.replayed and task.status in WAITING_STATUSES and task.due_at <= now:
            self._hub.task_waiting(task.business_line)
        return pb.CreateClueResponse(
            task=convert.task_pb(result.task),
            clue=convert.clue_pb(result.clue),
            merged=result.merged,
        )

    async def GetTask(self, request: pb.GetTaskRequest, context: Context) -> pb.GetTaskResponse:
        caller = self._auth.caller(context)
        with Validator() as v:
            validation.positive_id(v, request.id, "id")
        d = await self._run(self._store.get_task, request.id)
        if caller is not None and not rules.visible_to_agent(d, caller):
            raise NotFound(f"task {request.id} not found")  # existence not revealed
        # After the database work (no connection held): a short deadline, never raises.
        recommendations = await self._recommendations.for_task(d)
        return pb.GetTaskResponse(
            task=convert.task_pb(d.task),
            customer=convert.customer_pb(d.customer),
            clues=[convert.clue_pb(c) for c in d.clues],
            history=[convert.task_event_pb(e) for e in d.history],
            recommendations=recommendations,
            calls=[convert.call_pb(c) for c in d.calls],
        )

    async def ListTasks(
        self, request: pb.ListTasksRequest, context: Context
    ) -> pb.ListTasksResponse:
        caller = self._auth.caller(context)
        q = validation.list_query(request, self._routing())
        if caller is not None:  # an agent lists only its own tasks
            if q.filter.agent_id not in (None, caller):
                raise PermissionDenied(
                    f"signed in as agent {caller}: cannot list agent {q.filter.agent_id}'s tasks",
                    reason="NOT_THIS_AGENT",
                )
            q = dataclasses.replace(q, filter=dataclasses.replace(q.filter, agent_id=caller))
        tasks, more = await self._run(self._store.list_tasks, q.filter, q.page_size, q.after)
        response = pb.ListTasksResponse(tasks=[convert.task_pb(t) for t in tasks])
        if more and tasks:
            last = tasks[-1]
            cursor = Cursor(created_at=last.created_at, id=last.id)
            response.page.next_page_token = cursor.encode(q.filters_hash)
        return response

    async def QueueStats(
        self, request: pb.QueueStatsRequest, context: Context
    ) -> pb.QueueStatsResponse:
        routing = self._routing()
        with Validator() as v:
            line = validation.optional_line(v, request.business_line, "business_line", routing)
        stats = await self._run(self._store.queue_stats, line, self._clock(), routing.all_lines())
        return convert.queue_stats_pb(stats)

    # ------------------------------------------------------------------ agents

    async def UpsertAgent(
        self, request: pb.UpsertAgentRequest, context: Context
    ) -> pb.UpsertAgentResponse:
        self._auth.require_service(context, "UpsertAgent")
        spec = validation.agent_spec(request, self._routing())
        agent, created = await self._run(self._store.upsert_agent, spec, self._clock())
        self._hub.wake_agent(agent.id, agent.business_line)
        return pb.UpsertAgentResponse(agent=convert.agent_pb(agent), created=created)

    async def GetAgent(self, request: pb.GetAgentRequest, context: Context) -> pb.GetAgentResponse:
        with Validator() as v:
            validation.positive_id(v, request.id, "id")
        self._auth.require_self(context, request.id)
        agent = await self._run(self._store.get_agent, request.id)
        return pb.GetAgentResponse(agent=convert.agent_pb(agent))

    async def ListAgents(
        self, request: pb.ListAgentsRequest, context: Context
    ) -> pb.ListAgentsResponse:
        q = validation.agent_list_query(request, self._routing())
        self._auth.require_service(context, "ListAgents")
        after = q.after.id if q.after is not None else None
        agents, more = await self._run(self._store.list_agents, q.filter, q.page_size, after)
        response = pb.ListAgentsResponse(agents=[convert.agent_pb(a) for a in agents])
        if more and agents:
            response.page.next_page_token = AgentCursor(agents[-1].id).encode(q.filters_hash)
        return response

    async def SetPresence(
        self, request: pb.SetPresenceRequest, context: Context
    ) -> pb.SetPresenceResponse:
        with Validator() as v:
            validation.positive_id(v, request.agent_id, "agent_id")
            presence = validation.presence(v, request.presence, "presence")
        self._auth.require_self(context, request.agent_id)
        assert presence is not None
        agent = await self._run(self._store.set_presence, request.agent_id, presence, self._clock())
        if presence is Presence.IDLE:
            self._hub.wake_agent(agent.id, agent.business_line)
        return pb.SetPresenceResponse(agent=convert.agent_pb(agent))

    async def SetCustomerStar(
        self, request: pb.SetCustomerStarRequest, context: Context
    ) -> pb.SetCustomerStarResponse:
        self._auth.require_service(context, "SetCustomerStar")
        with Validator() as v:
            validation.positive_id(v, request.customer_id, "customer_id")
        customer = await self._run(
            self._store.set_customer_star, request.customer_id, request.star, self._clock()
        )
        return pb.SetCustomerStarResponse(customer=convert.customer_pb(customer))

    # ------------------------------------------------------------------ offers

    async def StreamOffers(
        self, request: pb.StreamOffersRequest, context: Context
    ) -> AsyncIterator[pb.StreamOffersResponse]:
        with Validator() as v:
            validation.positive_id(v, request.agent_id, "agent_id")
        self._auth.require_self(context, request.agent_id)
        agent_id = request.agent_id
        agent = await self._run(self._store.get_agent, agent_id)  # NOT_FOUND if unknown
        if self._hub.closing:
            raise Unavailable("the server is shutting down", reason="SHUTTING_DOWN")
        stream = await self._hub.open(agent_id, agent.business_line)
        log.info("offer stream opened", extra={"agent_id": agent_id})
        try:
            # Offers made before (a reconnect, a replaced stream) are pushed again.
            for pending in await self._run(self._store.pending_offers, agent_id, self._clock()):
                yield pb.StreamOffersResponse(offer=convert.offer_pb(pending))
            while True:
                if stream.replaced:
                    raise Aborted(
                        f"a newer offer stream of agent {agent_id} replaced this one",
                        reason="STREAM_REPLACED",
                    )
                if stream.closing:
                    raise Unavailable("the server is shutting down", reason="SHUTTING_DOWN")
                stream.arm()
                offer = await self.dispatcher.submit(agent_id)  # with the streams asking now
                if isinstance(offer, NoOffer):
                    self._hub.found_nothing(stream, line_empty=offer is NoOffer.LINE_EMPTY)
                    poll = self._poll_s
                    if offer is NoOffer.CONTENDED:  # its holder may not wake anyone
                        poll = min(poll, CONTENDED_RETRY_S)
                    await self._hub.wait(stream, poll)
                    continue
                stream.baton = 0
                log.info(
                    "task offered",
                    extra={
                        "task_id": offer.task.id,
                        "agent_id": agent_id,
                        "deadline": offer.deadline.isoformat(),
                    },
                )
                self._timeouts.offer_made(offer.task.id, offer.offer_event_id, offer.deadline)
                if self._on_offer is not None:
                    self._on_offer(offer)
                yield pb.StreamOffersResponse(offer=convert.offer_pb(offer))
                if offer.agent_full:  # until a task of this agent is released
                    await self._hub.wait(stream, self._poll_s, line_wakes=False)
        finally:
            self._hub.close(stream)
            log.info("offer stream closed", extra={"agent_id": agent_id})

    def _offer_unclaimed(self, offer: Offer) -> None:
        """An offer whose stream ended while its dispatch batch ran: it stays the agent's
        (pushed again when the agent reconnects) and expires like any other."""
        log.info(
            "task offered to a stream that ended meanwhile",
            extra={"task_id": offer.task.id, "agent_id": offer.task.agent_id},
        )
        self._timeouts.offer_made(offer.task.id, offer.offer_event_id, offer.deadline)
        if self._on_offer is not None:
            self._on_offer(offer)

    # ------------------------------------------------------------------ task actions

    async def AcceptTask(
        self, request: pb.AcceptTaskRequest, context: Context
    ) -> pb.AcceptTaskResponse:
        with Validator() as v:
            validation.positive_id(v, request.task_id, "task_id")
            validation.positive_id(v, request.agent_id, "agent_id")
        self._auth.require_self(context, request.agent_id)
        task = await self.actions.submit(  # group commit with concurrent task actions
            TaskAction(
                ActionKind.ACCEPT,
                request.task_id,
                request.agent_id,
                "",
                self._clock(),
                origin=request_origin(),
            )
        )
        return pb.AcceptTaskResponse(task=convert.task_pb(task))

    async def RejectTask(
        self, request: pb.RejectTaskRequest, context: Context
    ) -> pb.RejectTaskResponse:
        with Validator() as v:
            validation.positive_id(v, request.task_id, "task_id")
            validation.positive_id(v, request.agent_id, "agent_id")
            validation.reason_text(v, request.reason, "reason", required=False)
        self._auth.require_self(context, request.agent_id)
        task = await self._run(
            self._store.reject, request.task_id, request.agent_id, request.reason, self._clock()
        )
        self._hub.task_waiting(task.business_line)  # back in the queue
        self._hub.wake_agent(request.agent_id)  # capacity freed
        return pb.RejectTaskResponse(task=convert.task_pb(task))

    async def CompleteTask(
        self, request: pb.CompleteTaskRequest, context: Context
    ) -> pb.CompleteTaskResponse:
        now = self._clock()
        with Validator() as v:
            validation.positive_id(v, request.task_id, "task_id")
            validation.positive_id(v, request.agent_id, "agent_id")
            validation.reason_text(v, request.note, "note", required=False)
            revisit_at = (
                validation.revisit_time(v, request.revisit_at, "revisit_at", now)
                if request.HasField("revisit_at")
                else None
            )
        self._auth.require_self(context, request.agent_id)
        revisit: Task | None = None
        if revisit_at is None:  # group commit with concurrent task actions
            action = TaskAction(
                ActionKind.COMPLETE,
                request.task_id,
                request.agent_id,
                request.note,
                now,
                origin=request_origin(),
            )
            task = await self.actions.submit(action)
        else:
            task, revisit = await self._run(
                self._store.complete,
                request.task_id,
                request.agent_id,
                request.note,
                revisit_at,
                now,
            )
        self._hub.wake_agent(request.agent_id)  # capacity freed
        response = pb.CompleteTaskResponse(task=convert.task_pb(task))
        if revisit is not None:
            self._timeouts.revisit_created(revisit.id, revisit.due_at)
            response.revisit.CopyFrom(convert.task_pb(revisit))
        return response

    async def FailTask(self, request: pb.FailTaskRequest, context: Context) -> pb.FailTaskResponse:
        with Validator() as v:
            validation.positive_id(v, request.task_id, "task_id")
            validation.positive_id(v, request.agent_id, "agent_id")
            validation.reason_text(v, request.reason, "reason", required=True)
        self._auth.require_self(context, request.agent_id)
        task = await self.actions.submit(
            TaskAction(
                ActionKind.FAIL,
                request.task_id,
                request.agent_id,
                request.reason,
                self._clock(),
                origin=request_origin(),
            )
        )
        self._hub.wake_agent(request.agent_id)  # capacity freed
        return pb.FailTaskResponse(task=convert.task_pb(task))

    # ------------------------------------------------------------------ scheduler targets

    async def ExpireOffer(
        self, request: pb.ExpireOfferRequest, context: Context
    ) -> pb.ExpireOfferResponse:
        """Called by the scheduler at an offer's deadline; idempotent (see the proto)."""
        self._auth.require_service(context, "ExpireOffer")
        with Validator() as v:
            validation.positive_id(v, request.task_id, "task_id")
            validation.positive_id(v, request.offer_event_id, "offer_event_id")
        outcome = await self._run(
            self._store.expire_offer, request.task_id, request.offer_event_id, self._clock()
        )
        if outcome.early:  # the job ran before the deadline (clock skew): retry later
            raise Unavailable(
                f"the offer of task {request.task_id} has not expired yet",
                reason="OFFER_NOT_EXPIRED",
            )
        task = outcome.recycled
        if task is None:
            return pb.ExpireOfferResponse(recycled=False)
        log.info("offer expired", extra={"task_id": task.id})
        if self._on_recycled is not None:
            self._on_recycled([task])
        return pb.ExpireOfferResponse(recycled=True)

    async def WakeRevisit(
        self, request: pb.WakeRevisitRequest, context: Context
    ) -> pb.WakeRevisitResponse:
        """Called by the scheduler when a revisit is due: wake its line's offer streams."""
        self._auth.require_service(context, "WakeRevisit")
        with Validator() as v:
            validation.positive_id(v, request.task_id, "task_id")
        task = await self._run(self._store.find_task, request.task_id)
        if task is None or task.status not in WAITING_STATUSES:
            return pb.WakeRevisitResponse(woken=False)
        if task.due_at > self._clock():  # the job ran early (clock skew): retry later
            raise Unavailable(f"task {task.id} is not due yet", reason="REVISIT_NOT_DUE")
        if task.preferred_agent_id is not None:
            self._hub.wake_agent(task.preferred_agent_id)  # reserved first for this agent
            self._wake_when_reservation_ends(task)
        self._hub.task_waiting(task.business_line)
        return pb.WakeRevisitResponse(woken=True)

    def _wake_when_reservation_ends(self, task: Task) -> None:
        """A revisit stays reserved for its agent ``revisit_same_agent_window_s`` after it
        fell due; the streams that looked meanwhile wait for a wake-up, so the line is
        woken again when the reservation ends (an in-process timer: after a restart, the
        streams' ``dispatch_poll_s`` poll finds the task)."""
        window = self._routing().line(task.business_line).revisit_same_agent_window_s
        ends = task.due_at + timedelta(seconds=window)
        delay = (ends - self._clock()).total_seconds()
        if delay > 0:
            asyncio.get_running_loop().call_later(
                delay + RESERVATION_SLACK_S, self._hub.task_waiting, task.business_line
            )

    async def CancelTask(
        self, request: pb.CancelTaskRequest, context: Context
    ) -> pb.CancelTaskResponse:
        self._auth.require_service(context, "CancelTask")
        with Validator() as v:
            validation.positive_id(v, request.task_id, "task_id")
            validation.reason_text(v, request.reason, "reason", required=True)
        task = await self._run(self._store.cancel, request.task_id, request.reason, self._clock())
        if task.agent_id is not None:
            self._hub.wake_agent(task.agent_id)  # a cancelled offer frees capacity
        return pb.CancelTaskResponse(task=convert.task_pb(task))

    # ------------------------------------------------------------------ calls & sign-in

    async def RecordCall(
        self, request: pb.RecordCallRequest, context: Context
    ) -> pb.RecordCallResponse:
        call = validation.new_call(request, self._clock())
        self._auth.require_self(context, request.agent_id)
        result = await self._run(
            self._store.record_call, call, self._clock(), self._host, request_id_var.get() or ""
        )
        if not result.replayed:
            log.info(
                "call recorded",
                extra={
                    "task_id": call.task_id,
                    "agent_id": call.agent_id,
                    "outcome": call.outcome.name,
                },
            )
        return pb.RecordCallResponse(call=convert.call_pb(result.call), replayed=result.replayed)

    async def SignIn(self, request: pb.SignInRequest, context: Context) -> pb.SignInResponse:
        with Validator() as v:
            validation.positive_id(v, request.agent_id, "agent_id")
            v.require(
                0 <= request.ttl_seconds <= self._token_ttl_s,
                "ttl_seconds",
                f"must be 0..{self._token_ttl_s}",
            )
        self._auth.require_self(context, request.agent_id)  # a token may renew itself only
        agent = await self._run(self._store.get_agent, request.agent_id)  # NOT_FOUND
        expires_at = self._clock().replace(microsecond=0) + timedelta(
            seconds=request.ttl_seconds or self._token_ttl_s
        )
        token = self._auth.signer.issue(agent.id, expires_at)
        log.info("agent signed in", extra={"agent_id": agent.id})
        return pb.SignInResponse(
            token=token, expires_at=convert.timestamp(expires_at), agent=convert.agent_pb(agent)
        )


def _check_line_open(routing: RoutingConfig, line: BusinessLine) -> None:
    if not routing.is_open(line):
        name = routing.name(line)
        message = (
            f"business line {name} is closed: it has no enabled routing config "
            f"(<config_prefix>/assignment/{name}, code {int(line)})"
        )
        raise FailedPrecondition(
            message,
            violations=[PreconditionViolation("LINE_CLOSED", f"business_line/{name}", message)],
            reason="LINE_CLOSED",
        )
