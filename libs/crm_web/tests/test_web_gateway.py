"""The grpc-web gateway against the real assignment service (MariaDB, etcd, gRPC on real
sockets), spoken to as a browser would: grpc-web over HTTP/1.1 (httpx)."""

from __future__ import annotations

import asyncio
import base64
import socket
import struct
from pathlib import Path

import grpc
import httpx
import pytest
import uvicorn
from crm.assignment.v1 import assignment_pb2 as pb
from crm.assignment.v1 import assignment_pb2_grpc as pb_grpc
from crm.common.v1 import common_pb2
from crm.config.v1 import config_pb2 as cpb
from crm_assignment.app import build_app
from crm_assignment.settings import AssignmentSettings
from crm_assignment.store.migrate import upgrade
from crm_ctl.app import build_app as build_config_admin
from crm_ctl.settings import ConfigAdminSettings
from crm_web.gateway import CONFIG_ADMIN, Forwarder, forwarded_metadata, grpc_web_app
from crm_web.static import StaticFiles
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

SVC = "crm.assignment.v1.AssignmentService"
GRPC_WEB = {"content-type": "application/grpc-web+proto", "x-grpc-web": "1", "accept": "*/*"}
SALE = common_pb2.BUSINESS_LINE_SALE


def frame(msg: Message, trailer: bool = False) -> bytes:
    data = msg.SerializeToString()
    return struct.pack(">BI", 0x80 if trailer else 0, len(data)) + data


def unframe(body: bytes) -> tuple[list[bytes], dict[str, str]]:
    """grpc-web body -> (messages, trailers)."""
    messages: list[bytes] = []
    trailers: dict[str, str] = {}
    while body:
        flags, length = struct.unpack(">BI", body[:5])
        data, body = body[5 : 5 + length], body[5 + length :]
        if flags & 0x80:
            for line in data.decode().splitlines():
                k, _, v = line.partition(":")
                trailers[k.strip()] = v.strip()
        else:
            messages.append(data)
    return messages, trailers


@pytest.fixture
async def assignment(mysql_database: str, etcd_endpoint: str, config_prefix: str):  # type: ignore[no-untyped-def]
    upgrade(mysql_database)
    settings = AssignmentSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        database_url=mysql_database,
        db_pool_size=4,
        etcd_endpoints=etcd_endpoint,
        config_prefix=config_prefix,
        dispatch_poll_s=0.2,
        shutdown_grace_s=1.0,
        readiness_interval_s=0.2,
    )
    app = build_app(settings)
    await app.start()
    await app.wait_ready()
    yield app
    await app.stop(0.5)


@pytest.fixture
async def stub(assignment):  # type: ignore[no-untyped-def]
    """The assignment service spoken to directly (as another service would: no token),
    to set up what browsers may not (agents, clues)."""
    async with grpc.aio.insecure_channel(assignment.target) as channel:
        yield pb_grpc.AssignmentServiceStub(channel)


async def serve_gateway(app: object) -> tuple[str, uvicorn.Server, asyncio.Task[None]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_config=None))  # type: ignore[arg-type]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:  # noqa: ASYNC110 (uvicorn offers no event for it)
        await asyncio.sleep(0.01)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server, task


async def add_agent(
    stub: pb_grpc.AssignmentServiceAsyncStub, agent_id: int, capacity: int = 1
) -> None:
    agent = pb.Agent(id=agent_id, name=f"Agent {agent_id}", business_line=SALE, capacity=capacity)
    await stub.UpsertAgent(pb.UpsertAgentRequest(agent=agent))


async def add_clue(
    stub: pb_grpc.AssignmentServiceAsyncStub, key: str, phone: str, source: str = "web"
) -> int:
    """A SALE clue from Beijing; its task's id."""
    clue = pb.CreateClueRequest(
        idempotency_key=key, phone=phone, business_line=SALE, source=source, city="beijing"
    )
    return (await stub.CreateClue(clue)).task.id


async def first_offer(r: httpx.Response) -> pb.Offer:
    """The first offer of a StreamOffers response read as it streams in."""
    buf = b""
    async for chunk in r.aiter_bytes():
        buf += chunk
        if len(buf) >= 5 and len(buf) >= 5 + struct.unpack(">BI", buf[:5])[1]:
            break
    return pb.StreamOffersResponse.FromString(unframe(buf)[0][0]).offer


