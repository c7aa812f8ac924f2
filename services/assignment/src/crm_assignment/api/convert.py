"""Domain records -> protobuf messages (requests are converted in ``validation``)."""

from __future__ import annotations

from crm.assignment.v1 import assignment_pb2 as pb
from crm.common.v1 import common_pb2
from crm_common.timestamps import from_timestamp, timestamp

from crm_assignment.domain.model import (
    Agent,
    CallRecord,
    Clue,
    Customer,
    Offer,
    QueueStats,
    Task,
    TaskEvent,
)

__all__ = [
    "agent_pb",
    "call_pb",
    "clue_pb",
    "customer_pb",
    "from_timestamp",
    "offer_pb",
    "queue_stats_pb",
    "task_event_pb",
    "task_pb",
    "timestamp",
]


def task_pb(t: Task) -> pb.Task:
    msg = pb.Task(
        id=t.id,
        business_line=common_pb2.BusinessLine.ValueType(int(t.business_line)),
        category=pb.Category.ValueType(int(t.category)),
        status=pb.Status.ValueType(int(t.status)),
        customer_id=t.customer_id,
        city=t.city,
        priority=t.priority,
        agent_id=t.agent_id or 0,
        created_at=timestamp(t.created_at),
        due_at=timestamp(t.due_at),
        recycle_count=t.recycle_count,
        clue_count=t.clue_count,
        brands=list(t.brands),
        parent_task_id=t.parent_task_id or 0,
        updated_at=timestamp(t.updated_at),
    )
    if t.offer_deadline is not None:
        msg.offer_deadline.CopyFrom(timestamp(t.offer_deadline))
    return msg


def customer_pb(c: Customer) -> pb.Customer:
    return pb.Customer(id=c.id, phone=common_pb2.MaskedPhone(masked=c.masked_phone), star=c.star)


def clue_pb(c: Clue) -> pb.Clue:
    return pb.Clue(
        id=c.id,
        source=c.source,
        city=c.city,
        intent_car_ids=list(c.intent_car_ids),
        budget_min_yuan=c.budget_min_yuan,
        budget_max_yuan=c.budget_max_yuan,
        created_at=timestamp(c.created_at),
    )


def task_event_pb(e: TaskEvent) -> pb.TaskEvent:
    return pb.TaskEvent(
        id=e.id,
        kind=str(e.kind),
        from_status=pb.Status.ValueType(int(e.from_status) if e.from_status else 0),
        to_status=pb.Status.ValueType(int(e.to_status)),
        agent_id=e.agent_id or 0,
        reason=e.reason,
        at=timestamp(e.at),
    )


def agent_pb(a: Agent) -> pb.Agent:
    return pb.Agent(
        id=a.id,
        name=a.name,
        business_line=common_pb2.BusinessLine.ValueType(int(a.business_line)),
        cities=list(a.cities),
        categories=[pb.Category.ValueType(int(c)) for c in a.categories],
        brands=list(a.brands),
        capacity=a.capacity,
        presence=pb.Presence.ValueType(int(a.presence)),
        active_tasks=a.active_tasks,
    )


def offer_pb(o: Offer) -> pb.Offer:
    return pb.Offer(
        task=task_pb(o.task), customer=customer_pb(o.customer), deadline=timestamp(o.deadline)
    )


def queue_stats_pb(s: QueueStats) -> pb.QueueStatsResponse:
    return pb.QueueStatsResponse(
        queues=[
            pb.QueueDepth(
                business_line=common_pb2.BusinessLine.ValueType(int(q.business_line)),
                category=pb.Category.ValueType(int(q.category)),
                waiting=q.waiting,
                offered=q.offered,
                in_progress=q.in_progress,
                oldest_wait_seconds=q.oldest_wait_seconds,
                scheduled=q.scheduled,
            )
            for q in s.queues
        ],
        agents=[
            pb.PresenceCount(
                business_line=common_pb2.BusinessLine.ValueType(int(p.business_line)),
                presence=pb.Presence.ValueType(int(p.presence)),
                agents=p.agents,
            )
            for p in s.agents
        ],
    )


def call_pb(c: CallRecord) -> pb.CallRecord:
    return pb.CallRecord(
        id=c.id,
        call_id=c.call_id,
        task_id=c.task_id,
        agent_id=c.agent_id,
        call_type=pb.CallType.ValueType(int(c.call_type)),
        provider=pb.TelephonyProvider.ValueType(int(c.provider)),
        started_at=timestamp(c.started_at),
        duration_seconds=c.duration_s,
        outcome=pb.CallOutcome.ValueType(int(c.outcome)),
        note=c.note,
        recorded_at=timestamp(c.recorded_at),
    )
