"""`make demo` keeps working: a short call-center day, end to end, as a user runs it.

Real processes on the real local stack (MariaDB, Redis, etcd, Tansu): recommendation,
the bilog schema registry, intake and file sink, the scheduler API, pump and worker,
and assignment. With ``--chaos`` the scheduler worker, the BI intake and the assignment
service are killed with SIGKILL mid-day and restarted (the scheduler pump and the BI file
sink with the worker), each at a moment when work is in flight. The demo itself reads the
assignment database, the scheduler's jobs and the BI files back and exits non-zero when
they disagree; this test also checks the printed numbers against each other.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from crm_devstack import Stack, drop_database

ROOT = Path(__file__).resolve().parents[2]
PROCESSES = (
    "recommendation",
    "bilog-registry",
    "scheduler",
    "bilog",
    "scheduler-pump",
    "scheduler-worker",
    "bilog-sink",
    "bilog-kpi",
    "assignment",
    "config-admin",
)


DEMO_TIMEOUT_S = 900
IN_FLIGHT = re.compile(r"in flight: (\d+) tasks held by agents mid-call, (\d+) scheduler jobs")
KPI_CHECKS = (
    "realtime KPIs (from the BI stream) agree with the database",
    "realtime KPI calls agree with the call records",
    "realtime KPI wait-time histogram has one sample per offer",
    "realtime KPIs show nothing waiting or open after the drain",
)


def _kill_line(out: str, what: str) -> tuple[int, int]:
    """(tasks agents held mid-call, scheduler jobs pending) when ``what`` was killed."""
    line = next((ln for ln in out.splitlines() if what in ln), None)
    assert line is not None, what
    m = IN_FLIGHT.search(line)
    assert m is not None, line
    return int(m.group(1)), int(m.group(2))


# the subprocess may take up to DEMO_TIMEOUT_S; the global pytest timeout is shorter
@pytest.mark.timeout(DEMO_TIMEOUT_S + 60)
def test_call_center_day_with_chaos_loses_nothing(stack: Stack) -> None:
    name = f"crm_demo_t{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tools")}
    try:
        res = subprocess.run(
            [sys.executable, "-m", "crm_tools.demo", "--chaos", "--hour-s", "3", "--name", name],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=DEMO_TIMEOUT_S,
            check=False,
        )
    finally:
        for db in (name, f"{name}_reco", f"{name}_bireg", f"{name}_sched"):
            drop_database(db)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    # the whole platform ran as processes and stopped gracefully, in reverse order
    for proc in PROCESSES:
        assert re.search(rf"started {proc} ", out), proc
        assert f"{proc} stopped (exit code 0)" in out, proc
    assert out.index("assignment stopped") < out.index("recommendation stopped")
    # the chaos happened and the clients rode it out
    assert "CHAOS: scheduler worker and BI intake killed (SIGKILL)" in out
    assert "CHAOS: the assignment service killed (SIGKILL)" in out
    assert "assignment back" in out
    for proc in ("scheduler-worker", "scheduler-pump", "bilog", "bilog-sink", "assignment"):
        assert re.search(rf"^\[[\d:]+\] {proc} killed with SIGKILL", out, re.M), proc
    # ... at moments when there was something to lose: agents mid-call (their call
    # records, completions and BI events still to come) and scheduler jobs pending (offer
    # timeouts, call-backs) when the worker, pump, intake and sink died; agents mid-call
    # when assignment died: their next calls failed and were retried, their streams broke
    held, jobs = _kill_line(out, "CHAOS: scheduler worker and BI intake")
    assert held > 0, (held, jobs)
    assert jobs > 0, (held, jobs)
    held, _ = _kill_line(out, "CHAOS: the assignment service killed")
    assert held > 0, held
    rode = re.search(
        r"client retries after UNAVAILABLE: (\d+), offer streams broken and reopened: (\d+)", out
    )
    assert rode is not None, out[-6000:]
    assert int(rode.group(1)) > 0, rode.group(0)
    assert int(rode.group(2)) > 0, rode.group(0)
    # the scenario's beats
    assert "lets the offer of task" in out  # an offer rang out ...
    recycles = re.search(r"recycle_count (\d+), history (\d+), BI (\d+)", out)
    assert recycles is not None, out[-6000:]
    assert int(recycles.group(1)) >= 1  # ... and was recycled by a scheduler job
    assert "accept window before the 11:00 change and 8 s after it" in out  # live config
    # a business line is data: FINANCE is closed until its config document appears
    assert "FINANCE clue turned away: business line FINANCE is closed" in out
    assert "ops open the FINANCE line (`crmctl config apply" in out  # one CRMConfig document
    finance = re.search(r"^FINANCE\s+(\d+)\s+(\d+)", out, re.M)
    assert finance is not None, out[-6000:]
    assert int(finance.group(2)) >= 1, out[-6000:]
    # the three records agree (the demo exits 1 otherwise; the lines say what was checked)
    checks = re.findall(r"^  \[(ok|FAIL)\] (.*)$", out, re.M)
    assert len(checks) >= 10, out[-6000:]
    names = " | ".join(name for _, name in checks)
    assert "call records agree" in names
    assert "presence changes agree" in names
    # the KPI consumer ran, so its cross-checks ran (a scrape failure is a FAIL, not a skip)
    for kpi_check in KPI_CHECKS:
        assert kpi_check in names, kpi_check
    # every offer has its expire-offer job, and ended accepted or recycled by it
    assert "one expire-offer job per offer" in names
    offers = re.search(r"(\d+) offers in the history, (\d+) expire-offer jobs; (\d+) accepted", out)
    assert offers is not None, out[-6000:]
    assert int(offers.group(1)) == int(offers.group(2)) > 0
    assert all(status == "ok" for status, _ in checks), checks
    moved = re.search(r"(\d+) transitions, 0 missing from the files", out)
    assert moved is not None
    assert int(moved.group(1)) > 0
    # a task detail carries recommended cars from the inventory
    recs = re.search(r"recommendations on task \d+ .*: available, (\d+) cars", out)
    assert recs is not None, out[-6000:]
    assert int(recs.group(1)) >= 1
    page = re.search(r"HTML report: (\S+)", out)
    assert page is not None
    text = Path(page.group(1)).read_text()
    assert text.count("<svg") >= 5
    assert "all checks passed" in text
    assert "Realtime KPIs" in text
    assert "Config history of assignment/SALE" in text
    # the 11:00 change went through crmctl config set: validated, with its author kept
    assert re.search(r"crmctl\| assignment/SALE: written at revision \d+", out), out[-6000:]
    assert re.search(r"crmctl\|.*ops-demo", out), out[-6000:]