async def sign_in(http: httpx.AsyncClient, agent_id: int) -> dict[str, str]:
    """SignIn through the gateway (no credential needed yet): the headers of that agent."""
    r = await http.post(
        f"/{SVC}/SignIn", content=frame(pb.SignInRequest(agent_id=agent_id)), headers=GRPC_WEB
    )
    messages, trailers = unframe(r.content)
    assert trailers["grpc-status"] == "0", (r.headers, trailers)
    token = pb.SignInResponse.FromString(messages[0]).token
    return {**GRPC_WEB, "authorization": f"Bearer {token}"}


async def call(
    http: httpx.AsyncClient, method: str, msg: Message, headers: dict[str, str] = GRPC_WEB
) -> tuple[str, str, list[bytes]]:
    """A unary grpc-web call: (grpc-status, grpc-message, messages)."""
    r = await http.post(f"/{SVC}/{method}", content=frame(msg), headers=headers)
    assert r.status_code == 200
    messages, trailers = unframe(r.content)
    status = r.headers.get("grpc-status") or trailers["grpc-status"]
    message = r.headers.get("grpc-message") or trailers.get("grpc-message", "")
    return status, httpx.URL("/?m=" + message).params["m"], messages


@pytest.fixture
async def gateway_app(assignment, tmp_path: Path):  # type: ignore[no-untyped-def]
    (tmp_path / "index.html").write_text("<!doctype html><title>console</title>")
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "app-1234.js").write_text("console.log(1)")
    app, forwarder = grpc_web_app({SVC: assignment.target}, StaticFiles(tmp_path))
    url, server, task = await serve_gateway(app)
    yield url, forwarder
    server.should_exit = True
    await task
    await forwarder.close()


@pytest.fixture
def gateway(gateway_app: tuple[str, Forwarder]) -> str:
    return gateway_app[0]


async def test_unary_call_round_trips_and_keeps_request_id(
    gateway: str, stub: pb_grpc.AssignmentServiceAsyncStub
) -> None:
    await add_agent(stub, 7)
    async with httpx.AsyncClient(base_url=gateway) as http:
        r = await http.post(
            f"/{SVC}/SignIn",
            content=frame(pb.SignInRequest(agent_id=7)),
            headers={**GRPC_WEB, "x-request-id": "req-web-1", "cookie": "secret=1"},
        )
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/grpc-web+proto"
        messages, trailers = unframe(r.content)
        assert trailers["grpc-status"] == "0"
        assert trailers["x-request-id"] == "req-web-1"
        resp = pb.SignInResponse.FromString(messages[0])
        assert resp.agent.name == "Agent 7"
        # the token works through the gateway
        auth = {**GRPC_WEB, "authorization": f"Bearer {resp.token}"}
        status, _, messages = await call(http, "GetAgent", pb.GetAgentRequest(id=7), auth)
        assert status == "0"
        assert pb.GetAgentResponse.FromString(messages[0]).agent.capacity == 1


async def test_errors_carry_status_message_and_field_details(
    gateway: str, stub: pb_grpc.AssignmentServiceAsyncStub
) -> None:
    await add_agent(stub, 8)
    async with httpx.AsyncClient(base_url=gateway) as http:
        auth = await sign_in(http, 8)
        r = await http.post(f"/{SVC}/GetTask", content=frame(pb.GetTaskRequest(id=0)), headers=auth)
        assert r.status_code == 200
        assert r.headers["grpc-status"] == "3"  # INVALID_ARGUMENT, trailers-only
        raw = r.headers["grpc-status-details-bin"]
        st = status_pb2.Status.FromString(base64.b64decode(raw + "=" * (-len(raw) % 4)))
        bad = error_details_pb2.BadRequest()
        assert st.details[0].Unpack(bad)
        assert [v.field for v in bad.field_violations] == ["id"]
        r = await http.post(
            f"/{SVC}/GetTask", content=frame(pb.GetTaskRequest(id=424242)), headers=auth
        )
        assert r.headers["grpc-status"] == "5"  # NOT_FOUND
        assert "424242" in httpx.URL("/?m=" + r.headers["grpc-message"]).params["m"]


