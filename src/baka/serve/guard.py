"""Two rules every request passes before any route runs, as one ASGI middleware:

- **auth**: with a token or A1111-style ``--api-auth user:pass`` credentials configured, every path
  (the API, the UI page, ``/docs``, ``/redoc`` and ``/openapi.json``) needs ``Authorization: Bearer
  TOKEN`` or HTTP Basic with one of the credentials (what ``webuiapi.set_auth``, SillyTavern and Open
  WebUI send); a browser opening a page may instead give ``?token=TOKEN`` (the UI page then sends the
  header on its own calls). Every comparison is constant-time, and all credentials are compared.
- **body limit**: a request body over ``max_body`` bytes is refused with 413, counted as it arrives
  (a lying or missing Content-Length does not get past it).
"""

from __future__ import annotations

import base64
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

    def __init__(self, app, token: str | None, max_body: int, basic: tuple[str, ...] = ()):
        self.app = app
        self.token = token
        self.max_body = max_body
        # "user:pass" pairs, as the Authorization header carries them
        self.accepted = [f"Bearer {token}".encode()] if token else []
        self.accepted += [b"Basic " + base64.b64encode(c.encode()) for c in basic]

    def _authorised(self, scope: Scope) -> bool:
        if not self.accepted:
            return True
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        ok = False
        for want in self.accepted:  # no early exit: the time does not tell which one matched
            ok |= hmac.compare_digest(given, want)
        if not ok and self.token and scope.get("method") == "GET":
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            ok = hmac.compare_digest(query.get("token", [""])[0].encode(), self.token.encode())
        return ok

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self._authorised(scope):
            start, body = _json(401, "missing or wrong credentials (bearer token or HTTP Basic)")
            if any(a.startswith(b"Basic ") for a in self.accepted):
                start["headers"].append((b"www-authenticate", b'Basic realm="baka"'))
            await send(start)
            await send(body)
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
