"""The record directory: layout, file formats, atomic writes, failed runs, path escapes."""

from __future__ import annotations

import json
import os
import pickle
from datetime import datetime
from pathlib import Path

import numpy
import pytest

from machinable import get
from machinable.errors import PathEscapeError

from conftest import calls, run_python, write_module

FLAKY = """
from pydantic import BaseModel
from machinable import Interface


class Flaky(Interface):
    class Config(BaseModel):
        step: int = 7

    def __call__(self):
        with open(self.project.path / "calls.txt", "a") as handle:
            handle.write(self.uuid + "\\n")
        self.save_file("partial.txt", "half done")
        if (self.project.path / "fail").exists():
            raise RuntimeError(f"diverged at step {self.config.step}")
        self.save_file("result.json", {"ok": True})
"""


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def parse(marker: Path) -> datetime:
    moment = datetime.fromisoformat(marker.read_text().strip())
    assert moment.tzinfo is not None
    return moment


@pytest.fixture
def run(project: Path):
    return get("optimize", {"lr": 0.5}).launch()


# layout


def test_record_directory_layout(project: Path, run) -> None:
    directory = run.local_directory()
    assert directory == project / "storage" / run.uuid
    entries = set(os.listdir(directory))
    assert entries == {
        ".machinable",
        "id.json",
        "model.json",
        "started_at",
        "finished_at",
        "updated_at",
        "result.json",
    }
    assert (directory / ".machinable").is_file()
    assert not any(name.endswith(".tmp") for name in os.listdir(directory))

    header = json.loads((directory / "id.json").read_text())
    assert header["uuid"] == run.uuid
    assert header["project"] == "study"
    assert header["module"] == "optimize"
    assert {"format", "config_key", "predicate_key"} <= set(header)

    model = json.loads((directory / "model.json").read_text())
    assert model["module"] == "optimize"
    assert model["config"] == {"lr": 0.5, "steps": 100}
    assert model["version"] == [{"lr": 0.5}]
    assert model["predicate"] == {}
    created = datetime.fromisoformat(model["created_at"])

    started = parse(directory / "started_at")
    finished = parse(directory / "finished_at")
    assert created <= started <= finished
    assert parse(directory / "updated_at") == finished
    assert json.loads((directory / "result.json").read_text()) == {"loss": pytest.approx(1 / 51)}


def test_headers_are_not_rewritten_by_a_relaunch(project: Path, run) -> None:
    directory = run.local_directory()
    before = {name: (directory / name).read_bytes() for name in ("id.json", "model.json")}
    get("optimize", {"lr": 0.5}).launch()
    run_python('from machinable import get\nget("optimize", {"lr": 0.5}).launch()\n', cwd=project)
    assert {name: (directory / name).read_bytes() for name in before} == before


def test_version_records_what_the_user_passed(project: Path) -> None:
    run = get("optimize", [{"lr": 0.5}, {"steps": 3}]).launch()
    model = json.loads((run.local_directory() / "model.json").read_text())
    assert model["version"] == [{"lr": 0.5}, {"steps": 3}]
    assert model["config"] == {"lr": 0.5, "steps": 3}
    assert get("optimize", {"lr": 0.5, "steps": 3}).uuid == run.uuid


# save_file / load_file