async def test_offer_stream_opens_at_once_and_pushes_offers(
    gateway: str, stub: pb_grpc.AssignmentServiceAsyncStub
) -> None:
    await add_agent(stub, 9)
    async with httpx.AsyncClient(base_url=gateway, timeout=30) as http:
        auth = await sign_in(http, 9)
        idle = pb.SetPresenceRequest(agent_id=9, presence=pb.PRESENCE_IDLE)
        assert (await call(http, "SetPresence", idle, auth))[0] == "0"
        req = frame(pb.StreamOffersRequest(agent_id=9))
        async with http.stream("POST", f"/{SVC}/StreamOffers", content=req, headers=auth) as r:
            # headers arrive before any offer exists
            assert r.status_code == 200
            assert "grpc-status" not in r.headers
            task_id = await add_clue(stub, "web-1", "13812341234", source="app")
            offer = await first_offer(r)
            assert offer.task.id == task_id
            assert offer.customer.phone.masked == "138****1234"


async def test_unknown_methods_and_static_files(gateway: str) -> None:
    async with httpx.AsyncClient(base_url=gateway) as http:
        r = await http.post(f"/{SVC}/NoSuchMethod", content=b"", headers=GRPC_WEB)
        assert r.status_code == 405  # not routed: falls through to the static files
        r = await http.post("/crm.config.v1.Nothing/Get", content=b"", headers=GRPC_WEB)
        assert r.status_code == 405
        assert (await http.get("/")).text.startswith("<!doctype html>")
        assert "console" in (await http.get("/tasks/12")).text  # client-side route
        js = await http.get("/assets/app-1234.js")
        assert js.headers["content-type"] == "text/javascript"
        assert "immutable" in js.headers["cache-control"]
        assert (await http.get("/assets/missing.js")).status_code == 404
        assert (await http.get("/healthz")).text == "ok\n"
    # a path escaping the folder, sent raw (an HTTP client would normalize it)
    host, port = httpx.URL(gateway).host, httpx.URL(gateway).port
    for path in ("/../../../../etc/hostname", "/assets/../../../../../etc/hostname.txt"):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 404"), answer[:80]


def test_only_allow_listed_headers_are_forwarded() -> None:
    got = forwarded_metadata(
        [
            ("authorization", "Bearer t"),
            ("X-Request-Id", "r1"),
            ("cookie", "c"),
            ("host", "h"),
            ("user-agent", "u"),
            ("traceparent", "00-abc-def-01"),
            ("x-crm-author", "ops"),
            ("x-crm-other", "no"),
        ]
    )
    assert got == [
        ("authorization", "Bearer t"),
        ("x-request-id", "r1"),
        ("traceparent", "00-abc-def-01"),
        ("x-crm-author", "ops"),
    ]


async def test_calls_without_authorization_are_refused_at_the_gateway(
    gateway: str, stub: pb_grpc.AssignmentServiceAsyncStub
) -> None:
    """The service trusts a call without ``authorization`` as a service's: the gateway
    must never let a browser's header-less call through."""
    await add_agent(stub, 21)
    task_id = await add_clue(stub, "web-anon", "13912345678")
    async with httpx.AsyncClient(base_url=gateway, timeout=30) as http:
        for method, msg in [
            ("GetTask", pb.GetTaskRequest(id=task_id)),
            ("ListTasks", pb.ListTasksRequest()),
            ("GetAgent", pb.GetAgentRequest(id=21)),
            ("SetPresence", pb.SetPresenceRequest(agent_id=21, presence=pb.PRESENCE_IDLE)),
            ("AcceptTask", pb.AcceptTaskRequest(task_id=task_id, agent_id=21)),
        ]:
            status, message, messages = await call(http, method, msg)
            assert (status, messages) == ("16", []), (method, message)  # UNAUTHENTICATED
            assert "authorization" in message
            # an empty header is no header
            empty = {**GRPC_WEB, "authorization": ""}
            assert (await call(http, method, msg, empty))[0] == "16"
        req = frame(pb.StreamOffersRequest(agent_id=21))
        r = await http.post(f"/{SVC}/StreamOffers", content=req, headers=GRPC_WEB)
        messages, trailers = unframe(r.content)
        assert (messages, trailers["grpc-status"]) == ([], "16")
    # nothing reached the service: the agent is still offline, the task unassigned
    assert (await stub.GetAgent(pb.GetAgentRequest(id=21))).agent.presence != pb.PRESENCE_IDLE
    assert (await stub.GetTask(pb.GetTaskRequest(id=task_id))).task.agent_id == 0


