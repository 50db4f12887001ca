"""Crash safety under real SIGKILLs (issue 6, item 2).

Every case runs the code under test in a separate process that kills itself with
SIGKILL at a chosen point, then inspects what is left from other processes:

* the kill points are discovered, not listed by hand: a clean run of the same
  scenario traces every point it passes (each ``os.replace`` of an atomic write into
  the storage, before and after; each atomic write interrupted half way through its
  payload; entry and exit of the index writes; every SQL statement of a first-use
  migration, before and after), and then one case per traced point is run;
* the children are forked from a "zygote" interpreter that has imported machinable
  and its dependencies but opened nothing (no engine, no project, no lock), so a case
  costs milliseconds instead of an interpreter start; each child is a real process that
  dies by a real SIGKILL (its wait status is checked), and every inspection or
  relaunch happens in another such process, never in the one that crashed;
* no production code has test hooks: the child wraps ``os.replace``, ``os.fdopen``,
  ``Index`` methods, ``alembic.command.upgrade`` and SQLAlchemy's cursor events, or
  the user's ``__call__`` kills itself.

After each kill: no run is reported finished (by ``finished_at`` or by the index)
whose files are incomplete; every ``*.json`` in the storage parses and every marker
holds a whole timestamp; leftover ``.*.tmp`` files are ignored by reindex; the index
opens in a fresh process; relaunching recomputes exactly the runs that had not
finished; a run whose process died inside ``__call__`` is reported ``stale``.

The scenarios that concern the index run twice: with the project's SQLite file and
with a fresh schema of the real PostgreSQL server (its own per case, migrated to head,
named to every child of that project through MACHINABLE_INDEX), with the same checks.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from conftest import POSTGRES_URL, run_python, write_module

# One worker runs this whole module, in order, so the summary sees every scenario.
pytestmark = pytest.mark.xdist_group("crash")

KILLED = -signal.SIGKILL
RUNS = 3  # runs per launch batch
PARTS = 3  # part files per run
SUMMARY: dict[str, tuple[int, int]] = {}  # "scenario [backend]" -> (kill points tried, passed)
BACKENDS = ("sqlite", "postgresql")
# A project whose index is a PostgreSQL schema -> the environment that names it; every
# child run in that project gets it (see Zygotes.run).
INDEX_ENV: dict[Path, dict[str, str]] = {}
SCHEMAS: list[str] = []  # created by this module, dropped at its end

WORK = '''
import os
import signal

from pydantic import BaseModel
from machinable import Interface


class Work(Interface):
    class Config(BaseModel):
        n: int = 0
        size: int = 64

    def __call__(self):
        with open(self.project.path / "calls.txt", "a") as handle:
            handle.write(self.uuid + "\\n")
        self.die_at("begin")
        names = []
        for i in range(3):
            blob = "x" * (self.config.size * (4000 if i == 1 else 1))  # part1 is large
            self.save_file(f"part{i}.json", {"n": self.config.n, "i": i, "blob": blob})
            names.append(f"part{i}.json")
            self.die_at(f"part{i}")
        if os.environ.get("WORK_FAIL") == str(self.config.n):
            raise RuntimeError("diverged")
        self.save_file("result.json", {"n": self.config.n, "parts": names})
        self.die_at("end")

    def die_at(self, label):
        if os.environ.get("WORK_KILL") == f"{self.config.n}:{label}":
            os.kill(os.getpid(), signal.SIGKILL)
'''

# The zygote: imports everything once, then forks one child per request.
ZYGOTE = r'''
import json, os, signal, sys, traceback

import alembic.command, alembic.config, alembic.operations, alembic.runtime.migration
import alembic.script, alembic.autogenerate
import filelock, pydantic, sqlalchemy, sqlalchemy.dialects.sqlite
import machinable, machinable.interface, machinable.cli
import machinable.catalog.engine, machinable.catalog.index, machinable.catalog.models
import psycopg, sqlalchemy.dialects.postgresql
import gc

gc.freeze()  # children do not copy the imported modules' pages to collect them
out = sys.stdout
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(request["timeout"])
            fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
            sys.stdout = os.fdopen(1, "w", buffering=1)
            sys.stderr = sys.stdout
            sys.stdin = open(os.devnull)
            for name in [k for k in os.environ if k.startswith(("MACHINABLE_", "WORK_"))]:
                del os.environ[name]
            os.environ.update(request["env"])
            os.chdir(request["cwd"])
            exec(compile(request["code"], "<child>", "exec"), {"__name__": "__main__"})
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
            finally:
                os._exit(code)
    _, status = os.waitpid(pid, 0)
    rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    out.write(json.dumps({"returncode": rc}) + "\n")
    out.flush()
'''

# Installed in a child before its scenario runs: wraps the functions a kill point can
# sit in. ``SPEC`` names the point and its ordinal; with no point, it only traces.
INSTRUMENT = r'''
import json as _json, os as _os, signal as _signal, sys as _sys

SPEC = _json.loads(_os.environ.get("CRASH_SPEC", "{}"))
_STORAGE = _os.path.abspath("storage") + _os.sep
_TRACE = []
_HITS = {}


def _point(name, detail=""):
    _HITS[name] = _HITS.get(name, 0) + 1
    _TRACE.append([name, _HITS[name], detail])
    if SPEC.get("point") == name and SPEC.get("nth") == _HITS[name]:
        _sys.stdout.flush()
        _os.kill(_os.getpid(), _signal.SIGKILL)


def _in_storage(path):
    return _os.path.abspath(_os.fspath(path)).startswith(_STORAGE)


_replace = _os.replace


def _traced_replace(src, dst, *args, **kwargs):
    if not _in_storage(dst):
        return _replace(src, dst, *args, **kwargs)
    name = _os.path.basename(_os.fspath(dst))
    _point("replace-before", name)
    result = _replace(src, dst, *args, **kwargs)
    _point("replace-after", name)
    return result


_os.replace = _traced_replace
_unlink = _os.unlink


def _traced_unlink(path, *args, **kwargs):
    if not _in_storage(path):
        return _unlink(path, *args, **kwargs)
    name = _os.path.basename(_os.fspath(path))
    _point("unlink-before", name)
    result = _unlink(path, *args, **kwargs)
    _point("unlink-after", name)
    return result


_os.unlink = _traced_unlink
_fdopen = _os.fdopen


class _HalfWriter:
    """A file handle that stops half way through a write at its kill point."""

    def __init__(self, handle, name):
        self._handle, self._name = handle, name

    def write(self, data):
        half = len(data) // 2
        self._handle.write(data[:half])
        self._handle.flush()
        _point("write-half", self._name)
        return half + self._handle.write(data[half:])

    def __getattr__(self, attr):
        return getattr(self._handle, attr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)


def _traced_fdopen(fd, *args, **kwargs):
    handle = _fdopen(fd, *args, **kwargs)
    try:
        path = _os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return handle
    if _in_storage(path) and "w" in getattr(handle, "mode", ""):
        name = _os.path.basename(path)
        if name.startswith(".") and name.endswith(".tmp"):  # .<name>.<pid>.<random>.tmp
            name = name[1:].rsplit(".", 3)[0]
        return _HalfWriter(handle, name)
    return handle


_os.fdopen = _traced_fdopen

from machinable.catalog.index import Index as _Index


def _wrap(name):
    original = getattr(_Index, name)

    def wrapper(self, *args, **kwargs):
        _point(f"{name}-before")
        result = original(self, *args, **kwargs)
        _point(f"{name}-after")
        return result

    setattr(_Index, name, wrapper)


for _name in ("add_run", "reindex", "_scan", "_add_locations", "_drop_stale", "ingest_directory"):
    _wrap(_name)
_upsert = _Index._upsert_runs


def _half_upsert(self, conn, rows):
    _point("_upsert_runs-before")
    half = len(rows) // 2
    if half:
        _upsert(self, conn, rows[:half])
        _point("_upsert_runs-half", f"{half} of {len(rows)} rows")
        _upsert(self, conn, rows[half:])
    else:
        _upsert(self, conn, rows)
    _point("_upsert_runs-after")


_Index._upsert_runs = _half_upsert

if SPEC.get("sql"):
    import alembic.command as _command
    from sqlalchemy import Engine as _Engine, event as _event

    _upgrade = _command.upgrade

    def _traced_upgrade(*args, **kwargs):
        _point("alembic-upgrade-before")
        result = _upgrade(*args, **kwargs)
        _point("alembic-upgrade-after")
        return result

    _command.upgrade = _traced_upgrade

    def _before(conn, cursor, statement, *rest):
        _point("sql-before", " ".join(statement.split())[:60])

    def _after(conn, cursor, statement, *rest):
        _point("sql-after", " ".join(statement.split())[:60])

    _event.listen(_Engine, "before_cursor_execute", _before)
    _event.listen(_Engine, "after_cursor_execute", _after)


def _print_trace():
    print("TRACE " + _json.dumps(_TRACE))
'''


class Zygotes:
    """A few pre-imported interpreters that fork a child per request."""

    def __init__(self, directory: Path, count: int):
        script = directory / "zygote.py"
        script.write_text(ZYGOTE)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MACHINABLE_")}
        self.procs = [
            subprocess.Popen(
                [sys.executable, str(script)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
                cwd=directory,
            )
            for _ in range(count)
        ]
        self.free: queue.Queue[subprocess.Popen[str]] = queue.Queue()
        for proc in self.procs:
            self.free.put(proc)
        self.counter = 0
        self.lock = threading.Lock()
        self.template: Path | None = None
        self.uuids: list[str] = []

    def run(self, code: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 60) -> tuple[int, str]:
        with self.lock:
            self.counter += 1
            log = cwd.parent / f"child-{self.counter}.log"
        env = {**INDEX_ENV.get(Path(cwd), {}), **(env or {})}
        request = {"code": code, "cwd": str(cwd), "env": env, "log": str(log), "timeout": timeout}
        proc = self.free.get()
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(json.dumps(request) + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
        finally:
            self.free.put(proc)
        if not line:
            raise AssertionError(f"zygote died (exit {proc.poll()})")
        return json.loads(line)["returncode"], log.read_text()

    def close(self) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in self.procs:
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def zygotes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zygotes]:
    directory = tmp_path_factory.mktemp("zygote")
    pool = Zygotes(directory, count=2)
    # An empty index at head, copied where a case needs a migrated index (migrating
    # costs more than the rest of a case; first-use migration has its own test).
    code, log = pool.run(
        "from machinable import Index\nfrom machinable.catalog.engine import dispose_all\n"
        "Index('template.sqlite').count()\ndispose_all()\n",
        directory,
    )
    assert code == 0, log
    pool.template = directory / "template.sqlite"
    # The uuids of the batch's runs: the same in every case (one project name, study).
    project = new_project(directory / "uuids")
    code, log = pool.run(
        "import json\nfrom machinable import get\n"
        f"print('RESULT', json.dumps([get('work', {{'n': n}}).uuid for n in range({RUNS})]))\n",
        project,
    )
    assert code == 0, log
    pool.uuids = result_of(log)
    yield pool
    pool.close()


def child_code(body: str) -> str:
    return INSTRUMENT + "\n" + textwrap.dedent(body)


def result_of(log: str, prefix: str = "RESULT ") -> Any:
    for line in log.splitlines():
        if line.startswith(prefix):
            return json.loads(line[len(prefix) :])
    raise AssertionError(f"no {prefix.strip()} line in child output:\n{log}")


def new_project(root: Path, index: Path | None = None) -> Path:
    """A project ``study`` holding work.py; with ``index``, a copy of it as its index."""
    project = root / "study"
    project.mkdir(parents=True)
    write_module(project, "work", WORK)
    if index is not None:
        shutil.copy(index, project / ".machinable.sqlite")
    return project


def indexed_project(zygotes: Zygotes, root: Path, backend: str) -> Path:
    """A new project whose index is at head: a copy of the SQLite template, or a fresh
    PostgreSQL schema that a child of the zygote migrates (alembic is not thread-safe)."""
    if backend == "sqlite":
        return new_project(root, zygotes.template)
    project = new_project(root)
    migrated_schema(zygotes, project)
    return project


def migrated_schema(zygotes: Zygotes, project: Path) -> None:
    new_schema(project)
    code, log = zygotes.run("from machinable import Index\nIndex.get().count()\n", project)
    assert code == 0, f"cannot migrate a PostgreSQL schema:\n{log[-3000:]}"


def new_schema(project: Path) -> str:
    """A fresh, empty PostgreSQL schema as the project's index (dropped with the module)."""
    schema = f"mtc_{uuid_hex()}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:  # no server: fail loudly, never skip
        pytest.fail(f"PostgreSQL at {POSTGRES_URL} is needed for the postgresql kill points: {exc}")
    finally:
        admin.dispose()
    SCHEMAS.append(schema)
    INDEX_ENV[project] = {"MACHINABLE_INDEX": f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"}
    return schema


def uuid_hex() -> str:
    import uuid

    return uuid.uuid4().hex[:12]


def schema_of(project: Path) -> str | None:
    env = INDEX_ENV.get(project)
    return env["MACHINABLE_INDEX"].rsplit("%3D", 1)[1] if env else None


@pytest.fixture(scope="module", autouse=True)
def _drop_schemas() -> Iterator[None]:
    yield
    if SCHEMAS:
        admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                for schema in SCHEMAS:
                    conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        finally:
            admin.dispose()
        SCHEMAS.clear()
    INDEX_ENV.clear()


def run_cases(
    zygotes: Zygotes, scenario: str, points: list[tuple[str, int, str]], case: Any
) -> None:
    """Run ``case(point, nth)`` for every traced point, in parallel; fail with all reasons."""
    assert points, f"{scenario}: the clean run traced no kill points"

    def attempt(point: tuple[str, int, str]) -> str | None:
        try:
            case(point[0], point[1])
        except AssertionError as exc:
            return f"{point[0]}#{point[1]} ({point[2]}): {exc}"
        return None

    with ThreadPoolExecutor(max_workers=len(zygotes.procs)) as pool:
        failures = [f for f in pool.map(attempt, points) if f]
    SUMMARY[scenario] = (len(points), len(points) - len(failures))
    print(f"{scenario}: {len(points)} kill points tried, {len(points) - len(failures)} passed")
    assert not failures, f"{len(failures)} of {len(points)} kill points failed:\n" + "\n\n".join(failures)


# Checks of what a crash left behind.


def timestamp_ok(path: Path) -> bool:
    try:
        return datetime.fromisoformat(path.read_text().strip()).tzinfo is not None
    except ValueError:
        return False


def complete(directory: Path, n: int) -> str | None:
    """Why a Work run's own files are incomplete, or None."""
    try:
        for i in range(PARTS):
            part = json.loads((directory / f"part{i}.json").read_text())
            size = 64 * (4000 if i == 1 else 1)
            if part != {"n": n, "i": i, "blob": "x" * size}:
                return f"part{i}.json holds the wrong content"
        result = json.loads((directory / "result.json").read_text())
    except (FileNotFoundError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    if result != {"n": n, "parts": [f"part{i}.json" for i in range(PARTS)]}:
        return "result.json holds the wrong content"
    return None


def storage_problems(storage: Path, numbers: dict[str, int]) -> list[str]:
    """Half-written JSON, torn markers, finished runs with missing files."""
    problems = []
    if not storage.exists():
        return problems
    for path in storage.rglob("*"):
        if path.is_file() and path.name.endswith(".json"):
            try:
                json.loads(path.read_text())
            except ValueError:
                problems.append(f"half-written JSON file {path.relative_to(storage)}")
        if path.name in ("started_at", "finished_at", "failed_at", "updated_at") and not timestamp_ok(path):
            problems.append(f"torn marker {path.relative_to(storage)}")
    for directory in storage.iterdir():
        names = set(os.listdir(directory))
        if ".machinable" in names and not {"id.json", "model.json"} <= names:
            problems.append(f"{directory.name}: sentinel without both headers")
        if "id.json" in names and "model.json" not in names:
            problems.append(f"{directory.name}: id.json without model.json")
        if "finished_at" in names:
            why = complete(directory, numbers[directory.name])
            if why:
                problems.append(f"{directory.name} has finished_at but is incomplete: {why}")
    return problems


def finished_on_disk(storage: Path, uuid: str) -> bool:
    return (storage / uuid / "finished_at").is_file()


def started_only(storage: Path, uuid: str) -> bool:
    directory = storage / uuid
    return (directory / "started_at").is_file() and not any(
        (directory / name).exists() for name in ("finished_at", "failed_at")
    )


def call_counts(project: Path) -> dict[str, int]:
    path = project / "calls.txt"
    counts: dict[str, int] = {}
    for uuid in path.read_text().split() if path.exists() else []:
        counts[uuid] = counts.get(uuid, 0) + 1
    return counts


def integrity(path: Path) -> tuple[str, set[str], str | None]:
    with sqlite3.connect(path) as conn:
        check = conn.execute("PRAGMA integrity_check").fetchone()[0]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        version = None
        if "alembic_version" in tables:
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
            version = row[0] if row else None
    return check, tables, version


# Launch: a batch of runs launched one after another in one process.

LAUNCH = """
from machinable import get
for n in range({runs}):
    get("work", {{"n": n}}).launch()
_print_trace()
"""

# In a fresh process: what the index says, what a reindex into a side index makes of
# the storage, then relaunch every run.
INSPECT_AND_RELAUNCH = """
import json, os, shutil
from pathlib import Path
from machinable import Index, get

index = Index.get()
out = {{"count": index.count(), "dialect": index.dialect}}
runs = [get("work", {{"n": n}}) for n in range({runs})]
out["uuids"] = [run.uuid for run in runs]
out["index_status"] = [index.status(run.uuid) for run in runs]
out["status"] = [run.status() for run in runs]
shutil.copy(os.environ["TEMPLATE"], "side.sqlite")
shutil.copy(os.environ["TEMPLATE"], "final.sqlite")
side = Index(Path("side.sqlite").resolve())
report = side.reindex("storage")
out["side_indexed"] = report.indexed
out["side_skipped"] = report.skipped
out["side_status"] = [side.status(run.uuid) for run in runs]
failed = []
for run in runs:
    try:
        run.launch()
    except RuntimeError:
        failed.append(run.uuid)
out["relaunch_failed"] = failed
out["after_status"] = [index.status(run.uuid) for run in runs]
out["after_count"] = index.count()
out["after_cached"] = [get("work", {{"n": n}}).cached() for n in range({runs})]
final = Index(Path("final.sqlite").resolve()).reindex("storage")
out["final_indexed"] = final.indexed
out["final_skipped"] = final.skipped
print("RESULT " + json.dumps(out))
"""


Step = tuple[str, dict[str, str], int]  # code, env, expected exit status


def check_launch_crash(
    zygotes: Zygotes, root: Path, env: dict[str, str], prelude: tuple[Step, ...] = (), backend: str = "sqlite"
) -> list[str]:
    """Launch the batch with a kill point set; check the remains; relaunch; check again.

    Returns the temporary files the crash left (they stay, and are checked to be ignored).
    """
    project = indexed_project(zygotes, root, backend)
    storage = project / "storage"
    for step, step_env, expected_code in prelude:
        code, log = zygotes.run(child_code(step), project, step_env)
        assert code == expected_code, f"prelude exit {code}:\n{log[-3000:]}"
    code, log = zygotes.run(child_code(LAUNCH.format(runs=RUNS)), project, env)
    assert code == KILLED, f"the child was not killed (exit {code}):\n{log[-3000:]}"

    # What the crash left, read before anything else touches the storage.
    numbers = {uuid: n for n, uuid in enumerate(zygotes.uuids)}
    problems = storage_problems(storage, numbers)
    assert not problems, "\n".join(problems)
    before = call_counts(project)
    finished = {uuid for uuid in numbers if finished_on_disk(storage, uuid)}
    started = {uuid for uuid in numbers if started_only(storage, uuid)}
    tmp_left = [p.name for p in storage.rglob(".*.tmp")] if storage.exists() else []

    code, log = zygotes.run(
        child_code(INSPECT_AND_RELAUNCH.format(runs=RUNS)), project, {"TEMPLATE": str(zygotes.template)}
    )
    assert code == 0, f"inspect/relaunch failed (exit {code}):\n{log[-3000:]}"
    out = result_of(log)
    assert out["dialect"] == backend, out  # the case ran against the backend it names
    uuids = out["uuids"]
    assert uuids == zygotes.uuids

    for n, uuid in enumerate(uuids):
        status = out["index_status"][n]
        # Never reported finished unless the files are complete and finished_at is there.
        if status == "finished":
            assert uuid in finished, f"run {n}: index says finished, disk has no finished_at"
        if out["side_status"][n] == "finished":
            assert uuid in finished, f"run {n}: reindex says finished, disk has no finished_at"
        if uuid in finished:
            assert out["side_status"][n] == "finished", f"run {n}: reindex missed a finished run"
            assert out["status"][n] == "finished", f"run {n}: finished on disk, status() {out['status'][n]!r}"
        # A run whose process died after it started is recognisable.
        if uuid in started:
            assert out["side_status"][n] == "started", f"run {n}: reindex says {out['side_status'][n]}"
            assert out["status"][n] == "stale", f"run {n}: died mid-run but status() is {out['status'][n]!r}"
        # Relaunch recomputes exactly the runs that had not finished.
        expected = before.get(uuid, 0) + (0 if uuid in finished else 1)
        got = call_counts(project).get(uuid, 0)
        assert got == expected, (
            f"run {n}: {before.get(uuid, 0)} call(s) before relaunch, {got} after, expected {expected} "
            f"({'finished' if uuid in finished else 'unfinished'} at the crash)"
        )
    assert out["relaunch_failed"] == [], out
    assert out["after_status"] == ["finished"] * RUNS, out
    assert out["after_count"] == RUNS
    assert out["after_cached"] == [True] * RUNS
    for n, uuid in enumerate(uuids):
        assert complete(storage / uuid, n) is None
    # Leftover temporary files are never mistaken for records or files.
    assert not any(".tmp" in path or ".tmp" in reason for path, reason in out["side_skipped"]), out
    assert out["final_indexed"] == RUNS and out["final_skipped"] == [], (out, tmp_left)
    assert not storage_problems(storage, numbers)
    return tmp_left


def traced_points(zygotes: Zygotes, root: Path, body: str, env: dict[str, str] | None = None,
                  names: tuple[str, ...] = (), prelude: tuple[Step, ...] = ()) -> list[tuple[str, int, str]]:
    for step, step_env, expected_code in prelude:
        code, log = zygotes.run(child_code(step), root, step_env)
        assert code == expected_code, log
    code, log = zygotes.run(child_code(body), root, env)
    assert code == 0, log
    trace = result_of(log, "TRACE ")
    return [(name, nth, detail) for name, nth, detail in trace if not names or name in names]


def test_clean_launch_writes_every_file_through_a_replace(zygotes: Zygotes, tmp_path: Path) -> None:
    project = new_project(tmp_path, zygotes.template)
    points = traced_points(zygotes, project, LAUNCH.format(runs=1), names=("replace-after",))
    written = [detail for _, _, detail in points]
    assert written == [
        "model.json", "id.json", ".machinable", "started_at", "updated_at",
        "part0.json", "part1.json", "part2.json", "result.json", "finished_at", "updated_at",
    ]
    code, log = zygotes.run("from machinable import get\nget('work', {'n': 0}).launch()", project)
    assert code == 0, log


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["replace-before", "replace-after", "write-half"])
def test_kill_at_every_atomic_write_of_a_launch(zygotes: Zygotes, tmp_path: Path, kind: str, backend: str) -> None:
    trace = indexed_project(zygotes, tmp_path / "trace", backend)
    points = traced_points(zygotes, trace, LAUNCH.format(runs=RUNS), names=(kind,))
    assert len(points) == RUNS * 11
    if kind != "replace-after":  # every write of the middle run (its neighbours: replace-after)
        points = points[11:22]

    def case(point: str, nth: int) -> None:
        spec = json.dumps({"point": point, "nth": nth})
        left = check_launch_crash(zygotes, tmp_path / f"{point}-{nth}", {"CRASH_SPEC": spec}, backend=backend)
        if kind != "replace-after":  # the killed write's temporary file stays behind
            assert len(left) == 1, left

    run_cases(zygotes, f"launch {kind} [{backend}]", points, case)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_inside_call_after_saving_some_files(zygotes: Zygotes, tmp_path: Path, backend: str) -> None:
    labels = ["begin", *[f"part{i}" for i in range(PARTS)], "end"]
    points = [(f"{n}:{label}", 1, "user __call__ kills itself") for n in range(RUNS) for label in labels]

    def case(point: str, nth: int) -> None:
        check_launch_crash(zygotes, tmp_path / point.replace(":", "-"), {"WORK_KILL": point}, backend=backend)

    run_cases(zygotes, f"inside __call__ [{backend}]", points, case)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_between_finished_at_and_the_index_commit(zygotes: Zygotes, tmp_path: Path, backend: str) -> None:
    names = tuple(
        f"{method}-{when}"
        for method in ("add_run", "_upsert_runs", "_add_locations")
        for when in ("before", "after")
    )
    trace = indexed_project(zygotes, tmp_path / "trace", backend)
    points = traced_points(zygotes, trace, LAUNCH.format(runs=RUNS), names=names)
    assert len(points) == RUNS * len(names)

    def case(point: str, nth: int) -> None:
        spec = json.dumps({"point": point, "nth": nth})
        check_launch_crash(zygotes, tmp_path / f"{point}-{nth}", {"CRASH_SPEC": spec}, backend=backend)

    run_cases(zygotes, f"index commit of a launch [{backend}]", points, case)


FAILING_LAUNCH = "try:\n" + textwrap.indent(LAUNCH.format(runs=RUNS), "    ") + "except RuntimeError:\n    _print_trace()\n"


@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_while_recording_a_failed_run(zygotes: Zygotes, tmp_path: Path, backend: str) -> None:
    """Run 1 raises; kills on its failure path never leave it looking finished."""
    env = {"WORK_FAIL": "1"}
    points = traced_points(zygotes, indexed_project(zygotes, tmp_path / "trace", backend), FAILING_LAUNCH, env)
    # From the write of error.txt to the commit of the failed run's index row.
    first = next(i for i, p in enumerate(points) if p[0] == "replace-before" and p[2] == "error.txt")
    last = next(i for i, p in enumerate(points) if i > first and p[0] == "add_run-after")
    points = points[first : last + 1]
    assert [p[2] for p in points if p[0] == "replace-after"] == ["error.txt", "failed_at", "updated_at"]

    def case(point: str, nth: int) -> None:
        spec = json.dumps({"point": point, "nth": nth})
        _check_failed_crash(zygotes, tmp_path / f"{point}-{nth}", env, spec, backend)

    run_cases(zygotes, f"failure path [{backend}]", points, case)


RELAUNCH_PRELUDES: dict[str, tuple[Step, ...]] = {
    "failed": ((FAILING_LAUNCH, {"WORK_FAIL": "1"}, 0),),
    "dead": ((LAUNCH.format(runs=RUNS), {"WORK_KILL": "1:part1"}, KILLED),),
    # finished on disk, killed before its index row: the relaunch ingests it
    "unindexed": ((LAUNCH.format(runs=RUNS), {"CRASH_SPEC": json.dumps({"point": "add_run-before", "nth": 2})}, KILLED),),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("before", sorted(RELAUNCH_PRELUDES))
def test_kill_while_relaunching(zygotes: Zygotes, tmp_path: Path, before: str, backend: str) -> None:
    """Run 1 failed (or its process died) earlier; the relaunch is killed at every step."""
    prelude = RELAUNCH_PRELUDES[before]
    names = ("replace-after", "unlink-after", "add_run-after", "ingest_directory-after", "_upsert_runs-after")
    points = traced_points(
        zygotes, indexed_project(zygotes, tmp_path / "trace", backend), LAUNCH.format(runs=RUNS),
        names=names, prelude=prelude,
    )
    # Up to run 1's row (run 2 is a first launch, killed at every point above).
    end = next(i for i, p in enumerate(points) if p[0] in ("add_run-after", "ingest_directory-after"))
    points = points[: end + 1]
    if before == "failed":  # the relaunch clears the failure first
        assert [p[2] for p in points if p[0] == "unlink-after"] == ["failed_at", "error.txt"]
    if before == "unindexed":
        assert any(p[0] == "ingest_directory-after" for p in points)

    def case(point: str, nth: int) -> None:
        spec = json.dumps({"point": point, "nth": nth})
        check_launch_crash(zygotes, tmp_path / f"{point}-{nth}", {"CRASH_SPEC": spec}, prelude, backend)

    run_cases(zygotes, f"relaunch after a {before} run [{backend}]", points, case)


def _check_failed_crash(zygotes: Zygotes, root: Path, env: dict[str, str], spec: str, backend: str) -> None:
    project = indexed_project(zygotes, root, backend)
    code, log = zygotes.run(child_code(FAILING_LAUNCH), project, {**env, "CRASH_SPEC": spec})
    assert code == KILLED, f"the child was not killed (exit {code}):\n{log[-3000:]}"
    storage = project / "storage"
    problems = storage_problems(storage, {u: n for n, u in enumerate(zygotes.uuids)})
    assert not problems, problems
    before = call_counts(project)
    finished = {u for u in zygotes.uuids if finished_on_disk(storage, u)}
    failed = (storage / zygotes.uuids[1] / "failed_at").is_file()
    code, log = zygotes.run(
        child_code(INSPECT_AND_RELAUNCH.format(runs=RUNS)), project, {"TEMPLATE": str(zygotes.template)}
    )
    assert code == 0, log
    out = result_of(log)
    assert out["dialect"] == backend, out
    uuids = out["uuids"]
    assert uuids[1] not in finished
    # Failed if failed_at made it to disk, else recognisably dead; never finished.
    assert out["index_status"][1] in (None, "failed"), out
    assert out["side_status"][1] == ("failed" if failed else "started"), out
    assert out["status"][1] == ("failed" if failed else "stale"), out
    problems = storage_problems(storage, {u: n for n, u in enumerate(uuids)})
    assert not problems, problems
    for uuid in uuids:
        expected = before.get(uuid, 0) + (0 if uuid in finished else 1)
        assert call_counts(project).get(uuid, 0) == expected
    assert out["after_status"] == ["finished"] * RUNS, out
    assert out["final_indexed"] == RUNS and out["final_skipped"] == [], out


def test_a_running_run_is_started_and_a_killed_one_is_stale(zygotes: Zygotes, tmp_path: Path) -> None:
    project = new_project(tmp_path, zygotes.template)
    write_module(project, "slow", """
        from pathlib import Path
        import time
        from machinable import Interface

        class Slow(Interface):
            def __call__(self):
                Path(self.project.path / "running").touch()
                time.sleep(120)
        """)
    child = subprocess.Popen(
        [sys.executable, "-c", "from machinable import get; get('slow').launch()"],
        cwd=project,
        env={k: v for k, v in os.environ.items() if not k.startswith("MACHINABLE_")},
    )
    try:
        for _ in range(600):
            if (project / "running").exists() or child.poll() is not None:
                break
            threading.Event().wait(0.05)
        assert (project / "running").exists(), "the slow run never started"
        status = "from machinable import get\nprint('STATUS', get('slow').status())\n"
        code, log = zygotes.run(status, project)
        assert code == 0 and "STATUS started" in log, log
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == KILLED
        # ...and seen from a brand-new interpreter too.
        assert "STATUS stale" in run_python(status, cwd=project).stdout
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


# Reindex: a storage whose index is out of date (two directories deleted, one dead run
# never indexed, leftover temporary files), reindexed by a process that dies.

REINDEX = """
from machinable import Index
Index.get().reindex()
_print_trace()
"""


def dump(project: Path) -> tuple[list[Any], list[Any]]:
    """Every run row, and every location relative to the project (SQLite or PostgreSQL)."""
    schema = schema_of(project)
    if schema is None:
        with sqlite3.connect(project / ".machinable.sqlite") as conn:
            runs = sorted(conn.execute("SELECT * FROM runs").fetchall())
            places = conn.execute("SELECT run_uuid, storage, directory FROM locations").fetchall()
    else:
        engine = create_engine(INDEX_ENV[project]["MACHINABLE_INDEX"])
        try:
            with engine.connect() as conn:
                runs = sorted(tuple(row) for row in conn.execute(text("SELECT * FROM runs")))
                places = conn.execute(text("SELECT run_uuid, storage, directory FROM locations")).all()
        finally:
            engine.dispose()
    locations = sorted(
        (uuid, os.path.relpath(storage, project), os.path.relpath(directory, project))
        for uuid, storage, directory in places
    )
    return runs, locations


def schema_version(project: Path) -> str | None:
    """The alembic revision a project's PostgreSQL schema records, or None."""
    engine = create_engine(INDEX_ENV[project]["MACHINABLE_INDEX"])
    try:
        with engine.connect() as conn:
            found = conn.execute(
                text("SELECT 1 FROM information_schema.tables WHERE table_schema = :s AND table_name = 'alembic_version'"),
                {"s": schema_of(project)},
            ).first()
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar() if found else None
    finally:
        engine.dispose()


def copy_index(source: Path, project: Path) -> None:
    """Copy the rows of ``source``'s PostgreSQL index into ``project``'s (migrated, empty),
    moving its locations along as the SQLite variant does with the copied file."""
    from machinable.catalog.models import Base

    old, new = schema_of(source), schema_of(project)
    engine = create_engine(POSTGRES_URL)
    try:
        with engine.begin() as conn:
            for table in Base.metadata.sorted_tables:
                conn.execute(text(f'INSERT INTO "{new}"."{table.name}" SELECT * FROM "{old}"."{table.name}"'))
                if "id" in table.c:  # the next row inserted must not reuse a copied id
                    conn.execute(text(
                        f"SELECT setval(pg_get_serial_sequence('\"{new}\".\"{table.name}\"', 'id'), "
                        f'(SELECT coalesce(max(id), 0) + 1 FROM "{new}"."{table.name}"), false)'
                    ))
            conn.execute(
                text(
                    f'UPDATE "{new}".locations SET storage = replace(storage, :a, :b), '
                    "directory = replace(directory, :a, :b)"
                ),
                {"a": str(source), "b": str(project)},
            )
    finally:
        engine.dispose()


def stale_project(zygotes: Zygotes, root: Path, backend: str) -> Path:
    project = indexed_project(zygotes, root, backend)
    code, log = zygotes.run(LAUNCH.format(runs=12).replace("_print_trace()", ""), project)
    assert code == 0, log
    code, log = zygotes.run(
        'from machinable import get\nget("work", {"n": 12}).launch()', project, {"WORK_KILL": "12:part1"}
    )
    assert code == KILLED, log
    code, log = zygotes.run(
        "import json\nfrom machinable import get\nfrom machinable.catalog.engine import dispose_all\n"
        "print('RESULT ' + json.dumps([get('work', {'n': n}).uuid for n in (10, 11, 12)]))\ndispose_all()\n",
        project,
    )
    assert code == 0, log
    gone_a, gone_b, dead = result_of(log)
    storage = project / "storage"
    shutil.rmtree(storage / gone_a)
    shutil.rmtree(storage / gone_b)
    assert (storage / dead / "started_at").exists() and not (storage / dead / "finished_at").exists()
    some = next(p for p in storage.iterdir() if p.name not in (dead, ".locks"))
    (some / ".result.json.4242.deadbeef.tmp").write_text('{"half": ')
    (some / ".id.json.4242.deadbeef.tmp").write_text('{"uuid": "0000')
    (storage / ".0123.tmp").write_text("not a run")
    return project


@pytest.fixture(scope="module")
def stale_storage(zygotes: Zygotes, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A project per backend whose index is out of date (made once, copied per case)."""
    made: dict[str, Path] = {}

    def get(backend: str) -> Path:
        if backend not in made:
            made[backend] = stale_project(zygotes, tmp_path_factory.mktemp(f"reindex-base-{backend}"), backend)
        return made[backend]

    return get


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index", ["existing", "deleted"])
def test_kill_during_reindex(zygotes: Zygotes, stale_storage: Any, tmp_path: Path, index: str, backend: str) -> None:
    base = stale_storage(backend)

    def prepare(root: Path) -> Path:
        project = root / "study"
        shutil.copytree(base, project)
        if backend == "postgresql":  # a schema of its own: empty, or a copy of the base's rows
            if index == "deleted":
                new_schema(project)
            else:
                migrated_schema(zygotes, project)
                copy_index(base, project)
        elif index == "deleted":
            for path in project.glob(".machinable.sqlite*"):
                path.unlink()
        else:  # the copied index points at the original's directories: move it along
            with sqlite3.connect(project / ".machinable.sqlite") as conn:
                conn.execute(
                    "UPDATE locations SET storage = replace(storage, ?, ?), directory = replace(directory, ?, ?)",
                    (str(base), str(project)) * 2,
                )
        return project

    reference = prepare(tmp_path / "reference")
    pre = dump(reference) if index == "existing" else ([], [])
    points = traced_points(zygotes, reference, REINDEX, {"CRASH_SPEC": json.dumps({"sql": True})})
    post = dump(reference)
    if index == "deleted":  # statements: the migration test's and the existing index's
        points = [p for p in points if not p[0].startswith("sql-")]
    assert len(post[0]) == 11 and pre != post
    statuses = sorted(row[9] for row in post[0])
    assert statuses == ["finished"] * 10 + ["started"]

    def case(point: str, nth: int) -> None:
        project = prepare(tmp_path / f"{point}-{nth}")
        spec = json.dumps({"point": point, "nth": nth, "sql": True})
        code, log = zygotes.run(child_code(REINDEX), project, {"CRASH_SPEC": spec})
        assert code == KILLED, f"the child was not killed (exit {code}):\n{log[-3000:]}"
        # A fresh process opens the index and sees the old rows or the new, never a mix.
        code, log = zygotes.run(
            "from machinable import Index\nfrom machinable.catalog.engine import dispose_all\n"
            "print('RESULT', Index.get().count(), Index.get().dialect)\ndispose_all()\n",
            project,
        )
        assert code == 0, f"the index does not open after the crash:\n{log[-3000:]}"
        assert any(line.startswith("RESULT ") and line.endswith(f" {backend}") for line in log.splitlines()), log
        if backend == "sqlite":
            check, _, version = integrity(project / ".machinable.sqlite")
            assert check == "ok" and version is not None
        else:
            assert schema_version(project) is not None
        state = dump(project)
        assert state in (pre, post), f"reindex left a partial state: {len(state[0])} runs"
        code, log = zygotes.run(child_code(REINDEX), project)
        assert code == 0, log
        assert dump(project) == post

    run_cases(zygotes, f"reindex ({index} index) [{backend}]", points, case)


# First use of a new index: the migration is killed at every statement.

FIRST_USE = """
from machinable import Index
Index.get().count()
_print_trace()
"""


def test_kill_during_first_use_migration(zygotes: Zygotes, tmp_path: Path) -> None:
    spec = {"sql": True}
    reference = new_project(tmp_path / "reference")
    points = traced_points(zygotes, reference, FIRST_USE, {"CRASH_SPEC": json.dumps(spec)})
    assert any(p[0] == "alembic-upgrade-after" for p in points)
    _, head_tables, head = integrity(reference / ".machinable.sqlite")
    assert head is not None and {"runs", "locations", "remotes", "availability"} <= head_tables

    def case(point: str, nth: int) -> None:
        project = new_project(tmp_path / f"{point}-{nth}")
        code, log = zygotes.run(child_code(FIRST_USE), project, {"CRASH_SPEC": json.dumps({**spec, "point": point, "nth": nth})})
        assert code == KILLED, f"the child was not killed (exit {code}):\n{log[-3000:]}"
        db = project / ".machinable.sqlite"
        if db.exists():
            check, tables, version = integrity(db)
            assert check == "ok"
            # All of the schema or none of it: never tables without a version, or a
            # version without its tables.
            assert (version, tables) in ((None, set()), (head, head_tables)), (version, sorted(tables))
        code, log = zygotes.run(
            "from machinable import Index, get\nprint('RESULT', Index.get().count())\n"
            "get('work', {'n': 1}).launch()\nprint('RESULT2', Index.get().count())\n",
            project,
        )
        assert code == 0, f"a fresh process cannot use the index after the crash:\n{log[-3000:]}"
        assert "RESULT 0" in log and "RESULT2 1" in log, log
        assert integrity(db) == ("ok", head_tables, head)

    run_cases(zygotes, "first-use migration [sqlite]", points, case)


def test_kill_points_summary() -> None:
    """Runs last: prints how many kill points were tried and passed, per backend (for
    the report).

    Run alone (or after scenarios that were deselected) it fails: a summary of nothing
    tried proves nothing, and neither does one that tried a single backend.
    """
    tried = sum(t for t, _ in SUMMARY.values())
    passed = sum(p for _, p in SUMMARY.values())
    print(f"kill points: {tried} tried, {passed} passed")
    for backend in BACKENDS:
        mine = [counts for scenario, counts in SUMMARY.items() if scenario.endswith(f"[{backend}]")]
        print(f"  on {backend}: {sum(t for t, _ in mine)} tried, {sum(p for _, p in mine)} passed")
    for scenario, (t, p) in SUMMARY.items():
        print(f"  {scenario}: {t} tried, {p} passed")
    assert tried > 0, "no kill point was tried in this process: run the whole of test_crash.py"
    for backend in BACKENDS:
        assert any(scenario.endswith(f"[{backend}]") and t > 0 for scenario, (t, _) in SUMMARY.items()), (
            f"no kill point was tried on {backend} in this process: run the whole of test_crash.py"
        )
    assert tried == passed
