"""A stand-in for Kafka Connect's REST API (an aiohttp app in the test process).

It implements the documented calls the operator makes (PUT /connectors/{name}/config,
GET .../status, PUT .../pause|resume|stop, DELETE, POST .../tasks/{id}/restart) over an
in-memory connector table, records every call, and can be told to fail a task for a
number of restarts or to hang every request (an unreachable cluster). It is not Kafka
Connect: no workers, no rebalancing, state changes are immediate.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["ConnectStandIn"]


@dataclass
class Connector:
    config: dict[str, str]
    state: str = "RUNNING"
    tasks: dict[int, str] = field(default_factory=dict)


class ConnectStandIn:
    def __init__(self, *, hang: bool = False) -> None:
        self.hang = hang
        self.connectors: dict[str, Connector] = {}
        self.calls: list[tuple[str, str]] = []
        self.pending = 0  # requests being held (hang mode)
        self.fail_task_restarts: dict[tuple[str, int], int] = {}  # restarts that fail again
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        app = web.Application(middlewares=[self._middleware])
        r = app.router
        r.add_put("/connectors/{name}/config", self._put_config)
        r.add_get("/connectors/{name}/config", self._get_config)
        r.add_get("/connectors/{name}/status", self._status)
        r.add_put("/connectors/{name}/pause", self._state("PAUSED"))
        r.add_put("/connectors/{name}/resume", self._state("RUNNING"))
        r.add_put("/connectors/{name}/stop", self._state("STOPPED"))
        r.add_delete("/connectors/{name}", self._delete)
        r.add_post("/connectors/{name}/tasks/{task}/restart", self._restart)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def fail_task(self, name: str, task: int, restarts_that_fail: int) -> None:
        """Mark ``task`` FAILED; its next ``restarts_that_fail`` restarts fail again."""
        self.connectors[name].tasks[task] = "FAILED"
        self.fail_task_restarts[(name, task)] = restarts_that_fail

    def count(self, method: str, suffix: str) -> int:
        return sum(1 for m, p in self.calls if m == method and p.endswith(suffix))

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.calls.append((request.method, request.path))
        if self.hang:
            self.pending += 1
            try:
                await self._release.wait()
            finally:
                self.pending -= 1
        resp: web.StreamResponse = await handler(request)
        return resp

    def _get(self, request: web.Request) -> Connector:
        c = self.connectors.get(request.match_info["name"])
        if c is None:
            raise web.HTTPNotFound(text='{"error_code":404,"message":"Connector not found"}')
        return c

    async def _put_config(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        config = await request.json()
        created = name not in self.connectors
        if created:
            tasks = {i: "RUNNING" for i in range(int(config.get("tasks.max", 1)))}
            self.connectors[name] = Connector(config, tasks=tasks)
        else:
            self.connectors[name].config = config
        body = {"name": name, "config": config, "tasks": [], "type": "sink"}
        return web.json_response(body, status=201 if created else 200)

    async def _get_config(self, request: web.Request) -> web.Response:
        return web.json_response(self._get(request).config)

    async def _status(self, request: web.Request) -> web.Response:
        c = self._get(request)
        return web.json_response(
            {
                "name": request.match_info["name"],
                "connector": {"state": c.state, "worker_id": "standin:8083"},
                "tasks": [
                    {"id": i, "state": s, "worker_id": "standin:8083"}
                    | (
                        {"trace": "org.apache.kafka.connect.errors.ConnectException: boom"}
                        if s == "FAILED"
                        else {}
                    )
                    for i, s in sorted(c.tasks.items())
                ],
                "type": "sink",
            }
        )

    def _state(self, state: str) -> Any:
        async def handler(request: web.Request) -> web.Response:
            c = self._get(request)
            c.state = state
            for i, s in c.tasks.items():
                if s != "FAILED":
                    c.tasks[i] = state if state != "STOPPED" else "UNASSIGNED"
            return web.Response(status=202)

        return handler

    async def _delete(self, request: web.Request) -> web.Response:
        self._get(request)
        del self.connectors[request.match_info["name"]]
        return web.Response(status=204)

    async def _restart(self, request: web.Request) -> web.Response:
        c = self._get(request)
        name, task = request.match_info["name"], int(request.match_info["task"])
        left = self.fail_task_restarts.get((name, task), 0)
        if left > 0:
            self.fail_task_restarts[(name, task)] = left - 1
            c.tasks[task] = "FAILED"
        else:
            c.tasks[task] = "RUNNING"
        return web.Response(status=204)
