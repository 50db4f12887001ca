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
