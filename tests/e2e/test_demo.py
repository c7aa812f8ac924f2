"""`make demo` keeps working: run the scripted scenario end to end, as a user would.

Real processes: the demo starts the platform (recommendation, the bilog registry, intake
service and file sink, assignment) as processes on fresh databases, against the real
local stack (MariaDB, etcd, Tansu).
"""

from __future__ import annotations

import os
import re
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
        for db in (name, f"{name}_reco", f"{name}_bireg"):
            drop_database(db)
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
    # the whole platform ran as processes and stopped gracefully, in reverse order
    for svc in ("recommendation", "bilog-registry", "bilog", "bilog-sink"):
        assert re.search(rf"started {svc} ", out), svc
        assert f"{svc} stopped (exit code 0)" in out, svc
    assert out.index("assignment stopped") < out.index("recommendation stopped")
    assert "cars loaded into the inventory" in out
    # a task detail carries recommended cars from the inventory
    recs = re.search(r"recommendations on task \d+ .*: available, (\d+) cars", out)
    assert recs is not None, out[-4000:]
    assert int(recs.group(1)) >= 1
    # task transitions went through bilog and Kafka into the sink's Avro files
    bi = re.search(r"BI records: (\d+) read back .* the task histories list (\d+) transitions", out)
    assert bi is not None, out[-4000:]
    # every transition recorded by assignment reached the files (at least once)
    assert int(bi.group(2)) > 0
    assert int(bi.group(1)) >= int(bi.group(2))
    assert re.search(r"BI files: \d+ TaskTransition records in \d+ files", out)
