"""The catalog browser: one static page at ``/`` and the login form for browsers.

The page holds no data; its script reads the JSON API, so the page and the API share
one source of truth, and every view's state sits in the page's URL.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from machinable.server.auth import COOKIE, Tokens
from machinable.server.config import ServerConfig

STATIC = Path(__file__).resolve().parent.parent / "static"
MAX_FORM = 4096
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}

LOGIN = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>machinable: sign in</title>
<link rel="stylesheet" href="/static/machinable.css"></head>
<body><main class="login"><h1>machinable</h1>
<form method="post" action="/login">
<p>{message}</p>
<input type="hidden" name="next" value="{next}">
<label>Token <input type="password" name="token" autocomplete="current-password" autofocus></label>
<button type="submit">Sign in</button>
</form></main></body></html>
"""


def _safe_next(value: str | None) -> str:
    """Only a path on this server (never ``//host`` or a URL) may follow a login."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


def router(config: ServerConfig) -> APIRouter:
    page = APIRouter(include_in_schema=False)
    tokens = Tokens(config.tokens) if config.tokens is not None else None

    @page.get("/")
    def index() -> Any:
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=PAGE_HEADERS)

    def login_page(message: str, next_path: str, status: int = 200) -> HTMLResponse:
        body = LOGIN.format(message=html.escape(message), next=html.escape(_safe_next(next_path)))
        return HTMLResponse(body, status_code=status, headers=PAGE_HEADERS)

    @page.get("/login")
    def login_form(next: str = "/") -> Any:
        if tokens is None:
            return RedirectResponse(_safe_next(next), status_code=303)
        return login_page("This catalog needs a token.", next)

    @page.post("/login")
    async def login(request: Request) -> Any:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM:
                return login_page("The form is too large.", "/", 400)
        form = parse_qs(body.decode("utf-8", "replace"))
        token = (form.get("token") or [""])[0].strip()
        next_path = _safe_next((form.get("next") or ["/"])[0])
        if tokens is None:
            return RedirectResponse(next_path, status_code=303)
        ok, _ = tokens.match(token)
        if not ok:
            return login_page("That token is not valid here.", next_path, 401)
        response = RedirectResponse(next_path, status_code=303)
        response.set_cookie(
            COOKIE, quote(token, safe=""), httponly=True, samesite="strict", secure=request.url.scheme == "https"
        )
        return response

    @page.post("/logout")
    def logout() -> Any:
        response: Response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    return page
