"""Remote catalogs: an ``Index`` that reads a catalog server over HTTP, read-only.

    MACHINABLE_INDEX=http://lab:8000/api/v1/projects/my-study python analysis.py
    with Index("http://lab:8000/api/v1/projects/my-study"): ...

Lookups and searches become requests to the server's JSON API (``machinable serve``);
run files are downloaded on first read into a local cache (``MACHINABLE_CACHE``) and
read from there afterwards. The token, if the server wants one, comes from
``MACHINABLE_TOKEN``. Everything the server answers is data: sizes are capped, answers
are checked before use, and nothing from it is executed or unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote, urlsplit

import requests

from machinable.catalog.index import Index
from machinable.catalog.query import And, Compare, Expr, Not, Or, as_expr, check_field
from machinable.catalog.rows import RunRecord
from machinable.errors import QueryError, ReadOnlyCatalog, RemoteCatalogError
from machinable.identity import predicate_key
from machinable.record import decode_file, safe_path
from machinable.settings import cache_setting, remote_timeout, token_setting

API_PATH = "/api/v1/projects/"
PAGE = 1000
MAX_JSON = 64 << 20
MAX_FILE = 1 << 30
CHUNK = 1 << 20


def where_text(expr: Expr) -> str:
    """The string form of a search expression, as the server's ``where`` parameter."""
    if isinstance(expr, And):
        return " and ".join(f"({where_text(item)})" for item in expr.items)
    if isinstance(expr, Or):
        return " or ".join(f"({where_text(item)})" for item in expr.items)
    if isinstance(expr, Not):
        return f"not ({where_text(expr.item)})"
    if isinstance(expr, Compare):
        check_field(expr.field)
        if expr.op == "in":
            if not expr.value:
                return "uuid in ('')"  # matches nothing, as an empty isin() does
            return f"{expr.field} in ({', '.join(literal(v, expr.field) for v in expr.value)})"
        if expr.op == "contains":
            return f"{expr.field} contains {literal(expr.value, expr.field)}"
        return f"{expr.field} {expr.op} {literal(expr.value, expr.field)}"
    raise QueryError(f"not a search expression: {expr!r}")