async def test_service_rpcs_are_not_served_to_browsers(
    gateway: str, stub: pb_grpc.AssignmentServiceAsyncStub
) -> None:
    await add_agent(stub, 22)
    task_id = await add_clue(stub, "web-svc", "13912345679")
    evil = pb.Agent(id=23, name="evil", business_line=SALE, capacity=9)
    async with httpx.AsyncClient(base_url=gateway, timeout=30) as http:
        auth = await sign_in(http, 22)
        for method, msg in [
            ("UpsertAgent", pb.UpsertAgentRequest(agent=evil)),
            ("CreateClue", pb.CreateClueRequest(idempotency_key="x", phone="13900000000")),
            ("CancelTask", pb.CancelTaskRequest(task_id=task_id, reason="no")),
            ("QueueStats", pb.QueueStatsRequest()),
            ("ExpireOffer", pb.ExpireOfferRequest(task_id=task_id)),
            ("SetCustomerStar", pb.SetCustomerStarRequest()),
        ]:
            for headers in (GRPC_WEB, auth):  # with or without a token
                status, message, _ = await call(http, method, msg, headers)
                assert status == "7", (method, status, message)  # PERMISSION_DENIED
                assert f"{SVC}/{method} is not served by the web gateway" in message
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetAgent(pb.GetAgentRequest(id=23))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    task = (await stub.GetTask(pb.GetTaskRequest(id=task_id))).task
    assert task.status != pb.STATUS_CANCELLED


async def test_an_agent_token_never_reads_another_agents_task(
    gateway: str, stub: pb_grpc.AssignmentServiceAsyncStub
) -> None:
    """Agents 31 and 32 on the same line; the task goes to 32 (the only idle one): 31's
    token neither gets nor lists it, while offered and once accepted."""
    await add_agent(stub, 31)
    await add_agent(stub, 32, capacity=2)
    async with httpx.AsyncClient(base_url=gateway, timeout=30) as http:
        a = await sign_in(http, 31)
        b = await sign_in(http, 32)
        idle = pb.SetPresenceRequest(agent_id=32, presence=pb.PRESENCE_IDLE)
        assert (await call(http, "SetPresence", idle, b))[0] == "0"
        req = frame(pb.StreamOffersRequest(agent_id=32))
        async with http.stream("POST", f"/{SVC}/StreamOffers", content=req, headers=b) as r:
            assert r.status_code == 200
            task_id = await add_clue(stub, "web-b", "13812345678")
            offer = await first_offer(r)  # 32's console gets the offer
            assert offer.task.id == task_id

        async def state() -> pb.Status.ValueType:
            return (await stub.GetTask(pb.GetTaskRequest(id=task_id))).task.status

        async def a_cannot_see_it() -> None:
            status, message, _ = await call(http, "GetTask", pb.GetTaskRequest(id=task_id), a)
            assert status == "5", message  # NOT_FOUND: the id's existence is not revealed
            mine = pb.ListTasksRequest(statuses=[pb.STATUS_ASSIGNED, pb.STATUS_IN_PROGRESS])
            for q in (pb.ListTasksRequest(), mine):
                status, _, messages = await call(http, "ListTasks", q, a)
                assert status == "0"
                listed = pb.ListTasksResponse.FromString(messages[0]) if messages else None
                assert listed is None or task_id not in [t.id for t in listed.tasks]
            asks_b = pb.ListTasksRequest(agent_id=32)
            assert (await call(http, "ListTasks", asks_b, a))[0] == "7"

        assert await state() == pb.STATUS_ASSIGNED  # offered to 32
        status, _, messages = await call(http, "GetTask", pb.GetTaskRequest(id=task_id), b)
        assert status == "0"
        assert pb.GetTaskResponse.FromString(messages[0]).task.agent_id == 32
        await a_cannot_see_it()
        accept = pb.AcceptTaskRequest(task_id=task_id, agent_id=32)
        assert (await call(http, "AcceptTask", accept, b))[0] == "0"
        assert await state() == pb.STATUS_IN_PROGRESS
        await a_cannot_see_it()
        # nor act on it as 32
        as_b = pb.CompleteTaskRequest(task_id=task_id, agent_id=32)
        assert (await call(http, "CompleteTask", as_b, a))[0] == "7"


