"""Two rules every request passes before any route runs, as one ASGI middleware:

- **auth**: with a token configured, every path (the API, the UI page, ``/docs``, ``/redoc`` and
  ``/openapi.json``) needs ``Authorization: Bearer TOKEN``; a browser opening a page may instead give
  ``?token=TOKEN`` (the UI page then sends the header on its own calls). Compared in constant time.
- **body limit**: a request body over ``max_body`` bytes is refused with 413, counted as it arrives
  (a lying or missing Content-Length does not get past it).
"""

from __future__ import annotations

import hmac
import json
from urllib.parse import parse_qs

from starlette.exceptions import HTTPException

Scope = dict


def _json(status: int, detail: str) -> tuple[dict, dict]:
    body = json.dumps({"detail": detail}).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    }
    return start, {"type": "http.response.body", "body": body}


class Guard:
    """ASGI middleware enforcing the auth and body-size rules of :mod:`baka.serve.guard`."""

    def __init__(self, app, token: str | None, max_body: int):
        self.app = app
        self.token = token
        self.max_body = max_body

    def _authorised(self, scope: Scope) -> bool:
        if not self.token:
            return True
        want = f"Bearer {self.token}".encode()
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        if hmac.compare_digest(given, want):
            return True
        if scope.get("method") == "GET":
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            q = query.get("token", [""])[0].encode()
            return hmac.compare_digest(q, self.token.encode())
        return False

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self._authorised(scope):
            for msg in _json(401, "missing or wrong bearer token"):
                await send(msg)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            for msg in _json(413, f"request body over {self.max_body} bytes"):
                await send(msg)
            return
        seen = 0

        async def counted_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_body:
                    # raised while the app reads the body: its HTTP error handling answers 413
                    raise HTTPException(413, f"request body over {self.max_body} bytes")
            return msg

        await self.app(scope, counted_receive, send)


__all__ = ["Guard"]
