"""Pure domain rules: state machine, scoring, phones, paging, config parsing."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pydantic
import pytest
from crm_assignment.config import LineConfig, RoutingConfig, RoutingWeights, parse
from crm_assignment.domain import dispatch, rules
from crm_assignment.domain.model import BusinessLine, Category, Status, Task, TaskFilter
from crm_assignment.domain.paging import BadPageToken, Cursor, filter_hash
from crm_assignment.domain.phone import PhoneProtector, mask_phone, normalize_phone
from crm_common.errors import FailedPrecondition
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

NOW = datetime(2025, 11, 23, 9, 0, tzinfo=UTC)
C = dispatch.Candidate.of

LEGAL = {
    (Status.UNASSIGNED, Status.ASSIGNED),
    (Status.UNASSIGNED, Status.CANCELLED),
    (Status.ASSIGNED, Status.IN_PROGRESS),
    (Status.ASSIGNED, Status.RECYCLED),
    (Status.ASSIGNED, Status.CANCELLED),
    (Status.IN_PROGRESS, Status.COMPLETED),
    (Status.IN_PROGRESS, Status.FAILED),
    (Status.RECYCLED, Status.ASSIGNED),
    (Status.RECYCLED, Status.CANCELLED),
}


@pytest.mark.parametrize("current", list(Status))
@pytest.mark.parametrize("wanted", list(Status))
def test_state_machine_table(current: Status, wanted: Status) -> None:
    if (current, wanted) in LEGAL:
        rules.check_transition(42, current, wanted)
        return
    with pytest.raises(FailedPrecondition) as info:
        rules.check_transition(42, current, wanted)
    message = info.value.message
    assert "task 42" in message
    assert current.name in message
    assert wanted.name in message


def _task(**kw: object) -> Task:
    base = Task(
        id=1,
        business_line=BusinessLine.SALE,
        category=Category.NEW_CLUE,
        status=Status.UNASSIGNED,
        customer_id=1,
        city="beijing",
        priority=5,
        star=False,
        agent_id=None,
        preferred_agent_id=None,
        last_lost_agent_id=None,
        parent_task_id=None,
        brands=(),
        created_at=NOW,
        due_at=NOW,
        offer_deadline=None,
        recycle_count=0,
        clue_count=1,
        updated_at=NOW,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def test_offer_holder_rules() -> None:
    offered = _task(status=Status.ASSIGNED, agent_id=7, offer_deadline=NOW + timedelta(seconds=30))
    rules.check_offer_holder(offered, 7, NOW)
    with pytest.raises(FailedPrecondition, match="not offered to agent 8"):
        rules.check_offer_holder(offered, 8, NOW)
    with pytest.raises(FailedPrecondition, match="offer expired"):
        rules.check_offer_holder(offered, 7, NOW + timedelta(seconds=30))
    working = _task(status=Status.IN_PROGRESS, agent_id=7)
    rules.check_worker(working, 7, Status.COMPLETED)
    with pytest.raises(FailedPrecondition, match="another agent"):
        rules.check_worker(working, 9, Status.FAILED)


def test_score_components() -> None:
    w = RoutingWeights()
    plain = _task()
    assert dispatch.score(C(plain), 7, [], NOW, w) == 500
    assert dispatch.score(C(_task(star=True)), 7, [], NOW, w) == 550
    waited = _task(due_at=NOW - timedelta(minutes=10))
    assert dispatch.score(C(waited), 7, [], NOW, w) == pytest.approx(510)
    assert dispatch.score(C(_task(due_at=NOW + timedelta(minutes=5))), 7, [], NOW, w) == 500
    branded = _task(brands=("BMW", "Audi", "Tesla"))
    assert dispatch.score(C(branded), 7, ["bmw", "audi"], NOW, w) == 520
    assert dispatch.score(C(_task(preferred_agent_id=7)), 7, [], NOW, w) == 530
    assert dispatch.score(C(_task(preferred_agent_id=8)), 7, [], NOW, w) == 500
    assert dispatch.score(C(_task(last_lost_agent_id=7)), 7, [], NOW, w) == 300


def test_rank_orders_by_score_then_due_then_id() -> None:
    w = RoutingWeights()
    a = _task(id=1, priority=5)
    b = _task(id=2, priority=9)
    c = _task(id=3, priority=5, due_at=NOW - timedelta(seconds=1))
    lost = _task(id=4, priority=9, last_lost_agent_id=7)
    ranked = dispatch.rank(map(C, [a, b, c, lost]), 7, [], NOW, w)
    assert [t.id for t in ranked] == [2, 4, 3, 1]  # 900, 700, 500.02, 500
    # a different agent does not carry the penalty
    assert dispatch.rank(map(C, [b, lost]), 8, [], NOW, w)[0].id == 2
    heavy_brand = RoutingWeights(brand_match=1000)
    bmw = _task(id=5, priority=1, brands=("BMW",))
    assert dispatch.rank(map(C, [b, bmw]), 7, ["BMW"], NOW, heavy_brand)[0].id == 5


def test_eligible_skills_and_reserved_revisits() -> None:
    plain = C(_task(city="beijing", category=Category.NEW_CLUE))
    anyone = dispatch.Seeker(7)
    assert dispatch.eligible(plain, anyone, NOW, 300)
    assert dispatch.eligible(plain, dispatch.Seeker(7, cities=("beijing", "x")), NOW, 300)
    assert not dispatch.eligible(plain, dispatch.Seeker(7, cities=("shanghai",)), NOW, 300)
    assert not dispatch.eligible(
        plain, dispatch.Seeker(7, categories=(Category.REVISIT,)), NOW, 300
    )
    assert not dispatch.eligible(C(_task(due_at=NOW + timedelta(seconds=1))), anyone, NOW, 300)
    revisit = C(_task(preferred_agent_id=8, due_at=NOW - timedelta(seconds=100)))
    assert dispatch.eligible(revisit, dispatch.Seeker(8), NOW, 300)  # its own agent
    assert not dispatch.eligible(revisit, anyone, NOW, 300)  # reserved 300 s after due
    assert dispatch.eligible(revisit, anyone, NOW, 100)  # the window has passed


def _sequential(
    seekers: list[dispatch.Seeker],
    candidates: list[dispatch.Candidate],
    w: RoutingWeights,
    window: int,
    limit: int,
) -> list[int | None]:
    """The agents asking one after the other, each ranking its first ``limit`` tasks."""
    gone: set[int] = set()
    out: list[int | None] = []
    for s in seekers:
        mine = [c for c in candidates if c.id not in gone and dispatch.eligible(c, s, NOW, window)]
        ranked = dispatch.rank(mine[:limit], s.agent_id, s.brands, NOW, w)
        out.append(ranked[0].id if ranked else None)
        if ranked:
            gone.add(ranked[0].id)
    return out


def test_match_gives_each_agent_in_turn_its_best_task_left() -> None:
    w = RoutingWeights()
    top = C(_task(id=1, priority=9))
    lost_by_7 = C(_task(id=2, priority=9, last_lost_agent_id=7))
    shanghai = C(_task(id=3, priority=5, city="shanghai"))
    low = C(_task(id=4, priority=1))
    seekers = [
        dispatch.Seeker(7),  # asked first: the best for it (2 carries its penalty)
        dispatch.Seeker(8, cities=("beijing",)),  # 1 is gone: 2 is its best
        dispatch.Seeker(9, cities=("shanghai",)),
        dispatch.Seeker(10, cities=("beijing",)),
        dispatch.Seeker(11, cities=("beijing",)),  # nothing left for it
    ]
    got = dispatch.match(seekers, [top, lost_by_7, shanghai, low], NOW, w, 300, limit=50)
    assert [c.id if c else None for c in got] == [1, 2, 3, 4, None]
    # ``taken``: already gone
    got = dispatch.match(seekers[:1], [top, lost_by_7, low], NOW, w, 300, 50, taken=[1, 2])
    assert [c.id if c else None for c in got] == [4]
    # ``limit``: each agent ranks only its first ``limit`` tasks (in the store's order)
    heavy = RoutingWeights(brand_match=1000)
    bmw = C(_task(id=5, priority=1, brands=("BMW",)))
    fan = [dispatch.Seeker(7, brands=("bmw",))]
    assert dispatch.match(fan, [top, bmw], NOW, heavy, 300, limit=2)[0] == bmw
    assert dispatch.match(fan, [top, bmw], NOW, heavy, 300, limit=1)[0] == top


_BRANDS = st.lists(st.sampled_from(["BMW", "bmw", "Audi", "Tesla"]), max_size=2)


@st.composite
def _candidates(draw: st.DrawFn) -> list[dispatch.Candidate]:
    n = draw(st.integers(0, 12))
    out = []
    for i in range(n):
        out.append(
            dispatch.Candidate(
                id=i + 1,
                priority=draw(st.integers(0, 9)),
                star=draw(st.booleans()),
                due_at=NOW - timedelta(seconds=draw(st.integers(-60, 900))),
                brands=tuple(draw(_BRANDS)),
                preferred_agent_id=draw(st.none() | st.integers(1, 4)),
                last_lost_agent_id=draw(st.none() | st.integers(1, 4)),
                category=draw(st.sampled_from(list(Category))),
                city=draw(st.sampled_from(["beijing", "shanghai"])),
            )
        )
    out.sort(key=lambda c: (-c.priority, -int(c.star), c.due_at, c.id))  # the store's order
    return out


_SEEKERS = st.lists(
    st.builds(
        dispatch.Seeker,
        agent_id=st.integers(1, 4),
        brands=st.lists(st.sampled_from(["bmw", "AUDI"]), max_size=2).map(tuple),
        cities=st.sampled_from([(), ("beijing",), ("shanghai",)]),
        categories=st.sampled_from([(), (Category.NEW_CLUE,), (Category.REVISIT,)]),
    ),
    max_size=5,
)


@given(
    candidates=_candidates(),
    seekers=_SEEKERS,
    window=st.sampled_from([0, 300, 600]),
    limit=st.integers(1, 6),
    brand_match=st.sampled_from([0.0, 20.0, 1000.0]),
)
@settings(max_examples=300, deadline=None)
def test_match_equals_agents_asking_one_after_the_other(
    candidates: list[dispatch.Candidate],
    seekers: list[dispatch.Seeker],
    window: int,
    limit: int,
    brand_match: float,
) -> None:
    w = RoutingWeights(brand_match=brand_match)
    got = dispatch.match(seekers, candidates, NOW, w, window, limit)
    assert [c.id if c else None for c in got] == _sequential(seekers, candidates, w, window, limit)


@pytest.mark.parametrize(
    ("raw", "digits"),
    [
        ("13800138000", "13800138000"),
        ("138 0013 8000", "13800138000"),
        ("138-0013-8000", "13800138000"),
        ("+86 138 0013 8000", "8613800138000"),
        ("1234567", "1234567"),
        ("123456789012345", "123456789012345"),
        ("123456", None),
        ("1234567890123456", None),
        ("", None),
        ("+", None),
        ("++8613800138000", None),
        ("138001380a0", None),
        ("13800138000\n", None),
        ("١٣٨٠٠١٣٨٠٠٠", None),  # Arabic-Indic digits are not ASCII digits
        ("138.0013.8000", None),
    ],
)
def test_normalize_phone(raw: str, digits: str | None) -> None:
    assert normalize_phone(raw) == digits


@pytest.mark.parametrize(
    ("digits", "masked"),
    [
        ("13812341234", "138****1234"),
        ("8613812341234", "861****1234"),
        ("123456789012345", "123****2345"),
        ("1234567890", "123****890"),
        ("123456789", "12****789"),
        ("12345678", "12****78"),
        ("1234567", "1****67"),
    ],
)
def test_mask_phone(digits: str, masked: str) -> None:
    assert mask_phone(digits) == masked
    hidden = len(digits) - (len(masked) - 4)
    assert hidden >= 4


def test_phone_protector() -> None:
    p = PhoneProtector(b"k" * 32, b"e" * 32)
    a, b = p.protect("13812341234"), p.protect("13812341234")
    assert a.hash_hex == b.hash_hex  # the lookup key is deterministic
    assert a.encrypted != b.encrypted  # a fresh nonce every time
    assert p.decrypt(a.encrypted) == "13812341234"
    assert b"13812341234" not in a.encrypted
    assert "13812341234" not in a.hash_hex
    other = PhoneProtector(b"x" * 32, b"e" * 32)
    assert other.hash_hex("13812341234") != a.hash_hex
    with pytest.raises(ValueError, match="16 bytes"):
        PhoneProtector(b"short", b"e" * 32)


def test_page_token_round_trip_and_tamper() -> None:
    f = TaskFilter(business_line=BusinessLine.SALE, statuses=(Status.UNASSIGNED,))
    fh = filter_hash(f)
    cursor = Cursor(created_at=NOW + timedelta(microseconds=123), id=99)
    token = cursor.encode(fh)
    assert Cursor.decode(token, fh) == cursor
    # bound to its filters
    other = filter_hash(replace(f, city="shanghai"))
    with pytest.raises(BadPageToken, match="other filters"):
        Cursor.decode(token, other)
    # tampered or foreign tokens
    body = json.loads(base64.urlsafe_b64decode(token))
    bad_bodies = [
        {**body, "i": "99"},
        {**body, "i": -1},
        {**body, "i": True},
        {**body, "c": "yesterday"},
        {**body, "c": "2025-11-23T09:00:00"},  # naive
        {**body, "extra": 1},
        [body],
    ]
    for bad in bad_bodies:
        raw = base64.urlsafe_b64encode(json.dumps(bad).encode()).decode()
        with pytest.raises(BadPageToken):
            Cursor.decode(raw, fh)
    for junk in ["!!!", token[:-3], "é", "a" * 600, base64.urlsafe_b64encode(b"\xff\xfe").decode()]:
        with pytest.raises(BadPageToken):
            Cursor.decode(junk, fh)


def test_filter_hash_normalizes_status_order() -> None:
    a = TaskFilter(statuses=(Status.ASSIGNED, Status.UNASSIGNED))
    b = TaskFilter(statuses=(Status.UNASSIGNED, Status.ASSIGNED))
    assert filter_hash(a) == filter_hash(b)
    assert filter_hash(a) != filter_hash(TaskFilter())


def test_clue_request_hash_and_priority() -> None:
    kw: dict[str, object] = {
        "phone_hash": "h",
        "business_line": 1,
        "source": "app",
        "city": "beijing",
        "intent_car_ids": (1, 2),
        "brands": ("BMW",),
        "budget_min_yuan": 0,
        "budget_max_yuan": 0,
        "priority": 0,
    }
    h = rules.clue_request_hash(**kw)  # type: ignore[arg-type]
    assert h == rules.clue_request_hash(**kw)  # type: ignore[arg-type]
    assert h != rules.clue_request_hash(**{**kw, "phone_hash": "g"})  # type: ignore[arg-type]
    assert h != rules.clue_request_hash(**{**kw, "priority": 1})  # type: ignore[arg-type]
    assert rules.resolve_priority(7, "app", {"app": 2}, 5) == 7
    assert rules.resolve_priority(0, "app", {"app": 2}, 5) == 2
    assert rules.resolve_priority(0, "web", {"app": 2}, 5) == 5
    assert rules.merge_brands(("BMW", "Audi"), ("audi", "Tesla")) == ("BMW", "Audi", "Tesla")


def test_line_config_parse() -> None:
    cfg = parse("SALE", b'{"accept_timeout_s": 10, "weights": {"star": 5}}')
    assert cfg.accept_timeout_s == 10
    assert cfg.weights.star == 5
    assert cfg.weights.priority == 100
    assert parse("FINANCE", b"{}") == LineConfig()
    # a line is data: any upper snake case name with its code (the well-known ones need none)
    assert parse("RETAIL", b'{"code": 4}').code == 4
    assert parse("FINANCE", b'{"code": 3}').code == 3
    for key, raw, where in [
        ("RETAIL", b"{}", "code"),  # another line needs its code
        ("RETAIL", b'{"code": 2}', "code"),  # reserved for AFTER_SALE
        ("RETAIL", b'{"code": 0}', "code"),
        ("FINANCE", b'{"code": 4}', "code"),  # FINANCE is 3
    ]:
        with pytest.raises(pydantic.ValidationError) as exc:
            parse(key, raw)
        assert exc.value.errors()[0]["loc"] == (where,)
    with pytest.raises(ValueError, match="not a business line name"):
        parse("SALE/extra", b"{}")
    with pytest.raises(ValueError, match="not a business line name"):
        parse("leasing", b'{"code": 4}')
    bad_values = [
        b'{"accept_timeout_s": 0}',
        b'{"accept_timeout_s": 3601}',
        b'{"merge_window_s": 2592001}',
        b'{"default_priority": 10}',
        b'{"source_priority": {"app": 11}}',
        b'{"candidate_limit": 0}',
        b'{"unknown": 1}',
        b'{"weights": {"speed": 1}}',
        b'{"weights": {"star": "NaN"}}',
        b"not json",
        b"[]",
    ]
    for raw in bad_values:
        with pytest.raises(ValidationError):
            parse("SALE", raw)


def test_routing_config_defaults_per_line() -> None:
    routing = RoutingConfig.from_values({"SALE": LineConfig(accept_timeout_s=9)}, 17)
    assert routing.version == 17
    assert routing.line(BusinessLine.SALE).accept_timeout_s == 9
    assert routing.line(BusinessLine.FINANCE) == LineConfig()
