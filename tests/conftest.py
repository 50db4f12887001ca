"""Shared fixtures: a fresh project directory with real SQLite files in tmp_path."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

from machinable.catalog.engine import dispose_all

# The S3 server (SeaweedFS) and the HTTP server fixtures, registered once so that every
# test module shares one session-scoped S3 server.
pytest_plugins = ["s3server", "httpserver"]

REPO = Path(__file__).resolve().parent.parent

OPTIMIZE = '''
from pydantic import BaseModel
from machinable import Interface


class Optimize(Interface):
    class Config(BaseModel):
        lr: float = 0.1
        steps: int = 100

    def __call__(self):
        calls = self.project.path / "calls.txt"
        with open(calls, "a") as handle:
            handle.write(self.uuid + "\\n")
        self.save_file("result.json", {"loss": 1 / (1 + self.config.lr * self.config.steps)})

    def loss(self):
        return self.load_file("result.json")["loss"]
'''


def write_module(project: Path, name: str, source: str) -> Path:
    path = project.joinpath(*name.split(".")).with_suffix(".py")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


def calls(project: Path) -> list[str]:
    path = project / "calls.txt"
    return path.read_text().split() if path.exists() else []


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory):
    """Each test starts with no machinable environment variables and fresh engines
    (and a pickle signing key of its own, never the user's)."""
    for name in ("MACHINABLE_INDEX", "MACHINABLE_STORAGE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MACHINABLE_KEY_FILE", str(tmp_path_factory.mktemp("home") / "machinable.key"))
    yield
    dispose_all()


def _make_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "study"
    root.mkdir()
    write_module(root, "optimize", OPTIMIZE)
    monkeypatch.chdir(root)
    return root


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, index_backend: str) -> Path:
    """A project folder named ``study`` holding optimize.py, used as the cwd.

    Every test that uses it runs twice: with the project's default SQLite index and
    with a fresh PostgreSQL schema (MACHINABLE_INDEX set; subprocesses inherit it).
    """
    return _make_project(tmp_path, monkeypatch)


@pytest.fixture
def sqlite_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The same project, for tests about the SQLite index file itself."""
    return _make_project(tmp_path, monkeypatch)


def run_python(code: str, cwd: Path, env: dict[str, str] | None = None, check: bool = True):
    """Run ``code`` in a fresh interpreter (a real separate process)."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"subprocess failed:\n{result.stdout}\n{result.stderr}")
    return result


POSTGRES_URL = os.environ.get("MACHINABLE_TEST_POSTGRES", "postgresql+psycopg://root@127.0.0.1:5432/test")


