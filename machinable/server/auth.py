"""The server's gate: bearer tokens on every ``/api/`` request, and project names checked raw.

A request carries its token as ``Authorization: Bearer <token>`` (analysis code, curl) or
as the ``machinable_token`` cookie that ``POST /login`` sets (a browser). Tokens are
compared as SHA-256 digests with ``hmac.compare_digest``, against every configured token,
so the time taken says nothing about how much of a token matched. Tokens are never
logged or echoed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any
from urllib.parse import unquote

from machinable.server.config import InvalidName, ServerConfig, Token, check_name

COOKIE = "machinable_token"
PROJECTS_KEY = "machinable.projects"
_PREFIX = [b"", b"api", b"v1", b"projects"]


def _digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


class Tokens:
    """The configured tokens, kept as digests."""

    def __init__(self, tokens: list[Token]):
        self._entries = [(_digest(token.secret), token.projects) for token in tokens]

    def match(self, candidate: str | None) -> tuple[bool, frozenset[str] | None]:
        """(authenticated, the projects the token reaches or None for all)."""
        if not candidate:
            return False, None
        given = _digest(candidate.encode("utf-8", "surrogateescape"))
        found = False
        projects: frozenset[str] | None = None
        for digest, allowed in self._entries:
            if hmac.compare_digest(given, digest) and not found:
                found, projects = True, allowed
        return found, projects


def request_token(scope: dict[str, Any]) -> str | None:
    """The bearer token of a request, else its token cookie."""
    cookie_value = None
    for key, value in scope.get("headers", ()):
        if key == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                return credentials.strip()
        elif key == b"cookie":
            for item in value.decode("latin-1").split(";"):
                name, _, content = item.strip().partition("=")
                if name == COOKIE and content:
                    cookie_value = unquote(content)
    return cookie_value


async def _reply(send: Any, status: int, detail: str, extra: list[tuple[bytes, bytes]] = ()) -> None:  # type: ignore[assignment]
    body = json.dumps({"detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


def host_name(scope: dict[str, Any]) -> str:
    """The host part of the request's Host header, lower-case, without port or brackets."""
    for key, value in scope.get("headers", ()):
        if key == b"host":
            text = value.decode("latin-1").strip().lower()
            if text.startswith("["):
                return text[1:].partition("]")[0]
            return text.rpartition(":")[0] if text.count(":") == 1 else text
    return ""


class Gate:
    """ASGI middleware: authenticate ``/api/`` requests, refuse unsafe project names.

    Without tokens the server listens on loopback only, and answers only requests whose
    Host header names the loopback: a web page elsewhere cannot use DNS rebinding to make
    a browser read the catalog.
    """

    def __init__(self, app: Any, config: ServerConfig):
        self.app = app
        self.tokens = Tokens(config.tokens) if config.tokens is not None else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.tokens is None and host_name(scope) not in LOOPBACK_NAMES:
            await _reply(send, 400, "this catalog answers only requests to 127.0.0.1 or localhost (no token file)")
            return
        if not scope["path"].startswith("/api/"):
            await self.app(scope, receive, send)
            return
        if self.tokens is not None:
            ok, projects = self.tokens.match(request_token(scope))
            if not ok:
                await _reply(
                    send, 401, "a valid token is needed: send 'Authorization: Bearer <token>'",
                    [(b"www-authenticate", b"Bearer")],
                )
                return
            scope[PROJECTS_KEY] = projects
        raw = scope.get("raw_path") or scope["path"].encode("utf-8")
        segments = raw.split(b"?", 1)[0].split(b"/")
        if len(segments) > 4 and segments[:4] == _PREFIX:
            # The raw segment, decoded once: %2F, %5C and %2E%2E are seen for what they are.
            name = unquote(segments[4].decode("latin-1"), encoding="utf-8", errors="replace")
            try:
                check_name(name)
            except InvalidName as exc:
                await _reply(send, 400, str(exc))
                return
        await self.app(scope, receive, send)
