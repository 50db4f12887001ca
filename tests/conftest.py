"""Shared fixtures: a fresh project directory with real SQLite files in tmp_path."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

from machinable.catalog.engine import dispose_all

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
def _isolated_env(monkeypatch: pytest.MonkeyPatch):
    """Each test starts with no machinable environment variables and fresh engines."""
    for name in ("MACHINABLE_INDEX", "MACHINABLE_STORAGE"):
        monkeypatch.delenv(name, raising=False)
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