def test_json_jsonl_text_and_other_extensions(run) -> None:
    directory = run.local_directory()
    data = {"a": [1, 2.5, None], "b": "ü"}
    run.save_file("data.json", data)
    assert json.loads((directory / "data.json").read_text(encoding="utf-8")) == data
    assert run.load_file("data.json") == data

    rows = [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]
    run.save_file("log.jsonl", rows)
    lines = (directory / "log.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == rows
    assert run.load_file("log.jsonl") == rows

    run.save_file("notes.txt", "line one\nline two")
    assert (directory / "notes.txt").read_text() == "line one\nline two"
    assert run.load_file("notes.txt") == "line one\nline two"

    run.save_file("table.csv", "a,b\n1,2\n")
    assert (directory / "table.csv").read_text() == "a,b\n1,2\n"
    assert run.load_file("table.csv") == "a,b\n1,2\n"

    run.save_file("count.md", 42)
    assert (directory / "count.md").read_text() == "42"
    assert run.load_file("count.md") == "42"


def test_pickle_and_numpy(run) -> None:
    directory = run.local_directory()
    value = {"set": {1, 2}, "tuple": (1, "x"), "when": datetime(2024, 1, 2, 3, 4)}
    run.save_file("state.p", value)
    assert pickle.loads((directory / "state.p").read_bytes()) == value
    assert run.load_file("state.p") == value

    array = numpy.arange(12, dtype=numpy.float32).reshape(3, 4)
    run.save_file("weights.npy", array)
    on_disk = numpy.load(directory / "weights.npy")
    assert on_disk.dtype == numpy.float32
    numpy.testing.assert_array_equal(on_disk, array)
    loaded = run.load_file("weights.npy")
    assert loaded.dtype == numpy.float32 and loaded.shape == (3, 4)
    numpy.testing.assert_array_equal(loaded, array)


def test_nested_names_create_folders(run) -> None:
    directory = run.local_directory()
    run.save_file("plots/epoch_1/curve.json", [1, 2, 3])
    assert (directory / "plots" / "epoch_1").is_dir()
    assert json.loads((directory / "plots" / "epoch_1" / "curve.json").read_text()) == [1, 2, 3]
    assert run.load_file("plots/epoch_1/curve.json") == [1, 2, 3]


def test_load_file_default_for_missing_files(run) -> None:
    assert run.load_file("missing.json") is None
    assert run.load_file("missing.json", {"fallback": 1}) == {"fallback": 1}
    assert run.load_file("no/such/folder.txt", "x") == "x"


def test_files_are_read_back_in_a_fresh_process(project: Path, run) -> None:
    run.save_file("weights.npy", numpy.ones(3))
    run.save_file("meta/info.json", {"k": "v"})
    out = run_python(
        """
        import json
        from machinable import get
        run = get("optimize", {"lr": 0.5})
        print(json.dumps([run.load_file("meta/info.json"), run.load_file("weights.npy").tolist()]))
        """,
        cwd=project,
    )
    assert json.loads(out.stdout) == [{"k": "v"}, [1.0, 1.0, 1.0]]


# atomic writes


def test_overwrite_replaces_the_file_atomically(run) -> None:
    directory = run.local_directory()
    run.save_file("data.txt", "old " * 1000)
    with open(directory / "data.txt") as reader:
        run.save_file("data.txt", "new")
        # An open reader keeps the complete old file: the new one was renamed into
        # place, never written over the old bytes.
        assert reader.read() == "old " * 1000
    assert run.load_file("data.txt") == "new"
    assert not [name for name in files(directory) if name.endswith(".tmp")]


def test_failed_write_leaves_no_partial_file(run) -> None:
    directory = run.local_directory()
    run.save_file("data.json", {"v": 1})
    with pytest.raises(TypeError):
        run.save_file("data.json", {"v": object()})
    assert run.load_file("data.json") == {"v": 1}

    (directory / "taken.txt").mkdir()
    with pytest.raises(OSError):
        run.save_file("taken.txt", "text")
    assert (directory / "taken.txt").is_dir()
    assert not [name for name in files(directory) if name.endswith(".tmp")]


def test_save_file_refuses_machinable_own_files(run) -> None:
    directory = run.local_directory()
    before = {name: (directory / name).read_bytes() for name in ("id.json", "model.json", "finished_at")}
    for name in before:
        with pytest.raises(PathEscapeError):
            run.save_file(name, {"forged": True})
    assert {name: (directory / name).read_bytes() for name in before} == before


def test_save_file_before_launch_is_an_error(project: Path) -> None:
    run = get("optimize", {"lr": 0.9})
    with pytest.raises(Exception, match="launch"):
        run.save_file("x.txt", "x")
    assert not (project / "storage" / run.uuid).exists()


# path escapes


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.txt").write_text("secret")
    return folder


@pytest.mark.parametrize("name", ["../x.txt", "../../x.txt", "a/../../x.txt", "sub/../../../x.txt"])
def test_relative_escapes_are_refused(run, outside: Path, name: str) -> None:
    directory = run.local_directory()
    before_run, before_storage = files(directory), files(directory.parent.parent)
    with pytest.raises(PathEscapeError):
        run.save_file(name, "pwned")
    with pytest.raises(PathEscapeError):
        run.load_file(name)
    assert files(directory) == before_run
    assert files(directory.parent.parent) == before_storage
    assert files(outside) == {"secret.txt"}


def test_absolute_names_are_refused(run, outside: Path) -> None:
    directory = run.local_directory()
    before = files(directory)
    target = outside / "x.txt"
    with pytest.raises(PathEscapeError):
        run.save_file(str(target), "pwned")
    with pytest.raises(PathEscapeError):
        run.load_file(str(outside / "secret.txt"))
    with pytest.raises(PathEscapeError):
        run.save_file(str(directory / "inside.txt"), "absolute even if inside")
    assert not target.exists()
    assert files(outside) == {"secret.txt"}
    assert files(directory) == before


def test_symlinked_folder_pointing_outside_is_refused(run, outside: Path) -> None:
    directory = run.local_directory()
    (directory / "link").symlink_to(outside, target_is_directory=True)
    before = files(directory)
    with pytest.raises(PathEscapeError):
        run.save_file("link/x.txt", "pwned")
    with pytest.raises(PathEscapeError):
        run.save_file("link/new/deeper.txt", "pwned")
    with pytest.raises(PathEscapeError):
        run.load_file("link/secret.txt")
    assert files(outside) == {"secret.txt"}
    assert files(directory) == before


def test_symlinked_file_pointing_outside_is_refused(run, outside: Path) -> None:
    directory = run.local_directory()
    (directory / "alias.txt").symlink_to(outside / "secret.txt")
    with pytest.raises(PathEscapeError):
        run.save_file("alias.txt", "pwned")
    with pytest.raises(PathEscapeError):
        run.load_file("alias.txt")
    assert (outside / "secret.txt").read_text() == "secret"


# failed runs


def test_failed_run_is_recorded_and_relaunch_runs_again(project: Path) -> None:
    write_module(project, "flaky", FLAKY)
    (project / "fail").touch()
    run = get("flaky")
    with pytest.raises(RuntimeError, match="diverged at step 7"):
        run.launch()
    directory = run.local_directory()
    assert (directory / "failed_at").is_file()
    parse(directory / "failed_at")
    assert not (directory / "finished_at").exists()
    error = (directory / "error.txt").read_text()
    assert "RuntimeError" in error and "diverged at step 7" in error
    assert run.load_file("partial.txt") == "half done"
    assert not run.cached()
    assert run.status() == "failed"
    assert run.is_mounted()
    assert calls(project) == [run.uuid]

    with pytest.raises(RuntimeError):
        get("flaky").launch()
    assert calls(project) == [run.uuid] * 2

    (project / "fail").unlink()
    get("flaky").launch()
    assert calls(project) == [run.uuid] * 3
    assert run.cached()
    assert run.status() == "finished"
    assert (directory / "finished_at").is_file()
    assert not (directory / "failed_at").exists()
    assert not (directory / "error.txt").exists()
    assert run.load_file("result.json") == {"ok": True}
    get("flaky").launch()
    assert calls(project) == [run.uuid] * 3


def test_failed_run_is_retried_by_a_fresh_process(project: Path) -> None:
    write_module(project, "flaky", FLAKY)
    (project / "fail").touch()
    run = get("flaky", {"step": 3})
    with pytest.raises(RuntimeError):
        run.launch()
    (project / "fail").unlink()
    out = run_python(
        """
        from machinable import get
        run = get("flaky", {"step": 3})
        print(run.status(), run.cached())
        run.launch()
        print(run.status(), run.cached())
        """,
        cwd=project,
    )
    assert out.stdout.split() == ["failed", "False", "finished", "True"]
    assert calls(project) == [run.uuid] * 2
    assert run.cached()