@pytest.fixture(params=["sqlite", "postgresql"])
def index_backend(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run a test against the default SQLite index and against a fresh PostgreSQL schema.

    For PostgreSQL it sets MACHINABLE_INDEX (subprocesses inherit it) and drops the
    schema afterwards. Yields the backend name.
    """
    if request.param == "sqlite":
        yield "sqlite"  # the project's default index file, <project>/.machinable.sqlite
        return
    import uuid as uuidlib

    from sqlalchemy import create_engine, text

    schema = f"mt_{uuidlib.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:  # a missing server must fail loudly, never skip
        pytest.fail(f"PostgreSQL at {POSTGRES_URL} is needed for the postgresql backend: {exc}")
    monkeypatch.setenv("MACHINABLE_INDEX", f"{POSTGRES_URL}?options=-csearch_path%3D{schema}")
    try:
        yield "postgresql"
    finally:
        dispose_all()
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


# --------------------------------------------------------------------------- index helpers
#
# Tests that "delete the index", look at its rows or check that nothing created it use
# these, so that they run unchanged against the SQLite file and a PostgreSQL schema.


def index_url(project: Path | None = None) -> str:
    """The URL of the index a test's project uses: MACHINABLE_INDEX, else the project file."""
    from machinable.catalog.engine import to_url

    setting = os.environ.get("MACHINABLE_INDEX")
    if setting:
        return to_url(setting)
    root = project if project is not None else Path.cwd()
    return to_url(root / ".machinable.sqlite")


def postgres_schema(url: str) -> str | None:
    """The schema a PostgreSQL index URL selects with ``options=-csearch_path=...``, else None."""
    import re

    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return None
    options = parsed.query.get("options") or ""
    if isinstance(options, tuple):
        options = " ".join(options)
    match = re.search(r"search_path\s*=\s*\"?([A-Za-z_][A-Za-z0-9_]*)", options)
    if match is None:
        raise AssertionError(f"the test index URL {url!r} names no schema; refusing to wipe 'public'")
    return match.group(1)


def _admin_engine():  # type: ignore[no-untyped-def]
    from sqlalchemy import create_engine

    return create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")


def wipe_index(project: Path | None = None) -> None:
    """Delete the index wherever it is, as a user would (rm the file, drop the schema).

    SQLite: the file and its ``-wal``/``-shm`` companions. PostgreSQL: the schema named
    in MACHINABLE_INDEX is dropped and recreated empty (no tables, no alembic_version).
    Every pooled connection of this process is closed first.
    """
    from sqlalchemy import text

    from machinable.catalog.engine import sqlite_path

    dispose_all()
    url = index_url(project)
    schema = postgres_schema(url)
    if schema is not None:
        admin = _admin_engine()
        try:
            with admin.connect() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
                conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        finally:
            admin.dispose()
        assert not index_exists(project)
        return
    path = sqlite_path(url)
    assert path is not None, f"cannot wipe the index at {url}"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    assert not path.exists()


def index_exists(project: Path | None = None) -> bool:
    """Whether the project's index has been created: the SQLite file exists, or the
    PostgreSQL schema holds any table. Never creates or migrates anything."""
    from sqlalchemy import create_engine, inspect

    from machinable.catalog.engine import sqlite_path

    url = index_url(project)
    schema = postgres_schema(url)
    if schema is not None:
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                return bool(inspect(conn).get_table_names(schema=schema))
        finally:
            engine.dispose()
    path = sqlite_path(url)
    assert path is not None, f"cannot locate the index at {url}"
    return path.exists()


def table_rows(table: str, index=None) -> list[tuple]:  # type: ignore[no-untyped-def]
    """Every row of ``table`` in ``index`` (default: ``Index.get()``), sorted, read through
    the index's own engine so it works on SQLite and PostgreSQL alike."""
    from sqlalchemy import text

    from machinable import Index

    index = index if index is not None else Index.get()
    with index.engine.connect() as conn:
        rows = conn.execute(text(f"SELECT * FROM {table}")).all()
    return sorted((tuple(row) for row in rows), key=repr)


def index_backend_name(project: Path | None = None) -> str:
    """'sqlite' or 'postgresql': the backend of the project's index."""
    from sqlalchemy.engine import make_url

    return make_url(index_url(project)).get_backend_name()


@pytest.fixture
def fresh_index(index_backend: str, tmp_path: Path):
    """A factory of further, empty indexes on the test's backend: ``fresh_index("other")``
    is a SQLite file in tmp_path, or an Index on a new PostgreSQL schema (dropped afterwards)."""
    import uuid as uuidlib

    from sqlalchemy import text

    from machinable import Index

    schemas: list[str] = []

    def make(name: str = "other") -> Index:
        if index_backend == "sqlite":
            return Index(tmp_path / f"{name}.sqlite")
        schema = f"mt_{uuidlib.uuid4().hex[:12]}"
        admin = _admin_engine()
        try:
            with admin.connect() as conn:
                conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        finally:
            admin.dispose()
        schemas.append(schema)
        return Index(f"{POSTGRES_URL}?options=-csearch_path%3D{schema}")

    yield make
    if schemas:
        dispose_all()
        drop_schemas(schemas)


def drop_schemas(schemas: list[str]) -> None:
    """Drop these PostgreSQL schemas (test indexes) and everything in them."""
    from sqlalchemy import text

    admin = _admin_engine()
    try:
        with admin.connect() as conn:
            for schema in schemas:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    finally:
        admin.dispose()


def invoke(*args: str, env: dict[str, str] | None = None, ok: bool = True):
    """Run the CLI in-process (click's CliRunner); with ``ok`` assert it succeeded."""
    from click.testing import CliRunner

    from machinable.cli import cli

    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False, prog_name="machinable")
    if ok:
        assert result.exit_code == 0, (result.stdout, result.stderr)
    return result


def one_line_error(result, *needles: str) -> str:
    """Assert the CLI failed with exactly one 'Error: ...' line naming every needle."""
    assert result.exit_code != 0
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def kill_when(process, ready, what: str, timeout: float = 40.0) -> None:
    """SIGKILL a child process as soon as ready() says its work is under way."""
    import signal
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the {what} ended before it could be interrupted: {out!r} {err[-3000:]!r}")
        if ready():
            os.kill(process.pid, signal.SIGKILL)
            process.communicate(timeout=10)
            assert process.returncode == -signal.SIGKILL
            return
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=10)
    pytest.fail(f"the {what} never got under way within {timeout} s")
