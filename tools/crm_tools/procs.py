"""Run platform services as child processes and wait for them to be healthy.

Shared by the demo and the benchmarks: a service is started exactly as in production
(`python -m crm_<svc> serve`, configured by CRM_<SVC>_* environment variables), and is
ready when the standard gRPC health service answers SERVING.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


@dataclass
class ServiceProc:
    """A service process started by ``start_service``."""

    name: str
    port: int
    popen: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    log_start: int = 0
    """Size of the log file when this process started (earlier runs write before it)."""

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM (graceful drain), SIGKILL after ``timeout``; returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


def run_module(module: str, args: list[str], env: dict[str, str], log_path: Path) -> None:
    """Run ``python -m module args`` to completion (e.g. migrations); raise on failure."""
    with log_path.open("ab") as log:
        res = subprocess.run(
            [sys.executable, "-m", module, *args],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if res.returncode != 0:
        raise RuntimeError(f"`{module} {' '.join(args)}` failed; see {log_path}")


def start_service(
    name: str,
    module: str,
    port: int,
    env: dict[str, str],
    log_path: Path,
    args: list[str] | None = None,
) -> ServiceProc:
    """Start ``python -m module serve`` (or ``module *args``) in its own session, logging
    to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_start = log_path.stat().st_size if log_path.exists() else 0
    log = log_path.open("ab")
    popen = subprocess.Popen(
        [sys.executable, "-m", module, *(args if args is not None else ["serve"])],
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C goes to us; we stop children gracefully
    )
    log.close()
    return ServiceProc(
        name=name, port=port, popen=popen, log_path=log_path, env=env, log_start=log_start
    )


async def wait_serving(proc: ServiceProc, timeout: float = 60.0) -> None:
    """Poll the health service until it answers SERVING (or the process dies)."""
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(proc.target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                code = proc.popen.returncode
                raise RuntimeError(f"{proc.name} exited with {code}; see {proc.log_path}")
            with contextlib.suppress(grpc.aio.AioRpcError):
                resp = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{proc.name} not SERVING after {timeout:.0f}s; see {proc.log_path}")


def _check_alive(proc: ServiceProc) -> None:
    if proc.popen.poll() is not None:
        code = proc.popen.returncode
        raise RuntimeError(f"{proc.name} exited with {code}; see {proc.log_path}")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 (local URL)
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


async def wait_http(proc: ServiceProc, path: str, timeout: float = 60.0) -> None:
    """Poll ``GET http://127.0.0.1:<port><path>`` until it answers 200 (or the process dies)."""
    url = f"http://{proc.target}{path}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _check_alive(proc)
        if await asyncio.to_thread(_http_ok, url):
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{proc.name}: GET {url} not OK after {timeout:.0f}s; see {proc.log_path}")


async def wait_log(proc: ServiceProc, text: str, timeout: float = 60.0) -> None:
    """Wait until ``text`` appears in the process's log (for processes without a health
    endpoint, e.g. a Kafka consumer that logs when its partitions are assigned)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _check_alive(proc)
        with contextlib.suppress(OSError), proc.log_path.open("rb") as f:
            f.seek(proc.log_start)
            if text.encode() in f.read():
                return
        await asyncio.sleep(0.2)
    raise RuntimeError(
        f"{proc.name}: no {text!r} in its log after {timeout:.0f}s; see {proc.log_path}"
    )
