"""Dispatch scoring: which waiting task suits an agent best (pure).

The store reads the candidates (waiting tasks of a line, due now, already ordered by
priority, star and due time and cut at ``candidate_limit`` plus what the batch needs); this
module says which of them an agent may take (:func:`eligible`: skills, revisits reserved
for another agent), scores them with the line's routing weights, ranks them and matches a
batch of agents asking at once to distinct tasks (:func:`match`); the store then reserves
the matched tasks it can lock.

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

from crm_assignment.domain.model import Category, Task

__all__ = [
    "Candidate",
    "Seeker",
    "Weights",
    "eligible",
    "match",
    "rank",
    "revisit_reserved_until",
    "score",
]


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
    category: Category | None = None
    """None: not known (every agent's categories match)."""
    city: str | None = None
    """None: not known (every agent's cities match)."""

    @classmethod
    def of(cls, t: Task) -> Candidate:
        return cls(
            t.id, t.priority, t.star, t.due_at, t.brands, t.preferred_agent_id,
            t.last_lost_agent_id, t.category, t.city,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Seeker:
    """An available agent asking for a task: what eligibility and scoring need of it."""

    agent_id: int
    brands: tuple[str, ...] = ()
    cities: tuple[str, ...] = ()
    """The cities it serves; empty: every city."""
    categories: tuple[Category, ...] = ()
    """The task categories it handles; empty: every category."""


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


def eligible(task: Candidate, seeker: Seeker, now: datetime, revisit_window_s: int) -> bool:
    """May the agent take the task: due, one of its categories and cities, and not a
    revisit still reserved for another agent (``revisit_window_s`` after it fell due)."""
    if task.due_at > now:
        return False
    if seeker.categories and task.category is not None and task.category not in seeker.categories:
        return False
    if seeker.cities and task.city is not None and task.city not in seeker.cities:
        return False
    preferred = task.preferred_agent_id
    return (
        preferred is None
        or preferred == seeker.agent_id
        or task.due_at <= now - timedelta(seconds=revisit_window_s)
    )


def match(
    seekers: Sequence[Seeker],
    candidates: Sequence[Candidate],
    now: datetime,
    w: Weights,
    revisit_window_s: int,
    limit: int,
    taken: Iterable[int] = (),
) -> list[Candidate | None]:
    """Agents asking at once, in the order given (longest waiting first), each take the
    best-ranked of the first ``limit`` candidates (in the order given: the store's
    priority, star, due time order) it may take that no agent before it took (nor any id
    in ``taken``): the same as the agents asking one after the other. Returns one task
    per seeker, None when nothing is left for it."""
    gone = set(taken)
    # The agent-independent part of every score (``score``'s first three terms, added in
    # the same order, so the sums are the same floats), once for the whole batch.
    base = {
        c.id: w.priority * c.priority
        + w.star * (1 if c.star else 0)
        + w.wait_per_minute * max(0.0, (now - c.due_at).total_seconds() / 60.0)
        for c in candidates
    }
    folded = {c.id: {b.casefold() for b in c.brands} for c in candidates if c.brands}
    out: list[Candidate | None] = []
    for seeker in seekers:
        known = {b.casefold() for b in seeker.brands}
        agent_id = seeker.agent_id
        best: Candidate | None = None
        best_key: tuple[float, datetime, int] | None = None
        seen = 0
        for c in candidates:
            if c.id in gone or not eligible(c, seeker, now, revisit_window_s):
                continue
            points = base[c.id]
            if known and c.brands:
                points += w.brand_match * len(folded[c.id] & known)
            if c.preferred_agent_id == agent_id:
                points += w.same_agent
            if c.last_lost_agent_id == agent_id:
                points += w.recently_lost
            key = (-points, c.due_at, c.id)  # ``rank``'s order: ties to the due first
            if best_key is None or key < best_key:
                best, best_key = c, key
            seen += 1
            if seen >= limit:
                break
        out.append(best)
        if best is not None:
            gone.add(best.id)
    return out


def revisit_reserved_until(due_at: datetime, window_s: int) -> datetime:
    """A revisit with a preferred agent is kept for that agent until this instant."""
    return due_at + timedelta(seconds=window_s)
