"""Index recovery: large storages scanned in parallel, lost data computed again."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import machinable.catalog.index as index_module
from machinable import Index, get

from conftest import wipe_index


def rows() -> list:
    return sorted(Index.get().runs(), key=lambda record: record.uuid)


def test_parallel_scan_gives_the_same_rows_as_a_serial_one(project: Path, monkeypatch: pytest.MonkeyPatch):
    for lr in range(12):
        get("optimize", {"lr": lr / 10}).launch()
    broken = project / "storage" / ("b" * 32)
    broken.mkdir()
    (broken / ".machinable").touch()
    (broken / "id.json").write_text("{not json")
    shutil.copytree(project / "storage" / get("optimize", {"lr": 0.5}).uuid, project / "storage" / ("c" * 32))
    before = rows()

    monkeypatch.setattr(index_module, "SCAN_CHUNK", 3)
    monkeypatch.setattr(index_module, "PARALLEL_SCAN_MIN", 5)
    wipe_index(project)
    report = Index.get().reindex()
    assert report.added == 12
    assert sorted(path.rsplit("/", 1)[-1] for path, _ in report.skipped) == ["b" * 32, "c" * 32]
    assert rows() == before

    again = Index.get().reindex()
    assert again.unchanged + again.updated == 12 and again.added == 0


def test_a_finished_run_whose_data_is_gone_everywhere_is_computed_again(project: Path):
    from conftest import calls

    run = get("optimize", {"lr": 0.3})
    run.launch()
    shutil.rmtree(run.local_directory())  # lost: no other location, no store copy
    assert Index.get().find(run.uuid).status == "finished"
    assert not run.cached()
    run.launch()
    assert calls(project).count(run.uuid) == 2
    assert run.cached() and run.loss() == pytest.approx(1 / (1 + 0.3 * 100))


def test_an_index_file_deleted_while_the_process_runs_is_noticed(sqlite_project: Path):
    """The process's connections still reach the deleted file; writes must go to the new one."""
    from conftest import run_python

    run = get("optimize", {"lr": 0.3}).launch()
    path = Index.get().path
    assert Index.get().find(run.uuid) is not None
    for suffix in ("", "-wal", "-shm"):  # as a user would: rm .machinable.sqlite*
        Path(f"{path}{suffix}").unlink(missing_ok=True)

    assert Index.get().find(run.uuid) is None  # the file at the path, not the deleted one
    report = Index.get().reindex()
    assert report.added == 1
    assert path.exists()
    result = run_python(
        f"""
        from machinable import Index
        print(Index.get().find({run.uuid!r}).status)
        """,
        cwd=sqlite_project,
    )
    assert result.stdout.split() == ["finished"]


def test_an_index_file_replaced_while_the_process_runs_is_opened_again(sqlite_project: Path, tmp_path: Path):
    from machinable.catalog.engine import get_engine

    ours = get("optimize", {"lr": 0.3}).launch()
    path = Index.get().path
    other = Index(tmp_path / "other.sqlite")
    with other:
        theirs = get("optimize", {"lr": 0.7}).launch()
    get_engine(other.resolved_url).dispose()  # its last connection closes: the WAL is folded in
    shutil.move(tmp_path / "other.sqlite", path)  # mv other.sqlite .machinable.sqlite

    assert Index.get().find(theirs.uuid) is not None
    assert Index.get().find(ours.uuid) is None
    Index.get().reindex()
    assert Index.get().find(ours.uuid) is not None


def test_incremental_reindex_does_not_read_unchanged_directories(project: Path) -> None:
    """Directories older than the 2-second guard whose mtime the index remembers are
    not read again: a header corrupted in place (which leaves the directory's mtime as
    it was) goes unnoticed by an incremental pass, is noticed in a changed directory,
    and by a full pass."""
    import os
    import time

    runs = [get("optimize", {"lr": lr}).launch() for lr in (0.1, 0.2, 0.3)]
    hour_ago = time.time_ns() - 3600 * 10**9
    for run in runs:
        os.utime(run.local_directory(), ns=(hour_ago, hour_ago))
    first = Index.get().reindex()
    assert first.indexed == 3 and first.unchanged == 0  # launch left no trusted mtime
    second = Index.get().reindex()
    assert second.unchanged == 3 and second.added == second.updated == 0

    untouched, changed, _ = runs
    for run in (untouched, changed):
        with open(run.local_directory() / "model.json", "r+b") as handle:  # in place
            handle.write(b"\x00garbage")
    (changed.local_directory() / "notes.txt").write_text("a new entry bumps the mtime")
    assert os.stat(untouched.local_directory()).st_mtime_ns == hour_ago

    report = Index.get().reindex()
    assert report.unchanged == 2  # the untouched one was not read: its corruption unseen
    assert [os.path.basename(path) for path, _ in report.skipped] == [changed.uuid]
    assert Index.get().status(untouched.uuid) == "finished"

    full = Index.get().reindex(full=True)
    assert sorted(os.path.basename(path) for path, _ in full.skipped) == sorted([untouched.uuid, changed.uuid])
