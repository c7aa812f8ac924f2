"""Business lines are data: the value type every service shares."""

from __future__ import annotations

import pickle

import pytest
from crm_common.lines import LINE_NAME, WELL_KNOWN_LINES, BusinessLine, default_name


def test_a_line_is_any_code_from_1() -> None:
    leasing = BusinessLine(4)
    assert leasing == 4
    assert int(leasing) == 4
    assert str(leasing) == "4"
    assert f"{leasing}" == "4"
    assert repr(leasing) == "BusinessLine(4)"
    assert leasing.name == "LINE_4"
    assert not leasing.well_known
    assert pickle.loads(pickle.dumps(leasing)) == leasing
    assert {BusinessLine(4): "x"}[4] == "x"  # hashes as its int
    for bad in (0, -1, 2**31):
        with pytest.raises(ValueError, match="not a business line code"):
            BusinessLine(bad)
    with pytest.raises(TypeError):
        BusinessLine(True)


def test_well_known_lines() -> None:
    assert BusinessLine.well_known_lines() == (1, 2, 3)
    assert [b.name for b in BusinessLine.well_known_lines()] == list(WELL_KNOWN_LINES)
    assert BusinessLine.SALE == 1
    assert BusinessLine.FINANCE.well_known
    assert [default_name(c) for c in (1, 2, 3, 9, 0, -2)] == [
        "SALE", "AFTER_SALE", "FINANCE", "LINE_9", "LINE_0", "LINE_-2",
    ]  # fmt: skip


def test_line_names() -> None:
    for ok in ("SALE", "LEASING", "B2B_2", "X"):
        assert LINE_NAME.fullmatch(ok)
    for bad in ("sale", "2B", "A-B", "", "A" * 33, "SALE/X"):
        assert not LINE_NAME.fullmatch(bad)
