"""Dispatch scoring: which waiting task suits an agent best (pure).

The store reads the candidates (tasks of the agent's line and skills, due now, already
ordered by priority, star and due time and cut at ``candidate_limit``); this module scores
them with the line's routing weights and ranks them; the store then reserves the best one
it can lock.

score = priority * w.priority
      + star * w.star
      + minutes waited since due * w.wait_per_minute
      + brands shared with the agent * w.brand_match
      + (the agent is the task's preferred agent) * w.same_agent
      + (the agent lost this task last) * w.recently_lost
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from crm_assignment.domain.model import Task

__all__ = ["Candidate", "Weights", "rank", "revisit_reserved_until", "score"]


@dataclass(frozen=True, slots=True)
class Candidate:
    """What scoring needs of a waiting task (the store reads only these columns)."""

    id: int
    priority: int
    star: bool
    due_at: datetime
    brands: tuple[str, ...] = ()
    preferred_agent_id: int | None = None
    last_lost_agent_id: int | None = None

    @classmethod
    def of(cls, t: Task) -> Candidate:
        return cls(
            t.id, t.priority, t.star, t.due_at, t.brands, t.preferred_agent_id,
            t.last_lost_agent_id,
        )  # fmt: skip


class Weights(Protocol):
    """Routing weights (``crm_assignment.config.RoutingWeights`` satisfies it)."""

    @property
    def priority(self) -> float: ...
    @property
    def star(self) -> float: ...
    @property
    def wait_per_minute(self) -> float: ...
    @property
    def brand_match(self) -> float: ...
    @property
    def same_agent(self) -> float: ...
    @property
    def recently_lost(self) -> float: ...


def brand_overlap(task_brands: Iterable[str], agent_brands: Iterable[str]) -> int:
    """How many of the task's brands the agent knows (case-insensitive)."""
    known = {b.casefold() for b in agent_brands}
    return len({b.casefold() for b in task_brands} & known)


def score(
    task: Candidate, agent_id: int, agent_brands: Sequence[str], now: datetime, w: Weights
) -> float:
    """The task's score for this agent (higher is better)."""
    waited_min = max(0.0, (now - task.due_at).total_seconds() / 60.0)
    return (
        w.priority * task.priority
        + w.star * (1 if task.star else 0)
        + w.wait_per_minute * waited_min
        + w.brand_match * brand_overlap(task.brands, agent_brands)
        + w.same_agent * (1 if task.preferred_agent_id == agent_id else 0)
        + w.recently_lost * (1 if task.last_lost_agent_id == agent_id else 0)
    )


def rank(
    candidates: Iterable[Candidate],
    agent_id: int,
    agent_brands: Sequence[str],
    now: datetime,
    w: Weights,
) -> list[Candidate]:
    """Candidates best first; ties go to the task due first, then the lower id."""
    scored = [(score(t, agent_id, agent_brands, now, w), t) for t in candidates]
    scored.sort(key=lambda st: (-st[0], st[1].due_at, st[1].id))
    return [t for _, t in scored]


def revisit_reserved_until(due_at: datetime, window_s: int) -> datetime:
    """A revisit with a preferred agent is kept for that agent until this instant."""
    return due_at + timedelta(seconds=window_s)