def literal(value: Any, field: str) -> str:
    """A value in the string form: numbers, quoted strings, true/false, null."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise QueryError(f"{field}: NaN and infinities cannot be searched for")
        return repr(value)
    if isinstance(value, datetime):
        value = value.isoformat()
    if isinstance(value, str):
        # JSON escapes, then the parser's quoting: a plain " inside '...', and \' for '.
        inner = json.dumps(value)[1:-1].replace('\\"', '"').replace("'", "\\'")
        return f"'{inner}'"
    raise QueryError(
        f"{field}: {type(value).__name__} values cannot be searched for in a remote catalog; "
        "compare one leaf at a time (config.a.b = 1)"
    )


class RemoteIndex(Index):
    """A catalog served by ``machinable serve``, read through its JSON API."""

    read_only = True

    def __init__(self, spec: str | os.PathLike[str] | None = None):
        url = os.fspath(spec or "").rstrip("/")
        parts = urlsplit(url)
        head, marker, name = parts.path.rpartition(API_PATH)
        if parts.scheme not in ("http", "https") or not parts.netloc or not marker or not name or "/" in name:
            raise RemoteCatalogError(
                f"{url!r} is not a catalog URL; write http://HOST:PORT/api/v1/projects/NAME", url=url
            )
        if parts.query or parts.fragment:
            raise RemoteCatalogError(f"{url!r}: a catalog URL takes no query or fragment", url=url)
        self.url = url
        self.project = name
        self._session: requests.Session | None = None

    def __repr__(self) -> str:
        return f"Index({self.url!r})"

    @property
    def resolved_url(self) -> str:
        return self.url

    @property
    def engine(self) -> NoReturn:
        raise RemoteCatalogError(
            f"{self.url} is a remote catalog: it has no database to open here", url=self.url
        )

    @property
    def path(self) -> None:
        return None

    @property
    def dialect(self) -> str:
        return "remote"

    # HTTP.

    def _http(self) -> requests.Session:
        if self._session is None:
            session = requests.Session()
            session.headers["Accept"] = "application/json"
            token = token_setting()
            if token:
                session.headers["Authorization"] = f"Bearer {token}"
            self._session = session
        return self._session

    def _get(self, path: str, params: dict[str, Any] | None = None, *, missing_ok: bool = False) -> requests.Response | None:
        url = self.url + path
        timeout = remote_timeout()
        try:
            response = self._http().get(url, params=params, timeout=(min(timeout, 10.0), timeout), stream=True)
        except requests.RequestException as exc:
            raise RemoteCatalogError(f"cannot reach the catalog at {self.url}: {exc}", url=self.url) from exc
        if response.status_code < 300:
            return response
        detail = self._detail(response)
        response.close()
        status = response.status_code
        if status == 404 and missing_ok and "no project" not in detail:
            return None
        if status == 400:
            raise QueryError(f"the catalog at {self.url} refused the request: {detail}")
        if status == 401:
            raise RemoteCatalogError(
                f"the catalog at {self.url} needs a token: set MACHINABLE_TOKEN ({detail})", url=self.url, status=status
            )
        if status == 403:
            raise RemoteCatalogError(
                f"the token in MACHINABLE_TOKEN does not reach {self.url} ({detail})", url=self.url, status=status
            )
        raise RemoteCatalogError(f"the catalog at {self.url} answered {status}: {detail}", url=self.url, status=status)

    @staticmethod
    def _detail(response: requests.Response) -> str:
        try:
            text = response.raw.read(4096, decode_content=True) if response.raw else b""
            detail = json.loads(text).get("detail")
            return " ".join(str(detail).split())[:500]
        except (ValueError, AttributeError, OSError, requests.RequestException):
            return response.reason or "no detail"

    def _json(self, path: str, params: dict[str, Any] | None = None, *, missing_ok: bool = False) -> Any:
        response = self._get(path, params, missing_ok=missing_ok)
        if response is None:
            return None
        with response:
            body = bytearray()
            for chunk in response.iter_content(CHUNK):
                body += chunk
                if len(body) > MAX_JSON:
                    raise RemoteCatalogError(f"the catalog at {self.url} sent more than {MAX_JSON} bytes", url=self.url)
        try:
            return json.loads(body)
        except ValueError as exc:
            raise RemoteCatalogError(f"the catalog at {self.url} did not answer JSON: {exc}", url=self.url) from exc

    # Reads.

    def _record(self, run: Any) -> RunRecord:
        try:
            predicate = run["predicate"] or {}
            return RunRecord(
                uuid=str(run["uuid"]),
                project=self.project,
                module=str(run["module"]),
                # The server does not send the identity keys; they are only written by
                # launch(), which a read-only catalog refuses.
                config_key="",
                predicate_key=predicate_key(predicate),
                config=dict(run["config"]),
                canonical=dict(run["config"]),
                predicate=dict(predicate),
                version=run["version"],
                status=str(run["status"]),
                created_at=_time(run["created_at"]),  # type: ignore[arg-type]
                started_at=_time(run.get("started_at")),
                finished_at=_time(run.get("finished_at")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RemoteCatalogError(f"the catalog at {self.url} sent a malformed run: {exc}", url=self.url) from exc

    def _detail_of(self, uuid: str) -> Any:
        if not isinstance(uuid, str) or not uuid.isalnum() or len(uuid) > 64:
            return None
        return self._json(f"/runs/{uuid}", missing_ok=True)

    def find(self, uuid: str) -> RunRecord | None:
        found = self._detail_of(uuid)
        return self._record(found) if found is not None else None

    def status(self, uuid: str) -> str | None:
        found = self._detail_of(uuid)
        return str(found["status"]) if found is not None else None

    def local_directory(self, uuid: str) -> Path | None:
        return None

    def has_copy(self, uuid: str) -> bool:
        """Does the server hold the run's data (a present copy on its side)?"""
        found = self._detail_of(uuid)
        return found is not None and any(copy.get("state") == "present" for copy in found.get("copies") or [])

    def _where(self, where: Any, project: str | None, module: str | None, predicate: dict[str, Any] | None) -> str | None:
        parts: list[str] = []
        if isinstance(where, str) and where.strip():
            as_expr(where)  # refuse a malformed expression here, with the local message
            parts.append(f"({where})")
        elif where is not None and not isinstance(where, str):
            expr = as_expr(where)
            if expr is not None:
                parts.append(f"({where_text(expr)})")
        if project is not None:
            parts.append(f"project = {literal(project, 'project')}")
        if module is not None:
            parts.append(f"module = {literal(module, 'module')}")
        for key, value in (predicate or {}).items():
            parts.append(f"predicate.{key} = {literal(value, 'predicate.' + key)}")
        return " and ".join(parts) or None

    def _page(
        self, where: str | None, order_by: Any, limit: int, offset: int, after: str | None = None, count: bool = True
    ) -> tuple[list[RunRecord], int | None, str | None]:
        params: dict[str, Any] = {"limit": limit}
        if not count:  # the total costs the server a pass over every match
            params["count"] = "false"
        if after:
            params["after"] = after
        elif offset:
            params["offset"] = offset
        if where:
            params["where"] = where
        if order_by:
            params["order_by"] = order_by if isinstance(order_by, str) else ", ".join(order_by)
        answer = self._json("/runs", params)
        try:
            cursor = answer.get("next")
            if cursor is not None and not isinstance(cursor, str):
                raise TypeError("next is not a string")
            total = answer["count"]
            if count or total is not None:
                total = int(total)
            return [self._record(run) for run in answer["runs"]], total, cursor
        except (KeyError, TypeError, ValueError) as exc:
            raise RemoteCatalogError(f"the catalog at {self.url} sent a malformed page: {exc}", url=self.url) from exc

    def runs(self, where: Any = None, *, project: str | None = None, module: str | None = None, predicate: dict[str, Any] | None = None, page_size: int | None = None) -> Iterator[RunRecord]:
        yield from self.search(where, project=project, module=module, predicate=predicate)

    def search(
        self,
        where: Any = None,
        *,
        project: str | None = None,
        module: str | None = None,
        predicate: dict[str, Any] | None = None,
        order_by: str | list[str] | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[RunRecord]:
        if limit is not None and limit < 0 or offset < 0:
            raise QueryError("limit and offset must not be negative")
        text = self._where(where, project, module, predicate)
        found: list[RunRecord] = []
        cursor = None
        # The first page may skip ``offset`` runs; the next ones continue from the
        # server's cursor, which costs the same however deep the page is.
        while limit is None or len(found) < limit:
            size = PAGE if limit is None else min(PAGE, limit - len(found))
            page, _, cursor = self._page(text, order_by, size, offset, cursor, count=False)
            found.extend(page)
            if cursor is None or len(page) < size:
                break
        return found

    def count(self, where: Any = None, *, project: str | None = None, module: str | None = None, predicate: dict[str, Any] | None = None) -> int:
        return int(self._page(self._where(where, project, module, predicate), None, 0, 0)[1] or 0)

    # Files.

    def cache_directory(self, uuid: str) -> Path:
        """Where this catalog's files of run ``uuid`` are kept on this machine."""
        tag = hashlib.sha256(self.url.encode("utf-8")).hexdigest()[:16]
        return Path(cache_setting()) / "remote" / tag / uuid

    def fetch_file(self, uuid: str, name: str) -> Path | None:
        """A local copy of a run file (downloaded once), or None if the run has no such file."""
        directory = self.cache_directory(uuid)
        target = safe_path(directory, name)
        if target.is_file():
            return target
        found = self._detail_of(uuid)
        if found is None:
            raise RemoteCatalogError(f"the catalog at {self.url} has no run {uuid}", url=self.url)
        encoded = "/".join(quote(part, safe="") for part in name.split("/"))
        response = self._get(f"/runs/{uuid}/files/{encoded}", missing_ok=True)
        if response is None:
            return None
        with response:
            announced = response.headers.get("content-length")
            if announced is not None and announced.isdigit() and int(announced) > MAX_FILE:
                raise RemoteCatalogError(f"{name} of run {uuid} is larger than {MAX_FILE} bytes", url=self.url)
            body = bytearray()
            try:
                for chunk in response.iter_content(CHUNK):
                    body += chunk
                    if len(body) > MAX_FILE:
                        raise RemoteCatalogError(f"{name} of run {uuid} is larger than {MAX_FILE} bytes", url=self.url)
            except requests.RequestException as exc:
                raise RemoteCatalogError(f"reading {name} of run {uuid} from {self.url} failed: {exc}", url=self.url) from exc
            if announced is not None and announced.isdigit() and len(body) != int(announced):
                raise RemoteCatalogError(f"{name} of run {uuid} arrived incomplete from {self.url}", url=self.url)
        if found.get("status") != "finished":
            # A run still computing may rewrite its files: read it, but keep no copy.
            scratch = Path(tempfile.mkdtemp(prefix="machinable-remote-"))
            path = scratch / Path(name).name
            path.write_bytes(bytes(body))
            return path
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".part-")
        with os.fdopen(handle, "wb") as out:
            out.write(body)
        os.replace(temporary, target)
        return target

    def load_file(self, uuid: str, name: str, default: Any = None) -> Any:
        """A run file's content, decoded by its extension like ``Interface.load_file``."""
        if Path(name).suffix.lower() == ".p":
            raise RemoteCatalogError(
                f"{name} of run {uuid} is a pickle from another machine: it is not unpickled "
                "(reading it would run whatever code it holds)",
                url=self.url,
            )
        path = self.fetch_file(uuid, name)
        if path is None:
            return default
        return decode_file(path, path.read_bytes())

    # Writes are refused.

    def _read_only(self, *_: Any, **__: Any) -> NoReturn:
        raise ReadOnlyCatalog(f"{self.url} is a remote catalog, read-only: runs cannot be recorded through it", url=self.url)

    add_run = add_location = drop_location = add_rows = ingest_directory = check_writable = _read_only  # type: ignore[assignment]
    reindex = add_search_index = drop_search_index = _read_only  # type: ignore[assignment]


def _time(value: Any) -> datetime | None:
    return None if value is None else datetime.fromisoformat(str(value))


Index.register_scheme("http", RemoteIndex)
Index.register_scheme("https", RemoteIndex)

__all__ = ["RemoteIndex", "where_text"]
