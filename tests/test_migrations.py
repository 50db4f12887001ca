"""The index schema under Alembic: the checkout's CLI, model/migration agreement, every
migration both ways on a real index, refusing indexes this code cannot read, and an
installed wheel (not the editable checkout) creating its index on first use.

Tests taking ``project`` or ``fresh_index`` run on a SQLite file and on a fresh
PostgreSQL schema; the not-a-database file and the wheel test are about SQLite files."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

from machinable import Index, get
from machinable.catalog.engine import (
    SCHEMA_HEAD,
    alembic_config,
    dispose_all,
    make_engine,
    migrations_dir,
    to_url,
)
from machinable.catalog.models import Base
from machinable.errors import IndexError_, IndexNewerThanCode, MachinableError

from conftest import (
    OPTIMIZE,
    calls,
    index_url,
    postgres_schema,
    run_python,
    table_rows,
    write_module,
)

REPO = Path(__file__).resolve().parents[1]
TABLES = {"runs", "locations", "remotes", "availability", "leaves"}


def _url(where: Path | str | Index) -> str:
    if isinstance(where, Index):
        return where.resolved_url
    return to_url(where)


def tables(where: Path | str | Index) -> set[str]:
    """The tables of an index (a SQLite path, a URL or an Index), read with a plain engine:
    nothing is created or migrated."""
    url = _url(where)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            names = inspect(conn).get_table_names(schema=postgres_schema(url))
    finally:
        engine.dispose()
    return {name for name in names if not name.startswith("sqlite_")}


def revision(where: Path | str | Index) -> str | None:
    engine = create_engine(_url(where))
    try:
        with engine.connect() as conn:
            row = conn.execute(text("SELECT version_num FROM alembic_version")).fetchone()
    finally:
        engine.dispose()
    return row[0] if row else None


def snapshot(where: Path | str | Index) -> dict[str, list[tuple]]:
    """Every row of every table, read with a plain engine (works on a refused index)."""
    engine = create_engine(_url(where))
    try:
        with engine.connect() as conn:
            return {
                name: sorted((tuple(row) for row in conn.execute(text(f"SELECT * FROM {name}"))), key=repr)
                for name in tables(where)
            }
    finally:
        engine.dispose()


def spec(index: Index) -> str:
    """What a user puts in MACHINABLE_INDEX for this index: a file path, or the URL."""
    return str(index.path) if index.path is not None else index.resolved_url


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


# --------------------------------------------------------------------------- alembic CLI


def test_alembic_upgrade_head_from_the_checkout_creates_the_schema(fresh_index) -> None:
    catalog = fresh_index("catalog")
    checkout_default = (REPO / ".machinable.sqlite").exists()
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=REPO,
        env={**os.environ, "MACHINABLE_INDEX": spec(catalog)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert tables(catalog) == TABLES | {"alembic_version"}
    assert revision(catalog) == SCHEMA_HEAD
    # MACHINABLE_INDEX won over the ini's default URL.
    assert (REPO / ".machinable.sqlite").exists() == checkout_default

    # machinable opens the index alembic made and uses it as is.
    assert catalog.count() == 0
    assert revision(catalog) == SCHEMA_HEAD


def test_alembic_current_and_downgrade_through_the_cli(fresh_index) -> None:
    catalog = fresh_index("catalog")
    env = {**os.environ, "MACHINABLE_INDEX": spec(catalog)}

    def alembic(*args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "alembic", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        return result

    alembic("upgrade", "head")
    assert SCHEMA_HEAD in alembic("current").stdout
    alembic("downgrade", "base")
    assert tables(catalog) & TABLES == set()
    assert revision(catalog) is None


# --------------------------------------------------------------------------- agreement


def test_exactly_one_head_and_it_is_the_codes_schema_head() -> None:
    heads = script().get_heads()
    assert heads == [SCHEMA_HEAD]
    # The checkout's alembic.ini and the package point at the same migrations.
    assert migrations_dir() == REPO / "migrations"
    assert (REPO / "alembic.ini").read_text().count("script_location = %(here)s/migrations") == 1


def test_models_and_migrations_agree(fresh_index, monkeypatch: pytest.MonkeyPatch) -> None:
    # migrations/env.py prefers MACHINABLE_INDEX to the config's URL: leave only the URL.
    monkeypatch.delenv("MACHINABLE_INDEX", raising=False)
    url = fresh_index("agree").resolved_url
    cfg = alembic_config(url)
    command.upgrade(cfg, "head")
    command.check(cfg)  # raises AutogenerateDiffsDetected on any difference

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"compare_type": True, "render_as_batch": True}
            )
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_every_migration_upgrades_and_downgrades_on_a_real_index(
    fresh_index, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MACHINABLE_INDEX", raising=False)  # env.py would prefer it to the URL
    path = fresh_index("steps")
    cfg = alembic_config(path.resolved_url)
    revisions = list(reversed(list(script().walk_revisions())))  # base first
    assert revisions and revisions[-1].revision == SCHEMA_HEAD

    for rev in revisions:
        command.upgrade(cfg, rev.revision)
        assert revision(path) == rev.revision
        command.downgrade(cfg, rev.down_revision or "base")
        assert revision(path) == rev.down_revision
        command.upgrade(cfg, rev.revision)
        assert revision(path) == rev.revision

    assert tables(path) == TABLES | {"alembic_version"}
    command.downgrade(cfg, "base")
    assert tables(path) & TABLES == set()
    command.upgrade(cfg, "head")
    assert tables(path) == TABLES | {"alembic_version"}
    assert revision(path) == SCHEMA_HEAD


def test_a_migrated_index_holds_runs(project: Path, monkeypatch: pytest.MonkeyPatch, fresh_index) -> None:
    catalog = fresh_index("catalog")
    monkeypatch.delenv("MACHINABLE_INDEX", raising=False)  # env.py would prefer it to the URL
    command.upgrade(alembic_config(catalog.resolved_url), "head")
    assert revision(catalog) == SCHEMA_HEAD
    monkeypatch.setenv("MACHINABLE_INDEX", spec(catalog))
    run = get("optimize", {"lr": 0.5}).launch()
    assert Index.get().find(run.uuid).status == "finished"
    assert [row[0] for row in table_rows("runs", catalog)] == [run.uuid]


def test_an_older_index_is_upgraded_on_first_use_and_keeps_its_runs(project: Path) -> None:
    run = get("optimize", {"lr": 0.5}).launch()
    index_file = index_url(project)  # the project's file, or MACHINABLE_INDEX's schema
    before = Index.get().find(run.uuid)
    dispose_all()
    # Take the index back to the oldest schema, as an older machinable left it.
    oldest = list(script().walk_revisions())[-1].revision
    command.downgrade(alembic_config(index_file), oldest)
    assert revision(index_file) == oldest

    again = get("optimize", {"lr": 0.5})
    assert again.cached()
    assert revision(index_file) == SCHEMA_HEAD
    assert Index.get().find(run.uuid) == before
    assert again.loss() == pytest.approx(1 / 51)
    assert calls(project) == [run.uuid]


def test_upgrading_to_leaves_fills_them_from_the_indexed_runs_and_keeps_search_indexes(project: Path) -> None:
    """An index from before 0004 gets its leaves from the rows it holds (no directories
    are read), answers searches as before, and a search index the user added survives."""
    runs = [get("optimize", {"lr": lr, "steps": steps}).launch() for lr, steps in ((0.5, 10), (0.25, 100), (2, 7))]
    index = Index.get()
    assert index.add_search_index("config.lr") == "ix_search_config_lr"
    queries = ["config.lr > 0.3", "config.steps = 100", "config.lr >= 0.25 and config.steps < 50"]
    before = {q: [r.uuid for r in index.search(q, order_by="config.lr")] for q in queries}
    assert before[queries[0]] == [runs[0].uuid, runs[2].uuid]
    leaves = table_rows("leaves")
    assert len(leaves) == 6  # lr and steps of three runs
    index_file = index_url(project)
    dispose_all()
    command.downgrade(alembic_config(index_file), "0005")
    assert "leaves" not in tables(index_file)
    # the index moves away from the directories: the upgrade must use the rows alone
    (project / "storage").rename(project / "elsewhere")

    index = Index.get()
    assert index.count() == 3  # first use upgrades
    assert revision(index_file) == SCHEMA_HEAD
    assert table_rows("leaves") == leaves
    assert {q: [r.uuid for r in index.search(q, order_by="config.lr")] for q in queries} == before
    assert index.search_indexes() == ["ix_search_config_lr"]


# --------------------------------------------------------------------------- refusals


def _newer_index(url: str) -> None:
    """Create the index, then stamp it with a revision this code does not know:
    with plain sqlite3 on a file, through SQLAlchemy on a server."""
    assert Index(url).count() == 0
    dispose_all()
    if postgres_schema(url) is None:
        with sqlite3.connect(make_url(url).database) as conn:
            conn.execute("UPDATE alembic_version SET version_num = 'ffff9999'")
        conn.close()
        return
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'ffff9999'"))
    engine.dispose()


def test_an_index_newer_than_the_code_is_refused_and_left_alone(project: Path, index_backend: str) -> None:
    index_file = index_url(project)
    _newer_index(index_file)
    rows = snapshot(index_file)
    path = make_url(index_file).database if index_backend == "sqlite" else None
    digest = sha256(Path(path)) if path else None

    with pytest.raises(IndexNewerThanCode) as caught:
        get("optimize", {"lr": 0.5}).launch()
    message = str(caught.value)
    assert "ffff9999" in message
    assert SCHEMA_HEAD in message
    assert "upgrade machinable" in message
    assert "MACHINABLE_INDEX" in message

    # Asking again (the refusal is not cached as "ready") refuses again.
    with pytest.raises(IndexNewerThanCode):
        Index.get().find("0" * 32)
    dispose_all()
    if path:
        assert sha256(Path(path)) == digest
    assert snapshot(index_file) == rows
    assert revision(index_file) == "ffff9999"
    assert tables(index_file) == TABLES | {"alembic_version"}
    assert not (project / "storage").exists()  # nothing was computed or written


def test_a_file_that_is_not_sqlite_is_refused_and_left_alone(sqlite_project: Path) -> None:
    project = sqlite_project
    index_file = project / ".machinable.sqlite"
    garbage = b"this is not a database\n" + bytes(range(256)) * 16
    index_file.write_bytes(garbage)

    with pytest.raises(IndexError_) as caught:
        get("optimize", {"lr": 0.5}).launch()
    assert isinstance(caught.value, MachinableError)
    assert str(index_file) in str(caught.value)
    assert "not a SQLite database" in str(caught.value)
    with pytest.raises(IndexError_):
        Index.get().count()

    dispose_all()
    assert index_file.read_bytes() == garbage
    assert not (project / "storage").exists()


def test_many_processes_opening_one_new_index_at_once(project: Path, fresh_index) -> None:
    catalog = fresh_index("fresh/catalog")  # not yet created: no file, or an empty schema
    if catalog.path is not None:
        assert not catalog.path.parent.exists()
    else:
        assert tables(catalog) == set()
    env = {**os.environ, "MACHINABLE_INDEX": spec(catalog)}
    code = textwrap.dedent(
        """
        import sys
        from machinable import get
        print(get("optimize", {"lr": float(sys.argv[1])}).launch().uuid)
        """
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(lr)],
            cwd=project,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for lr in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
    ]
    uuids = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        uuids.append(out.strip())
    assert revision(catalog) == SCHEMA_HEAD
    assert len(set(uuids)) == 6
    assert sorted(row[0] for row in table_rows("runs", catalog)) == sorted(uuids)


# --------------------------------------------------------------------------- wheel


def test_an_installed_wheel_creates_its_index_on_first_use(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = dist.glob("machinable-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "machinable/_migrations/env.py" in names
    head_file = f"machinable/_migrations/versions/{SCHEMA_HEAD}_"
    assert any(n.startswith(head_file) and n.endswith(".py") for n in names), names

    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    study = tmp_path / "elsewhere" / "study"
    study.mkdir(parents=True)
    write_module(study, "optimize", OPTIMIZE)

    result = run_python(
        f"""
        from pathlib import Path
        import machinable
        from machinable import Index, get
        from machinable.catalog.engine import migrations_dir

        site = Path({str(site)!r}).resolve()
        assert site in Path(machinable.__file__).resolve().parents, machinable.__file__
        assert migrations_dir().resolve() == site / "machinable" / "_migrations", migrations_dir()
        run = get("optimize", {{"lr": 0.5}}).launch()
        print(run.uuid, run.loss(), Index.get().path)
        """,
        cwd=study,
        env={"PYTHONPATH": str(site)},
    )
    uuid, loss, index_path = result.stdout.split()
    assert float(loss) == pytest.approx(1 / 51)
    assert Path(index_path) == study / ".machinable.sqlite"
    assert revision(study / ".machinable.sqlite") == SCHEMA_HEAD
    assert tables(study / ".machinable.sqlite") == TABLES | {"alembic_version"}
    assert (study / "storage" / uuid / "result.json").is_file()
