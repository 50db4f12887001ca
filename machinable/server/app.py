"""Build the catalog server's ASGI app, and run it under uvicorn.

The server is a front door over the index and the record directories: it reads rows
and files, computes nothing, writes no run data, imports no project code and keeps no
state between requests, so several workers can serve one PostgreSQL catalog.
"""

from __future__ import annotations

import os
from importlib.metadata import version
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from machinable.errors import MachinableError, QueryError
from machinable.server.auth import Gate
from machinable.server.config import InvalidName, ServerConfig, make_config
from machinable.server.views import api, page

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def _one_line(text: str) -> str:
    return " ".join(text.split())


def create_app(config: ServerConfig) -> Any:
    """The ASGI app serving ``config``'s projects: the JSON API, the page, the login form."""
    # No /docs or /redoc: FastAPI's pages load their scripts from a CDN, and the
    # server's pages work offline. The schema itself is at /openapi.json.
    app = FastAPI(title="machinable catalog", version=version("machinable"), docs_url=None, redoc_url=None)
    app.include_router(api.router(config))
    app.include_router(page.router(config))
    app.mount("/static", StaticFiles(directory=page.STATIC), name="static")

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"detail": _one_line(str(exc.detail))}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error.get("loc", ())[1:]) or "request"
            parts.append(f"{where}: {error.get('msg')}")
        return JSONResponse({"detail": _one_line("; ".join(parts))}, status_code=400)

    @app.exception_handler(QueryError)
    async def bad_query(_: Request, exc: QueryError) -> JSONResponse:
        return JSONResponse({"detail": _one_line(str(exc))}, status_code=400)

    @app.exception_handler(InvalidName)
    async def bad_name(_: Request, exc: InvalidName) -> JSONResponse:
        return JSONResponse({"detail": _one_line(str(exc))}, status_code=400)

    @app.exception_handler(MachinableError)
    async def unavailable(_: Request, exc: MachinableError) -> JSONResponse:
        return JSONResponse({"detail": _one_line(str(exc))}, status_code=503)

    return Gate(app, config)


def serve(
    projects: list[str | os.PathLike[str]] = (),  # type: ignore[assignment]
    roots: list[str | os.PathLike[str]] = (),  # type: ignore[assignment]
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    token_file: str | os.PathLike[str] | None = None,
    ready: Any = None,
) -> None:
    """Serve the catalogs of ``projects`` and of the projects in ``roots`` until stopped."""
    import uvicorn

    config = make_config(list(projects), list(roots), host=host, token_file=token_file)
    app = create_app(config)
    if ready is not None:
        ready(config)
    # No access log: request lines are not needed to run a catalog, and a reverse proxy
    # logs them where a lab wants them.
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, server_header=False)
