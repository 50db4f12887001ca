"""The index: where it lives, lookups, rebuilding it from directories, ingesting folders.

Tests taking ``project`` run on the project's SQLite file and on a fresh PostgreSQL
schema; the ones about the SQLite file itself take ``sqlite_project``. Behaviour that
crosses processes (reindex never imports user code, a moved index is found again) runs
real subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from machinable import Index, Scope, Storage, get
from machinable.catalog.models import Location, Run
from machinable.errors import IdentityCollision, RecordError
from machinable.record import mark, write_record

from conftest import calls, index_exists, run_python, table_rows, wipe_index, write_module

FAILING = """
from pydantic import BaseModel
from machinable import Interface


class Failing(Interface):
    class Config(BaseModel):
        when: int = 0

    def __call__(self):
        raise RuntimeError("boom")
"""

NOISY = """
from pathlib import Path
from pydantic import BaseModel
from machinable import Interface

with open(Path(__file__).with_name("imported.marker"), "a") as handle:
    handle.write("imported\\n")


class Noisy(Interface):
    class Config(BaseModel):
        n: int = 0

    def __call__(self):
        self.save_file("out.json", {"n": self.config.n})
"""


def launch_lrs(*lrs: float) -> list[str]:
    return [get("optimize", {"lr": lr}).launch().uuid for lr in lrs]


# --------------------------------------------------------------------------- location


def test_default_index_file_is_created_in_the_project_on_first_use(sqlite_project: Path) -> None:
    project = sqlite_project
    index_file = project / ".machinable.sqlite"
    assert not index_file.exists()

    run = get("optimize", {"lr": 0.5})
    run.launch()

    assert index_file.is_file()
    assert Index.get().path == index_file
    assert Index.get().find(run.uuid) is not None
    with sqlite3.connect(index_file) as conn:
        assert conn.execute("SELECT uuid FROM runs").fetchall() == [(run.uuid,)]


def test_the_index_is_created_on_first_use_on_either_backend(project: Path, index_backend: str) -> None:
    assert not index_exists(project)
    get("optimize", {"lr": 0.5})  # naming a run does not touch the index
    assert not index_exists(project)

    run = get("optimize", {"lr": 0.5}).launch()

    assert index_exists(project)
    assert Index.get().path == (project / ".machinable.sqlite" if index_backend == "sqlite" else None)
    assert [row[0] for row in table_rows("runs")] == [run.uuid]
    assert [row[1:4] for row in table_rows("locations")] == [
        (run.uuid, str(project / "storage"), str(project / "storage" / run.uuid))
    ]


def test_machinable_index_moves_the_index_and_a_fresh_process_finds_it(
    sqlite_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = sqlite_project
    moved = tmp_path / "shared" / "catalog.sqlite"
    monkeypatch.setenv("MACHINABLE_INDEX", str(moved))

    run = get("optimize", {"lr": 0.5}).launch()

    assert moved.is_file()
    assert not (project / ".machinable.sqlite").exists()
    assert Index.get().path == moved
    assert Index(moved).find(run.uuid).status == "finished"

    # Another process with the same setting sees the run and does not recompute it.
    result = run_python(
        f"""
        from machinable import Index, get
        run = get("optimize", {{"lr": 0.5}})
        assert run.uuid == {run.uuid!r}
        assert run.cached()
        run.launch()
        print(Index.get().path, Index.get().local_directory(run.uuid))
        """,
        cwd=project,
        env={"MACHINABLE_INDEX": str(moved)},
    )
    assert result.stdout.split() == [str(moved), str(project / "storage" / run.uuid)]
    assert calls(project) == [run.uuid]
    assert not (project / ".machinable.sqlite").exists()


def test_find_and_local_directory(project: Path) -> None:
    run = get("optimize", {"lr": 0.5, "steps": 7}).launch()
    index = Index.get()

    record = index.find(run.uuid)
    assert record is not None
    assert record.uuid == run.uuid
    assert record.project == "study"
    assert record.module == "optimize"
    assert record.config == {"lr": 0.5, "steps": 7}
    assert record.canonical == {"lr": 0.5, "steps": 7}
    assert record.status == "finished"
    assert record.finished_at is not None and record.finished_at.tzinfo is not None
    assert record.directories == (str(project / "storage" / run.uuid),)
    assert index.local_directory(run.uuid) == project / "storage" / run.uuid

    unknown = "0" * 32
    assert index.find(unknown) is None
    assert index.local_directory(unknown) is None


def test_local_directory_is_none_when_the_directory_is_gone(project: Path) -> None:
    run = get("optimize", {"lr": 0.5}).launch()
    shutil.rmtree(project / "storage" / run.uuid)

    assert Index.get().find(run.uuid) is not None
    assert Index.get().local_directory(run.uuid) is None
    assert not run.is_mounted()


# --------------------------------------------------------------------------- reindex


def test_delete_index_and_reindex_gives_back_every_run(project: Path, tmp_path: Path) -> None:
    write_module(project, "failing", FAILING)
    uuids = launch_lrs(0.5, 1.0, 2.0)
    with Scope({"seed": 3}):
        uuids.append(get("optimize", {"lr": 0.5}).launch().uuid)
    failing = get("failing", {"when": 1})
    with pytest.raises(RuntimeError, match="boom"):
        failing.launch()
    uuids.append(failing.uuid)
    # A run launched but never finished: headers and started_at only.
    started = get("optimize", {"lr": 9.0})
    directory = project / "storage" / started.uuid
    header, model = started._headers()

    write_record(directory, header, model)
    mark(directory, "started_at")
    Index.get().ingest_directory(directory)
    uuids.append(started.uuid)

    index = Index.get()
    before = {uuid: index.find(uuid) for uuid in uuids}
    assert {r.status for r in before.values()} == {"finished", "failed", "started"}
    assert before[failing.uuid].failed_at is not None
    assert index.count() == len(uuids)

    wipe_index(project)
    assert Index.get().find(uuids[0]) is None

    report = Index.get().reindex()

    assert report.indexed == len(uuids)
    assert report.skipped == []
    assert report.storage == str(project / "storage")
    after = {uuid: Index.get().find(uuid) for uuid in uuids}
    # Row-equivalent: identity, config, predicate, status, timestamps and location.
    assert after == before
    assert Index.get().count() == len(uuids)

    # The user sees the same runs: cached, same results, nothing recomputed.
    assert calls(project) == uuids[:4]
    assert get("optimize", {"lr": 0.5}).cached()
    assert get("optimize", {"lr": 0.5}).loss() == pytest.approx(1 / 51)
    assert sorted(r.uuid for r in get("optimize").all()) == sorted(uuids[:4] + [started.uuid])
    with Scope({"seed": 3}):
        assert [r.uuid for r in get("optimize").all()] == [uuids[3]]
    assert not get("failing", {"when": 1}).cached()


def test_reindex_of_another_storage_keeps_its_location(project: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "data" / "experiments"
    with Storage(elsewhere):
        run = get("optimize", {"lr": 0.25}).launch()
    local = get("optimize", {"lr": 0.5}).launch()
    before = Index.get().find(run.uuid)
    assert before.directories == (str(elsewhere / run.uuid),)

    wipe_index(project)
    with Storage(elsewhere):
        report = Index.get().reindex()
    assert report.indexed == 1
    assert Index.get().find(run.uuid) == before
    # Only the storage that was reindexed came back.
    assert Index.get().find(local.uuid) is None

    Index.get().reindex(project / "storage")
    assert Index.get().find(local.uuid) is not None
    assert Index.get().local_directory(run.uuid) == elsewhere / run.uuid


def test_reindex_never_imports_user_code(project: Path) -> None:
    write_module(project, "noisy", NOISY)
    marker = project / "imported.marker"
    launched = run_python(
        """
        from machinable import get
        for n in range(3):
            print(get("noisy", {"n": n}).launch().uuid)
        """,
        cwd=project,
    )
    uuids = launched.stdout.split()
    assert marker.read_text() == "imported\n"  # the module really does write on import
    marker.unlink()
    wipe_index(project)

    result = run_python(
        """
        import sys
        from machinable import Index
        report = Index.get().reindex()
        print(report.indexed, len(report.skipped))
        print(sorted(r.uuid for r in Index.get().runs()))
        print(any(name.endswith(".noisy") or name == "noisy" for name in sys.modules))
        """,
        cwd=project,
    )
    indexed, listing, imported = result.stdout.splitlines()
    assert indexed == "3 0"
    assert listing == repr(sorted(uuids))
    assert imported == "False"
    assert not marker.exists()


def _corrupt(storage: Path, uuids: list[str]) -> dict[str, str]:
    """Break five directories five ways; returns {path that reindex sees: what was done}."""
    truncated, bad_id, missing_id, renamed, disagree = uuids
    model = storage / truncated / "model.json"
    model.write_bytes(model.read_bytes()[:25])
    (storage / bad_id / "id.json").write_text("{not json")
    (storage / missing_id / "id.json").unlink()
    other = "f" * 32
    (storage / renamed).rename(storage / other)
    header = json.loads((storage / disagree / "id.json").read_text())
    header["project"] = "someone-else"
    (storage / disagree / "id.json").write_text(json.dumps(header))
    return {
        str(storage / truncated): "model.json",
        str(storage / bad_id): "id.json",
        str(storage / missing_id): "id.json",
        str(storage / other): renamed,
        str(storage / disagree): "someone-else",
    }


def test_reindex_reports_bad_directories_and_indexes_the_rest(project: Path) -> None:
    uuids = launch_lrs(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
    good = uuids[5:]
    storage = project / "storage"
    broken = _corrupt(storage, uuids[:5])
    (storage / "notes").mkdir()  # a stray folder that is no run at all

    wipe_index(project)
    report = Index.get().reindex()

    assert report.indexed == 2
    assert sorted(r.uuid for r in Index.get().runs()) == sorted(good)
    skipped = dict(report.skipped)
    assert set(skipped) == set(broken) | {str(storage / "notes")}
    reasons = {path: skipped[path] for path in broken}
    assert "missing" in reasons[str(storage / uuids[2])]
    assert "id.json" in reasons[str(storage / uuids[2])]
    # The renamed directory: the reason names both the directory name and the uuid inside.
    renamed = reasons[str(storage / ("f" * 32))]
    assert "f" * 32 in renamed and uuids[3] in renamed
    # id.json and model.json disagree: detected by rehashing model.json.
    assert uuids[4] in reasons[str(storage / uuids[4])]
    # Unreadable JSON: the reason says which header file is broken.
    assert "model.json" in reasons[str(storage / uuids[0])]
    assert "id.json" in reasons[str(storage / uuids[1])]
    for path, reason in report.skipped:
        assert reason.strip(), path
    # The printed report lists every skipped directory with its reason.
    text = str(report)
    for path in broken:
        assert f"skipped {path}: {skipped[path]}" in text
    # The broken runs are simply not indexed; the good ones still work.
    for uuid in uuids[:5]:
        assert Index.get().find(uuid) is None
    assert get("optimize", {"lr": 0.6}).cached()


def test_reindex_with_an_index_still_present_drops_only_what_is_gone(project: Path) -> None:
    keep, gone = launch_lrs(0.5, 1.0)
    shutil.rmtree(project / "storage" / gone)

    report = Index.get().reindex()

    assert report.removed == 1
    assert Index.get().find(gone) is None
    assert Index.get().find(keep) is not None
    assert [r.uuid for r in get("optimize").all()] == [keep]
    assert not get("optimize", {"lr": 1.0}).cached()


def test_reindex_keeps_locations_in_other_storages(project: Path, tmp_path: Path) -> None:
    run = get("optimize", {"lr": 0.5}).launch()
    copy = tmp_path / "backup" / run.uuid
    shutil.copytree(project / "storage" / run.uuid, copy)
    Index.get().ingest_directory(copy)
    shutil.rmtree(project / "storage" / run.uuid)

    # The storage is now empty: reindex refuses that unless told the runs are gone.
    report = Index.get().reindex(allow_empty=True)

    assert report.removed == 0  # the run is still somewhere
    record = Index.get().find(run.uuid)
    assert record.directories == (str(copy),)
    assert Index.get().local_directory(run.uuid) == copy


def test_reindex_with_the_index_present_picks_up_changed_status(project: Path) -> None:
    run = get("optimize", {"lr": 0.5})
    directory = project / "storage" / run.uuid
    header, model = run._headers()
    write_record(directory, header, model)
    mark(directory, "started_at")
    Index.get().reindex()
    assert Index.get().find(run.uuid).status == "started"

    # The run finishes elsewhere (another machine wrote into the shared folder).
    (directory / "result.json").write_text('{"loss": 0.25}')
    mark(directory, "finished_at")
    report = Index.get().reindex()

    assert report.indexed == 1
    record = Index.get().find(run.uuid)
    assert record.status == "finished" and record.finished_at is not None
    assert get("optimize", {"lr": 0.5}).cached()
    assert get("optimize", {"lr": 0.5}).loss() == 0.25
    assert calls(project) == []


def test_reindex_twice_is_idempotent(project: Path) -> None:
    launch_lrs(0.5, 1.0)
    Index.get().reindex()
    runs, locations = table_rows("runs"), table_rows("locations")
    report = Index.get().reindex()
    assert report.indexed == 2 and report.removed == 0
    assert table_rows("runs") == runs
    assert table_rows("locations") == locations


def test_reindex_of_a_missing_storage_is_refused_and_changes_nothing(project: Path, tmp_path: Path) -> None:
    run = get("optimize", {"lr": 0.5}).launch()
    with pytest.raises(FileNotFoundError, match="does-not-exist does not exist"):
        Index.get().reindex(tmp_path / "does-not-exist")  # a mistyped path, most likely
    assert Index.get().find(run.uuid) is not None


# --------------------------------------------------------------------------- ingest


def test_ingest_a_collaborators_copy_where_it_lies(
    project: Path, tmp_path: Path, index_backend: str, fresh_index
) -> None:
    # A collaborator computes the run in their own checkout of the same project, with
    # their own index (the checkout's SQLite file, or their own PostgreSQL schema)...
    theirs = tmp_path / "collaborator" / "study"
    shutil.copytree(project, theirs)
    own_index = {"MACHINABLE_INDEX": fresh_index("collaborator").url} if index_backend == "postgresql" else None
    result = run_python(
        'from machinable import get\nprint(get("optimize", {"lr": 0.5}).launch().uuid)',
        cwd=theirs,
        env=own_index,
    )
    uuid = result.stdout.strip()
    # ...and sends the results folder, which lands somewhere outside our storage.
    inbox = tmp_path / "inbox" / uuid
    shutil.copytree(theirs / "storage" / uuid, inbox)

    record = Index.get().ingest_directory(inbox)

    assert record.uuid == uuid
    assert record.directories == (str(inbox),)
    assert record.status == "finished"
    run = get("optimize", {"lr": 0.5})
    assert run.uuid == uuid
    assert run.cached()
    assert run.local_directory() == inbox
    assert run.loss() == pytest.approx(1 / 51)
    run.launch()
    assert calls(project) == []  # nothing recomputed here
    assert not (project / "storage" / uuid).exists()

    # Ingesting again (also through a relative path) changes nothing.
    runs, locations = table_rows("runs"), table_rows("locations")
    again = Index.get().ingest_directory(os.path.relpath(inbox, project))
    assert again == record
    assert table_rows("runs") == runs
    assert len(table_rows("locations")) == 1
    assert table_rows("locations") == locations


def test_ingest_into_a_separate_index(project: Path, fresh_index) -> None:
    run = get("optimize", {"lr": 0.5}).launch()
    other = fresh_index("other")
    record = other.ingest_directory(project / "storage" / run.uuid)
    assert record == Index.get().find(run.uuid)
    assert other.count() == 1


def test_ingest_refuses_a_directory_that_is_not_a_record(project: Path, tmp_path: Path) -> None:
    run = get("optimize", {"lr": 0.5}).launch()
    runs = table_rows("runs")

    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(RecordError, match="not a machinable record"):
        Index.get().ingest_directory(plain)

    broken = tmp_path / "broken" / run.uuid
    shutil.copytree(project / "storage" / run.uuid, broken)
    (broken / "model.json").write_text('{"module": ')
    with pytest.raises(RecordError, match="model.json"):
        Index.get().ingest_directory(broken)

    assert table_rows("runs") == runs
    assert len(table_rows("locations")) == 1


def _claim_uuid_for_another_module(index: Index, uuid: str, directory: Path) -> None:
    """Write a row with ``uuid`` but a different identity straight through the ORM."""
    engine = index.engine
    now = datetime.now(timezone.utc)
    with Session(engine) as session, session.begin():
        session.add(
            Run(
                uuid=uuid,
                project="study",
                module="someone_elses_module",
                config_key="0" * 32,
                predicate_key="0" * 32,
                config={"x": 1},
                canonical={"x": 1},
                predicate={},
                version=[{"x": 1}],
                status="finished",
                created_at=now,
                finished_at=now,
            )
        )
        session.add(Location(run_uuid=uuid, storage=str(directory.parent), directory=str(directory)))


def test_ingest_of_a_colliding_uuid_raises_and_changes_nothing(
    project: Path, tmp_path: Path, fresh_index
) -> None:
    run = get("optimize", {"lr": 0.5}).launch()
    source = project / "storage" / run.uuid
    copy = tmp_path / "copy" / run.uuid
    shutil.copytree(source, copy)

    # A fresh index in which the uuid already names another module's run.
    index = fresh_index("collide")
    assert index.count() == 0  # creates the schema
    squatter = tmp_path / "squatter" / run.uuid
    _claim_uuid_for_another_module(index, run.uuid, squatter)
    before = index.find(run.uuid)
    runs, locations = table_rows("runs", index), table_rows("locations", index)

    with pytest.raises(IdentityCollision) as caught:
        index.ingest_directory(copy)

    assert caught.value.uuid == run.uuid
    assert "module" in str(caught.value) and run.uuid in str(caught.value)
    assert index.find(run.uuid) == before
    assert index.find(run.uuid).module == "someone_elses_module"
    assert table_rows("runs", index) == runs
    assert table_rows("locations", index) == locations

    # Reindexing a storage holding the disagreeing directory skips it with that reason.
    report = index.reindex(copy.parent)
    assert report.indexed == 0
    assert [path for path, _ in report.skipped] == [str(copy)]
    assert "module" in report.skipped[0][1]
    assert index.find(run.uuid) == before


# --------------------------------------------------------------------------- round trip

FLAKY = """
from pathlib import Path
from pydantic import BaseModel
from machinable import Interface


