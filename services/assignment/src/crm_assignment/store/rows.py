"""Rows to domain records, shared by the store's modules (no I/O).

``task_of`` reads ORM or Core rows (typed by SQLAlchemy). The hot paths read rows as JSON
arrays through ``crm_common.db.RawSQL.json_rows``: ``TASK_JSON`` selects a task so and
``task_from_json`` converts it (enum names, UTC datetime text); ``db_json`` writes JSON
the way the ``JSON`` column type does.
"""

from __future__ import annotations

import enum
import json
from typing import Any

from crm_common.db import from_json_time
from sqlalchemy import Row

from crm_assignment.domain.model import Category, Status, Task
from crm_assignment.store.schema import TaskRow, line_from_db

__all__ = ["TASK_JSON", "NoOffer", "db_json", "task_from_json", "task_of"]

TASK_JSON = (
    "JSON_ARRAY(id, business_line, category, status, customer_id, city, priority, star, "
    "agent_id, preferred_agent_id, last_lost_agent_id, parent_task_id, "
    "JSON_QUERY(brands, '$'), created_at, due_at, offer_deadline, recycle_count, clue_count, "
    "updated_at)"
)
"""A task row as one JSON array (``RawSQL.json_rows``), read by ``task_from_json``."""


def db_json(value: Any) -> str:
    """JSON text as SQLAlchemy's ``JSON`` type writes it."""
    return json.dumps(value)


def task_from_json(r: list[Any]) -> Task:
    """A ``TASK_JSON`` row as a domain Task."""
    deadline = r[15]
    return Task(
        id=r[0],
        business_line=line_from_db(r[1]),
        category=Category[r[2]],
        status=Status[r[3]],
        customer_id=r[4],
        city=r[5],
        priority=r[6],
        star=bool(r[7]),
        agent_id=r[8],
        preferred_agent_id=r[9],
        last_lost_agent_id=r[10],
        parent_task_id=r[11],
        brands=tuple(r[12] or ()),
        created_at=from_json_time(r[13]),
        due_at=from_json_time(r[14]),
        offer_deadline=None if deadline is None else from_json_time(deadline),
        recycle_count=r[16],
        clue_count=r[17],
        updated_at=from_json_time(r[18]),
    )


class NoOffer(enum.Enum):
    """Why a dispatch offered nothing (the offer streams pass a wake-up on or not)."""

    UNAVAILABLE = "unavailable"
    """The agent is not IDLE, is full, or its line is closed: another agent may take it."""
    NOTHING_MATCHING = "nothing_matching"
    """Tasks wait in the line, none this agent may take (skills, reserved revisits)."""
    CONTENDED = "contended"
    """Every candidate was taken by concurrent dispatchers meanwhile."""
    LINE_EMPTY = "line_empty"
    """No task waits in the agent's line at all: nobody else will find one either."""


def task_of(r: TaskRow | Row[Any]) -> Task:
    return Task(
        id=r.id,
        business_line=r.business_line,
        category=r.category,
        status=r.status,
        customer_id=r.customer_id,
        city=r.city,
        priority=r.priority,
        star=bool(r.star),
        agent_id=r.agent_id,
        preferred_agent_id=r.preferred_agent_id,
        last_lost_agent_id=r.last_lost_agent_id,
        parent_task_id=r.parent_task_id,
        brands=tuple(r.brands or ()),
        created_at=r.created_at,
        due_at=r.due_at,
        offer_deadline=r.offer_deadline,
        recycle_count=r.recycle_count,
        clue_count=r.clue_count,
        updated_at=r.updated_at,
    )
