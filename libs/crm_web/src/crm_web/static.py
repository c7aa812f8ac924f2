"""Serve the built console (``web/dist``) as an ASGI app: files by path, ``index.html``
for ``/`` and for unknown paths without a dot (client-side routes), ``/healthz`` for
readiness waits."""

from __future__ import annotations

import mimetypes
from pathlib import Path

from crm_web.gateway import Receive, Scope, Send

HASHED_ASSETS = "/assets/"  # Vite puts content-hashed files there: cache them for good


class StaticFiles:
    """GET/HEAD of files under ``root``; nothing outside it is ever served."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def resolve(self, path: str) -> Path | None:
        rel = path.lstrip("/") or "index.html"
        candidate = (self.root / rel).resolve()
        if not candidate.is_relative_to(self.root):
            return None
        if candidate.is_file():
            return candidate
        if "." not in rel.rsplit("/", 1)[-1]:  # a console route, e.g. /tasks/12
            index = self.root / "index.html"
            return index if index.is_file() else None
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if path == "/healthz":
            await _answer(send, 200, b"ok\n", "text/plain", method)
            return
        if method not in ("GET", "HEAD"):
            await _answer(send, 405, b"method not allowed\n", "text/plain", method)
            return
        file = self.resolve(path)
        if file is None:
            await _answer(send, 404, b"not found\n", "text/plain", method)
            return
        ctype = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        cache = "public, max-age=31536000, immutable" if HASHED_ASSETS in path else "no-cache"
        await _answer(send, 200, file.read_bytes(), ctype, method, cache)


async def _answer(
    send: Send, status: int, body: bytes, ctype: str, method: str, cache: str = "no-store"
) -> None:
    headers = [
        (b"content-type", ctype.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", cache.encode()),
        (b"x-content-type-options", b"nosniff"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})