class Flaky(Interface):
    class Config(BaseModel):
        x: float = 0.0

    def __call__(self):
        if Path(self.project.path, "fail.marker").exists():
            raise RuntimeError("flaky")
        self.save_file("out.json", {"x": self.config.x})
"""


@pytest.mark.parametrize("value", [1e16, 1e300, -0.0])
def test_a_failed_run_found_through_the_index_relaunches(
    project: Path, value: float
) -> None:
    """A run hydrated from the index names the same record as the one get() makes.

    On PostgreSQL the config columns are jsonb, which keeps numbers as ``numeric``:
    1e16 comes back as the int 10000000000000000. The hydrated run must still relaunch
    the same record, with the float value its Config declares.
    """
    write_module(project, "flaky", FLAKY)
    marker = project / "fail.marker"
    marker.touch()
    run = get("flaky", {"x": value})
    with pytest.raises(RuntimeError, match="flaky"):
        run.launch()
    marker.unlink()

    [found] = [r for r in get("flaky").all() if r.uuid == run.uuid]
    found.launch()
    assert Index.get().find(run.uuid).status == "finished"
    # jsonb keeps numbers as numeric: 1e16 may come back as an int and -0.0 as 0; the
    # value is the same number and the run the same record
    assert isinstance(found.config.x, float) and found.config.x == value
    stored = Index.get().find(run.uuid).canonical.get("x", 0.0)
    assert float(stored) == value
    assert get("flaky", {"x": value}).cached()


@pytest.mark.parametrize("parallel", [False, True])
def test_a_large_reindex_writes_in_batches_with_the_same_result(
    project: Path, monkeypatch: pytest.MonkeyPatch, parallel: bool
) -> None:
    """Reindex streams: small chunks and batches (as a million runs would use) give the
    same rows, leaves and locations as one pass, into an empty index and an existing one,
    and stale rows still go."""
    import machinable.catalog.index as catalog_index

    uuids = launch_lrs(*(0.1 * i for i in range(1, 12)))
    expected = {table: table_rows(table) for table in ("runs", "leaves", "locations")}
    monkeypatch.setattr(catalog_index, "SCAN_CHUNK", 2)
    monkeypatch.setattr(catalog_index, "WRITE_BATCH", 3)
    if parallel:  # the process-pool scan, with at most a few chunks in flight
        monkeypatch.setattr(catalog_index, "PARALLEL_SCAN_MIN", 1)
    writes: list[list] = []  # [connection, runs written in its transaction]
    original = Index._write_batch

    def counting(self, conn, root, rows, *args):  # type: ignore[no-untyped-def]
        if not writes or writes[-1][0] is not conn:
            writes.append([conn, 0])
        writes[-1][1] += len(rows)
        return original(self, conn, root, rows, *args)

    monkeypatch.setattr(Index, "_write_batch", counting)
    wipe_index(project)
    report = Index.get().reindex()
    assert report.added == 11 and report.indexed == 11
    batches = [count for _, count in writes]
    # one transaction per batch of 3 or 4 runs (chunks of 2), written as the chunks come
    assert sum(batches) == 11 and max(batches) <= 4 and len([b for b in batches if b]) == 3

    def without_ids(rows: list[tuple]) -> list[tuple]:  # (run, storage, directory): launch records no mtime
        return sorted(row[1:4] for row in rows)

    assert table_rows("runs") == expected["runs"] and table_rows("leaves") == expected["leaves"]
    assert without_ids(table_rows("locations")) == without_ids(expected["locations"])
    shutil.rmtree(project / "storage" / uuids[0])
    again = Index.get().reindex(full=True)
    assert (again.updated, again.removed, again.added) == (10, 1, 0)
    assert Index.get().count() == 10 and all(row[0] != uuids[0] for row in table_rows("leaves"))


def _refuse_locations(index: Index, refuse: bool) -> None:
    """A real trigger in the index that makes every new location row fail (or drops it)."""
    with index.engine.begin() as conn:
        if index.dialect == "sqlite":
            conn.exec_driver_sql("DROP TRIGGER IF EXISTS refuse_location")
            if refuse:
                conn.exec_driver_sql(
                    "CREATE TRIGGER refuse_location BEFORE INSERT ON locations "
                    "BEGIN SELECT RAISE(ABORT, 'locations refused'); END"
                )
        else:
            conn.exec_driver_sql("DROP TRIGGER IF EXISTS refuse_location ON locations")
            if refuse:
                conn.exec_driver_sql(
                    "CREATE OR REPLACE FUNCTION refuse_location() RETURNS trigger AS "
                    "$$ BEGIN RAISE EXCEPTION 'locations refused'; END $$ LANGUAGE plpgsql"
                )
                conn.exec_driver_sql(
                    "CREATE TRIGGER refuse_location BEFORE INSERT ON locations "
                    "FOR EACH ROW EXECUTE FUNCTION refuse_location()"
                )


def test_a_refused_index_write_leaves_no_part_of_the_run_and_a_relaunch_takes_it_in(project: Path) -> None:
    """The run row, its leaves and its location are one transaction: when the last of
    them is refused, none is kept, the error names the index, and the finished directory
    is taken in by the next launch without computing again."""
    from machinable.errors import IndexError_

    get("optimize", {"lr": 0.2}).launch()  # creates the index
    index = Index.get()
    _refuse_locations(index, True)
    run = get("optimize", {"lr": 0.3})
    with pytest.raises(IndexError_, match="locations refused"):
        run.launch()
    assert index.status(run.uuid) is None
    assert not [row for row in table_rows("runs") if run.uuid in row]
    assert not [row for row in table_rows("leaves") if run.uuid in row]
    assert (run.local_directory() / "finished_at").is_file()
    assert calls(project) == [get("optimize", {"lr": 0.2}).uuid, run.uuid]

    _refuse_locations(index, False)
    get("optimize", {"lr": 0.3}).launch()
    assert calls(project).count(run.uuid) == 1  # not computed again
    assert index.status(run.uuid) == "finished"
    assert len([row for row in table_rows("leaves") if run.uuid in row]) == 2  # lr and steps
