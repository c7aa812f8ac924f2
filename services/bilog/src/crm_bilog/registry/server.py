"""The dev schema registry: the subset of Confluent Schema Registry's REST API that
clients (confluent-kafka's SchemaRegistryClient, AvroSerializer/AvroDeserializer, Kafka
Connect's AvroConverter) use, stored in MySQL.

A development and CI stand-in (no Confluent/Karapace/Apicurio server installs here);
production points ``CRM_BILOG_SCHEMA_REGISTRY_URL`` at a real registry.

Routes (Confluent's paths, bodies and ``{"error_code", "message"}`` errors)::

    GET    /subjects                                   ?deleted=true
    GET    /subjects/{s}/versions                      40401
    POST   /subjects/{s}/versions     {"schema"}  ->   {"id"}; 409, 42201
    GET    /subjects/{s}/versions/{v|latest}           40401, 40402, 42202
    GET    /subjects/{s}/versions/{v|latest}/schema
    DELETE /subjects/{s}/versions/{v|latest}           ?permanent=true
    POST   /subjects/{s}              {"schema"}  ->   lookup; 40401, 40403
    DELETE /subjects/{s}                               ?permanent=true
    GET    /schemas/ids/{id}  (+ /schema, /subjects, /versions)   40403
    GET    /schemas/types
    GET|PUT /config, GET|PUT|DELETE /config/{s}        BACKWARD by default; 42203
    POST   /compatibility/subjects/{s}/versions[/{v|latest}]  -> {"is_compatible"}
    GET    /mode, GET /

Only AVRO schemas without references; compatibility is checked with the ``avro``
package's ReaderWriterCompatibilityChecker (see :mod:`crm_bilog.domain.compat`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web
from crm_common.aio import BlockingExecutor

from crm_bilog.domain.compat import LEVELS, InvalidSchema, check_compatibility, parse_avro
from crm_bilog.store.registry import RegistryError, RegistryStore

__all__ = ["CONTENT_TYPE", "build_registry_app", "normalize_schema"]

log = logging.getLogger("crm.bilog.registry")

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"
_MAX_VERSION = 2**31 - 1
_STORE_KEY = web.AppKey("store", RegistryStore)
_EXECUTOR_KEY = web.AppKey("executor", BlockingExecutor)


def normalize_schema(text: str) -> tuple[str, str]:
    """``(normalized text, fingerprint)``: compact JSON with the field order kept (order
    and defaults matter in Avro, so nothing is sorted or stripped)."""
    try:
        parsed = json.loads(text)
    except (ValueError, TypeError) as exc:
        raise RegistryError(422, 42201, f"Invalid schema: not JSON ({exc})") from exc
    try:
        parse_avro(text)
    except InvalidSchema as exc:
        raise RegistryError(422, 42201, f"Invalid schema: {exc}") from exc
    normalized = json.dumps(parsed, separators=(",", ":"), ensure_ascii=False)
    return normalized, hashlib.sha256(normalized.encode()).hexdigest()


def _compat_check(new_text: str) -> Callable[[Sequence[str], str], tuple[bool, list[str]]]:
    new = parse_avro(new_text)

    def check(previous: Sequence[str], level: str) -> tuple[bool, list[str]]:
        result = check_compatibility(new, [parse_avro(t) for t in previous], level)
        return result.compatible, list(result.messages)

    return check


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(body), status=status, content_type=CONTENT_TYPE)


def _error(err: RegistryError) -> web.Response:
    return _json({"error_code": err.error_code, "message": err.message}, err.status)


def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "false").lower() == "true"


def _version(raw: str) -> int | None:
    """``latest``/``-1`` -> None; a positive int; else 42202."""
    if raw in ("latest", "-1"):
        return None
    if raw.isdigit() and 1 <= int(raw) <= _MAX_VERSION:
        return int(raw)
    raise RegistryError(
        422,
        42202,
        "The specified version '" + raw[:40] + "' is not a valid version id. Allowed values "
        'are between [1, 2^31-1] and the string "latest"',
    )


def _schema_id(raw: str) -> int:
    if raw.isdigit() and int(raw) <= _MAX_VERSION:
        return int(raw)
    raise RegistryError(404, 40403, "Schema not found")


async def _schema_body(request: web.Request) -> str:
    try:
        body = json.loads(await request.text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise RegistryError(422, 422, "Unrecognized request body: not JSON") from exc
    if not isinstance(body, dict) or not isinstance(body.get("schema"), str):
        raise RegistryError(422, 42201, 'Invalid schema: the body needs a "schema" string')
    schema_type = body.get("schemaType") or "AVRO"
    if schema_type != "AVRO":
        raise RegistryError(422, 42201, f"Invalid schema: schemaType {schema_type} unsupported")
    if body.get("references"):
        raise RegistryError(422, 42201, "Invalid schema: references are not supported")
    return str(body["schema"])


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RegistryError as err:
        return _error(err)
    except web.HTTPNotFound:
        return _error(RegistryError(404, 404, "HTTP 404 Not Found"))
    except web.HTTPMethodNotAllowed:
        return _error(RegistryError(405, 405, "HTTP 405 Method Not Allowed"))
    except Exception:
        log.exception("registry request %s %s failed", request.method, request.path)
        return _error(RegistryError(500, 50001, "Error in the backend data store"))


def build_registry_app(store: RegistryStore, executor: BlockingExecutor) -> web.Application:
    """The aiohttp application (the caller runs it and closes store/executor)."""
    app = web.Application(middlewares=[_errors])
    app[_STORE_KEY] = store
    app[_EXECUTOR_KEY] = executor
    run = executor.run

    async def root(request: web.Request) -> web.Response:
        return _json({})

    async def subjects(request: web.Request) -> web.Response:
        return _json(await run(store.subjects, _flag(request, "deleted")))

    async def versions(request: web.Request) -> web.Response:
        subject = request.match_info["subject"]
        return _json(await run(store.versions, subject, _flag(request, "deleted")))

    async def register(request: web.Request) -> web.Response:
        subject = request.match_info["subject"]
        text = await _schema_body(request)
        normalized, fingerprint = normalize_schema(text)
        registered = await run(
            store.register, subject, normalized, fingerprint, _compat_check(normalized)
        )
        log.info(
            "schema registered",
            extra={"subject": subject, "version": registered.version, "id": registered.schema_id},
        )
        return _json({"id": registered.schema_id})

    async def get_version(request: web.Request) -> web.Response:
        subject = request.match_info["subject"]
        version = _version(request.match_info["version"])
        v = await run(store.version, subject, version, _flag(request, "deleted"))
        return _json(
            {"subject": v.subject, "version": v.version, "id": v.schema_id, "schema": v.schema_text}
        )

    async def get_version_schema(request: web.Request) -> web.Response:
        subject = request.match_info["subject"]
        version = _version(request.match_info["version"])
        v = await run(store.version, subject, version, False)
        return web.Response(text=v.schema_text, content_type=CONTENT_TYPE)

    async def delete_version(request: web.Request) -> web.Response:
        subject = request.match_info["subject"]
        version = _version(request.match_info["version"])
        return _json(await run(store.delete_version, subject, version, _flag(request, "permanent")))

    async def lookup(request: web.Request) -> web.Response:
        subject = request.match_info["subject"]
        text = await _schema_body(request)
        _, fingerprint = normalize_schema(text)
        v = await run(store.lookup, subject, fingerprint, _flag(request, "deleted"))
        return _json(
            {"subject": v.subject, "version": v.version, "id": v.schema_id, "schema": v.schema_text}
        )

    async def delete_subject(request: web.Request) -> web.Response:
        subject = request.match_info["subject"]
        return _json(await run(store.delete_subject, subject, _flag(request, "permanent")))

    async def schema_by_id(request: web.Request) -> web.Response:
        text, _ = await run(store.schema_by_id, _schema_id(request.match_info["id"]))
        return _json({"schema": text})

    async def raw_schema_by_id(request: web.Request) -> web.Response:
        text, _ = await run(store.schema_by_id, _schema_id(request.match_info["id"]))
        return web.Response(text=text, content_type=CONTENT_TYPE)

    async def subjects_of_id(request: web.Request) -> web.Response:
        pairs = await run(store.subject_versions_of_schema, _schema_id(request.match_info["id"]))
        return _json(sorted({s for s, _ in pairs}))

    async def versions_of_id(request: web.Request) -> web.Response:
        pairs = await run(store.subject_versions_of_schema, _schema_id(request.match_info["id"]))
        return _json([{"subject": s, "version": v} for s, v in pairs])

    async def schema_types(request: web.Request) -> web.Response:
        return _json(["AVRO"])

    async def _level_body(request: web.Request) -> str:
        try:
            body = json.loads(await request.text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise RegistryError(422, 422, "Unrecognized request body: not JSON") from exc
        level = body.get("compatibility") if isinstance(body, dict) else None
        if not isinstance(level, str) or level.upper() not in LEVELS:
            raise RegistryError(
                422, 42203, "Invalid compatibility level. Valid values are " + ", ".join(LEVELS)
            )
        return level.upper()

    async def get_config(request: web.Request) -> web.Response:
        level = await run(store.compatibility, None)
        return _json({"compatibilityLevel": level})

    async def put_config(request: web.Request) -> web.Response:
        level = await _level_body(request)
        await run(store.set_compatibility, None, level)
        return _json({"compatibility": level})

    async def get_subject_config(request: web.Request) -> web.Response:
        subject = request.match_info["subject"]
        level = await run(store.compatibility, subject, _flag(request, "defaultToGlobal"))
        return _json({"compatibilityLevel": level})

    async def put_subject_config(request: web.Request) -> web.Response:
        level = await _level_body(request)
        await run(store.set_compatibility, request.match_info["subject"], level)
        return _json({"compatibility": level})

    async def delete_subject_config(request: web.Request) -> web.Response:
        level = await run(store.delete_compatibility, request.match_info["subject"])
        return _json({"compatibilityLevel": level})

    async def _compat(request: web.Request, version: int | None, all_versions: bool) -> Any:
        subject = request.match_info["subject"]
        text = await _schema_body(request)
        normalized, _ = normalize_schema(text)
        check = _compat_check(normalized)
        level = await run(store.compatibility, subject, True)
        if all_versions:
            numbers = await run(store.versions, subject, False)
            previous = [(await run(store.version, subject, n, False)).schema_text for n in numbers]
            level_used = level
        else:
            previous = [(await run(store.version, subject, version, False)).schema_text]
            level_used = level.removesuffix("_TRANSITIVE")
        ok, messages = check(previous, level_used)
        body: dict[str, Any] = {"is_compatible": ok}
        if _flag(request, "verbose"):
            body["messages"] = messages
        return _json(body)

    async def compat_version(request: web.Request) -> web.Response:
        version = _version(request.match_info["version"])
        return await _compat(request, version, all_versions=False)  # type: ignore[no-any-return]

    async def compat_all(request: web.Request) -> web.Response:
        return await _compat(request, None, all_versions=True)  # type: ignore[no-any-return]

    async def mode(request: web.Request) -> web.Response:
        return _json({"mode": "READWRITE"})

    r = app.router
    r.add_get("/", root)
    r.add_get("/subjects", subjects)
    r.add_get("/subjects/{subject}/versions", versions)
    r.add_post("/subjects/{subject}/versions", register)
    r.add_get("/subjects/{subject}/versions/{version}", get_version)
    r.add_get("/subjects/{subject}/versions/{version}/schema", get_version_schema)
    r.add_delete("/subjects/{subject}/versions/{version}", delete_version)
    r.add_post("/subjects/{subject}", lookup)
    r.add_delete("/subjects/{subject}", delete_subject)
    r.add_get("/schemas/ids/{id}", schema_by_id)
    r.add_get("/schemas/ids/{id}/schema", raw_schema_by_id)
    r.add_get("/schemas/ids/{id}/subjects", subjects_of_id)
    r.add_get("/schemas/ids/{id}/versions", versions_of_id)
    r.add_get("/schemas/types", schema_types)
    r.add_get("/config", get_config)
    r.add_put("/config", put_config)
    r.add_get("/config/{subject}", get_subject_config)
    r.add_put("/config/{subject}", put_subject_config)
    r.add_delete("/config/{subject}", delete_subject_config)
    r.add_post("/compatibility/subjects/{subject}/versions/{version}", compat_version)
    r.add_post("/compatibility/subjects/{subject}/versions", compat_all)
    r.add_get("/mode", mode)
    return app


class RegistryServer:
    """The registry app served on ``host:port`` (``port`` 0 picks one; ``.port`` after
    ``start()``)."""

    def __init__(
        self, store: RegistryStore, executor: BlockingExecutor, host: str, port: int
    ) -> None:
        self.store = store
        self.executor = executor
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        runner = web.AppRunner(build_registry_app(self.store, self.executor), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        self._runner = runner
        server = site._server  # aiohttp exposes the bound sockets only here
        if server is not None and self.port == 0:
            sockets = getattr(server, "sockets", None) or []
            self.port = int(sockets[0].getsockname()[1])
        log.info("schema registry listening on %s", self.url)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