async def test_trusted_author_header_names_the_config_author(
    etcd_endpoint: str, config_prefix: str, tmp_path: Path
) -> None:
    """Behind an authenticating proxy (``author_header``): ConfigAdmin's author is the
    proxy's header, never what the browser says; a call without it is refused."""
    settings = ConfigAdminSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        etcd_endpoints=etcd_endpoint,
        config_prefix=config_prefix,
        readiness_interval_s=0.2,
        shutdown_grace_s=1.0,
    )
    async with build_config_admin(settings) as admin:
        await admin.wait_ready(20)
        app, forwarder = grpc_web_app(
            {CONFIG_ADMIN: admin.target}, StaticFiles(tmp_path), "X-Auth-Request-User"
        )
        url, server, task = await serve_gateway(app)
        try:
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                req = frame(
                    cpb.SetRequest(
                        service="assignment", key="SALE", value_json='{"accept_timeout_s": 45}'
                    )
                )
                path = f"/{CONFIG_ADMIN}/Set"
                forged = {**GRPC_WEB, "x-crm-author": "the-boss"}
                r = await http.post(path, content=req, headers=forged)
                assert r.headers["grpc-status"] == "16"  # not through the proxy
                assert (
                    "x-auth-request-user"
                    in httpx.URL("/?m=" + r.headers["grpc-message"]).params["m"]
                )
                r = await http.post(
                    path, content=req, headers={**forged, "x-auth-request-user": "li.na"}
                )
                messages, trailers = unframe(r.content)
                assert trailers["grpc-status"] == "0", trailers
                assert cpb.SetResponse.FromString(messages[0]).version.author == "li.na"
                # a method config review does not use is not served
                r = await http.post(f"/{CONFIG_ADMIN}/Nothing", content=b"", headers=GRPC_WEB)
                assert r.status_code == 405
        finally:
            server.should_exit = True
            await task
            await forwarder.close()


def test_trusted_author_header_replaces_the_browsers() -> None:
    got = forwarded_metadata(
        [("x-crm-author", "forged"), ("X-Forwarded-User", "li.na"), ("authorization", "B t")],
        author_header="x-forwarded-user",
    )
    assert got == [("x-crm-author", "li.na"), ("authorization", "B t")]
    # without the option the browser's header is passed on (development)
    assert forwarded_metadata([("x-crm-author", "me")]) == [("x-crm-author", "me")]


def test_unknown_service_is_refused() -> None:
    with pytest.raises(KeyError):
        Forwarder({"crm.nothing.v1.Nothing": "127.0.0.1:1"})


async def test_closing_the_browser_ends_the_upstream_stream(
    gateway_app: tuple[str, Forwarder], stub: pb_grpc.AssignmentServiceAsyncStub
) -> None:
    url, forwarder = gateway_app
    await add_agent(stub, 11)
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        auth = await sign_in(http, 11)
        req = frame(pb.StreamOffersRequest(agent_id=11))
        async with http.stream("POST", f"/{SVC}/StreamOffers", content=req, headers=auth) as r:
            assert r.status_code == 200
            assert forwarder.open_streams == 1
        # the response was closed without reading: the connection goes, and so does the
        # upstream call, without waiting for a message that would reveal the dead peer
    deadline = asyncio.get_running_loop().time() + 10
    while forwarder.open_streams and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    assert forwarder.open_streams == 0


async def test_serve_command_prints_its_url_and_stops_on_sigterm(tmp_path: Path) -> None:
    import signal
    import sys

    (tmp_path / "index.html").write_text("<!doctype html><title>console</title>")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "crm_web",
        "serve",
        "--port",
        "0",
        "--assignment",
        "127.0.0.1:1",
        "--static",
        str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line.startswith("crm-web: console at http://127.0.0.1:"), line
        url = line.split(" at ", 1)[1].strip()
        async with httpx.AsyncClient(base_url=url) as http:
            assert (await http.get("/healthz")).status_code == 200
            assert "console" in (await http.get("/")).text
            # the service is down: the call answers UNAVAILABLE, the gateway stays up
            r = await http.post(
                f"/{SVC}/GetTask",
                content=frame(pb.GetTaskRequest(id=1)),
                headers={**GRPC_WEB, "authorization": "Bearer t"},
            )
            assert r.headers["grpc-status"] == "14"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_serve_refuses_an_unknown_service() -> None:
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "crm_web", "serve", "--route", "crm.nope.v1.Nope=127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode != 0
    assert "unknown service" in res.stderr
