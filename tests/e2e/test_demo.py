"""`make demo` keeps working: run the scripted scenario end to end, as a user would.

Real processes: the assignment service is started by the demo as its own process on a
fresh database, against the real local stack (MariaDB, etcd).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from crm_devstack import Stack, drop_database

ROOT = Path(__file__).resolve().parents[2]


def test_demo_scenario_runs_and_drains(stack: Stack) -> None:
    name = f"crm_demo_t{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tools")}
    try:
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "crm_tools.demo",
                "--clues",
                "12",
                "--seed",
                "3",
                "--name",
                name,
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
    finally:
        drop_database(name)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "assignment is SERVING" in out
    assert "all queues drained" in out
    assert "merged into open task" in out  # a duplicate clue merged
    assert "ring out" in out  # the sleepy agent's offer timed out ...
    assert "offers lost and recycled: 0" not in out  # ... and was recycled
    # the accept window changed from 3 s to 8 s without a restart
    assert "accept window before the change and 8 s after it" in out
    assert "assignment stopped (exit code 0)" in out  # graceful stop
