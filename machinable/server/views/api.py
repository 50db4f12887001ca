"""The JSON API under ``/api/v1``: projects, runs, one run, its files.

Every answer is JSON, errors included (``{"detail": "..."}``). Listings are paged in
the database; nothing loads every run.
"""

from __future__ import annotations

import mimetypes
import os
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from machinable.server import files, queries
from machinable.server.auth import PROJECTS_KEY
from machinable.server.config import ServedProject, ServerConfig

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
MAX_QUERY = 4096
MAX_FILES_LIMIT = 10_000
TEXT_TYPES = frozenset(
    {".txt", ".log", ".md", ".csv", ".tsv", ".yaml", ".yml", ".toml", ".ini", ".cfg", ".py", ".jsonl", ".out", ".err"}
)
IMAGE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".svg": "image/svg+xml",
}
# Run files are data from whoever computed the run: never let a browser run them as a
# page of this origin (where a script could read the API with the viewer's cookie).
FILE_HEADERS = {"Content-Security-Policy": "sandbox", "X-Content-Type-Options": "nosniff"}


def media_type(path: str) -> str:
    suffix = os.path.splitext(path)[1].lower()
    if suffix in IMAGE_TYPES:
        return IMAGE_TYPES[suffix]
    if suffix == ".json":
        return "application/json"
    if suffix in TEXT_TYPES or suffix == "" and os.path.basename(path) in ("error.txt", "started_at", "finished_at"):
        return "text/plain; charset=utf-8"
    guessed = mimetypes.guess_type(path)[0]
    if guessed and guessed.startswith("text/"):
        return "text/plain; charset=utf-8"
    return "application/octet-stream"


def _bounded(name: str, value: str | None) -> str | None:
    if value is not None and len(value) > MAX_QUERY:
        raise HTTPException(400, f"{name} is longer than {MAX_QUERY} characters")
    return value or None


def _page(limit: int, offset: int, most: int) -> None:
    if limit < 0 or offset < 0:
        raise HTTPException(400, "limit and offset must not be negative")
    if limit > most:
        raise HTTPException(400, f"limit is at most {most}")


def router(config: ServerConfig) -> APIRouter:
    api = APIRouter(prefix="/api/v1")

    def served(request: Request, name: str) -> ServedProject:
        allowed = request.scope.get(PROJECTS_KEY)
        if allowed is not None and name not in allowed:
            raise HTTPException(403, f"this token does not reach project {name!r}")
        project = config.project(name)
        if project is None:
            raise HTTPException(404, f"no project {name!r} is served here")
        return project

    @api.get("/projects")
    def projects(request: Request) -> Any:
        """Every served project this token reaches, with its number of runs."""
        allowed = request.scope.get(PROJECTS_KEY)
        found = []
        for name in config.names():
            if allowed is not None and name not in allowed:
                continue
            project = config.project(name)
            if project is not None:
                found.append({"name": name, "runs": queries.count_runs(project)})
        return JSONResponse({"projects": found})

    @api.get("/projects/{project}/runs")
    def runs(
        request: Request,
        project: str,
        where: str | None = None,
        order_by: str | None = None,
        limit: int = DEFAULT_LIMIT,
        offset: int = 0,
        after: str | None = None,
        count: bool = True,
    ) -> Any:
        """Runs matching ``where``, ordered by ``order_by`` (``machinable ls`` syntax), one page.

        ``next`` in the answer is a cursor: pass it as ``after`` (instead of an offset) to
        get the following page at the same cost however deep it is. ``count`` is the
        number of all matching runs; it costs time in proportion to that number, so a
        client that walks pages or shows the rows first asks with ``count=false`` (the
        answer's ``count`` is then null) and, if it wants the total, once with ``limit=0``.
        """
        served_project = served(request, project)
        _page(limit, offset, MAX_LIMIT)
        if after and offset:
            raise HTTPException(400, "give either offset or after, not both")
        page, total, cursor = queries.list_runs(
            served_project,
            _bounded("where", where),
            _bounded("order_by", order_by),
            limit,
            offset,
            _bounded("after", after),
            with_count=count,
        )
        return Response(queries.page_json(page, total, limit, offset, cursor), media_type="application/json")

    @api.get("/projects/{project}/runs/{uuid}")
    async def run(request: Request, project: str, uuid: str) -> Any:
        """One run: config, status, times, digest, and every copy the index knows."""
        # Two primary-key reads: answered on the event loop, which costs less than the
        # hand-off to a worker thread. Pages and files, which can take longer, use the pool.
        found = queries.get_run(served(request, project), uuid)
        if found is None:
            raise HTTPException(404, f"no run {uuid[:64]!r} in project {project!r}")
        return Response(found, media_type="application/json")

    def directory(request: Request, project: str, uuid: str) -> str:
        served_project = served(request, project)
        found = queries.run_directory(served_project, uuid)
        if found is None:
            if queries.get_run(served_project, uuid) is None:
                raise HTTPException(404, f"no run {uuid[:64]!r} in project {project!r}")
            raise HTTPException(404, f"the files of run {uuid} are not present on this server")
        return found

    @api.get("/projects/{project}/runs/{uuid}/files")
    def file_list(request: Request, project: str, uuid: str, limit: int = MAX_FILES_LIMIT, offset: int = 0) -> Any:
        """The run's files, paths relative to its directory, sorted."""
        _page(limit, offset, MAX_FILES_LIMIT)
        listed, total = files.list_files(directory(request, project, uuid), limit, offset)
        return JSONResponse({"files": listed, "count": total})

    @api.get("/projects/{project}/runs/{uuid}/files/{path:path}")
    def file(request: Request, project: str, uuid: str, path: str) -> Any:
        """A file's bytes; ``Range: bytes=...`` reads part of it."""
        base = directory(request, project, uuid)
        try:
            real = files.resolve_file(base, path)
        except files.Refused as exc:
            raise HTTPException(400, str(exc)) from exc
        except FileNotFoundError as exc:
            raise HTTPException(404, f"run {uuid} has no file {path[:200]!r}") from exc
        return FileResponse(real, media_type=media_type(real), headers=FILE_HEADERS)

    return api
