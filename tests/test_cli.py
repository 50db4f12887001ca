"""The ``machinable`` command: get/launch/methods, storage options, reindex, ls, version,
one-line errors and help. Most tests drive the click app in-process with CliRunner;
two run the real entry points (``python -m machinable`` and the console script)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import click
import pytest
from sqlalchemy import create_engine, text

import machinable
from machinable import Index, get
from machinable.catalog.engine import dispose_all
from machinable.cli import cli

from conftest import (
    calls,
    index_url,
    invoke,
    one_line_error,
    postgres_schema,
    wipe_index,
    write_module,
)

TRAIN = """
from pydantic import BaseModel
from machinable import Interface


class Optimizer(BaseModel):
    name: str = "sgd"
    beta: float = 0.0
    schedule: list[int] = []


class Train(Interface):
    class Config(BaseModel):
        optimizer: Optimizer = Optimizer()
        epochs: int = 1
        tag: str = "none"
        flags: dict[str, bool] = {}

    def __call__(self):
        self.save_file("config.json", self.config.model_dump())

    def settings(self):
        return self.config.model_dump()

    def nothing(self):
        return None
"""

LOSS = 1 / (1 + 0.5 * 100)




# --------------------------------------------------------------------------- get


def test_get_launch_and_call_a_method(project: Path) -> None:
    result = invoke("get", "optimize", "lr=0.5", "--launch", "--loss")

    uuid = get("optimize", {"lr": 0.5}).uuid
    status_line, loss_line = result.stdout.strip().splitlines()
    assert status_line.split() == [uuid, "finished", str(project / "storage" / uuid)]
    assert float(loss_line) == pytest.approx(LOSS)
    assert calls(project) == [uuid]

    # Launching again is a no-op; the method still answers.
    again = invoke("get", "optimize", "lr=0.5", "--launch", "--loss")
    assert float(again.stdout.strip().splitlines()[-1]) == pytest.approx(LOSS)
    assert calls(project) == [uuid]
    assert get("optimize", {"lr": 0.5}).cached()


def test_get_without_methods_names_the_run_and_writes_nothing(project: Path) -> None:
    result = invoke("get", "optimize", "lr=0.5")
    uuid = get("optimize", {"lr": 0.5}).uuid
    assert result.stdout.split() == [uuid, "optimize", "new", str(project / "storage" / uuid)]
    assert not (project / "storage").exists()
    assert calls(project) == []


def test_dotted_keys_nest(project: Path) -> None:
    write_module(project, "train", TRAIN)
    result = invoke(
        "get", "train", "optimizer.name=adam", "optimizer.beta=0.9", "epochs=3", "--settings"
    )
    assert json.loads(result.stdout) == {
        "optimizer": {"name": "adam", "beta": 0.9, "schedule": []},
        "epochs": 3,
        "tag": "none",
        "flags": {},
    }
    # The CLI names the same run as the Python API with a nested dict.
    named = invoke("get", "train", "optimizer.name=adam", "optimizer.beta=0.9", "epochs=3")
    expected = get("train", {"optimizer": {"name": "adam", "beta": 0.9}, "epochs": 3}).uuid
    assert named.stdout.split()[0] == expected


def test_values_parse_as_json_where_they_can_else_as_strings(project: Path) -> None:
    write_module(project, "train", TRAIN)
    result = invoke(
        "get",
        "train",
        "optimizer.schedule=[1, 2, 3]",
        'flags={"fast": true}',
        "tag=v1.0-rc",
        "optimizer.name=adam w",
        "--settings",
    )
    settings = json.loads(result.stdout)
    assert settings["optimizer"]["schedule"] == [1, 2, 3]
    assert settings["flags"] == {"fast": True}
    assert settings["tag"] == "v1.0-rc"
    assert settings["optimizer"]["name"] == "adam w"

    # A quoted JSON string stays a string even when it looks like a number.
    quoted = invoke("get", "train", 'tag="5"', "--settings")
    assert json.loads(quoted.stdout)["tag"] == "5"
    # 1 and 1.0 name the same run of a float field.
    one = invoke("get", "optimize", "lr=1").stdout.split()[0]
    one_float = invoke("get", "optimize", "lr=1.0").stdout.split()[0]
    assert one == one_float == get("optimize", {"lr": 1.0}).uuid


def test_a_method_returning_none_prints_nothing(project: Path) -> None:
    write_module(project, "train", TRAIN)
    result = invoke("get", "train", "--nothing")
    assert result.stdout == ""


# --------------------------------------------------------------------------- storage


def test_storage_option_puts_runs_there(project: Path, tmp_path: Path) -> None:
    target = tmp_path / "experiments"
    result = invoke("--storage", str(target), "get", "optimize", "lr=0.5", "--launch", "--loss")
    uuid = get("optimize", {"lr": 0.5}).uuid
    assert (target / uuid / "result.json").is_file()
    assert not (project / "storage").exists()
    assert float(result.stdout.splitlines()[-1]) == pytest.approx(LOSS)
    assert Index.get().local_directory(uuid) == target / uuid

    # A relative --storage resolves against the project.
    invoke("--storage", "results", "get", "optimize", "lr=1.0", "--launch")
    other = get("optimize", {"lr": 1.0}).uuid
    assert (project / "results" / other / "finished_at").is_file()


def test_machinable_storage_environment_variable(project: Path, tmp_path: Path) -> None:
    from_env = tmp_path / "from-env"
    invoke("get", "optimize", "lr=0.5", "--launch", env={"MACHINABLE_STORAGE": str(from_env)})
    uuid = get("optimize", {"lr": 0.5}).uuid
    assert (from_env / uuid / "result.json").is_file()
    assert not (project / "storage").exists()

    # An explicit --storage wins over the environment.
    explicit = tmp_path / "explicit"
    invoke(
        "--storage",
        str(explicit),
        "get",
        "optimize",
        "lr=1.0",
        "--launch",
        env={"MACHINABLE_STORAGE": str(from_env)},
    )
    assert (explicit / get("optimize", {"lr": 1.0}).uuid).is_dir()
    assert not (from_env / get("optimize", {"lr": 1.0}).uuid).exists()


def test_project_and_index_options_work_from_any_directory(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # --index wins over MACHINABLE_INDEX (set in the [postgresql] variant).
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    catalog = tmp_path / "catalog.sqlite"
    result = invoke(
        "--project", str(project), "--index", str(catalog), "get", "optimize", "lr=0.5", "--launch", "--loss"
    )
    assert float(result.stdout.splitlines()[-1]) == pytest.approx(LOSS)
    assert catalog.is_file()
    assert not (project / ".machinable.sqlite").exists()
    assert not (elsewhere / "storage").exists()
    [uuid] = calls(project)
    assert (project / "storage" / uuid / "result.json").is_file()
    listing = invoke("--project", str(project), "--index", str(catalog), "ls").stdout
    assert uuid in listing


# --------------------------------------------------------------------------- index


def test_reindex_after_deleting_the_index_brings_runs_back(project: Path) -> None:
    invoke("get", "optimize", "lr=0.5", "--launch")
    invoke("get", "optimize", "lr=1.0", "--launch")
    uuids = sorted(get("optimize", {"lr": lr}).uuid for lr in (0.5, 1.0))
    (project / "storage" / ("e" * 32)).mkdir()  # a bare folder: skipped, with a reason

    wipe_index(project)
    assert "0 run(s)" in invoke("ls").stderr

    result = invoke("reindex")
    assert "2 added" in result.stdout
    assert f"skipped {project / 'storage' / ('e' * 32)}: no .machinable sentinel" in result.stdout

    listing = invoke("ls").stdout
    for uuid in uuids:
        assert uuid in listing
    again = invoke("get", "optimize", "lr=0.5", "--launch", "--loss")
    assert float(again.stdout.splitlines()[-1]) == pytest.approx(LOSS)
    assert sorted(calls(project)) == uuids  # nothing was computed twice


def test_reindex_of_an_explicit_storage(project: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    invoke("--storage", str(target), "get", "optimize", "lr=0.5", "--launch")
    wipe_index(project)
    result = invoke("reindex", str(target))
    assert str(target) in result.stdout and "1 added" in result.stdout
    uuid = get("optimize", {"lr": 0.5}).uuid
    assert Index.get().local_directory(uuid) == target / uuid


def test_ls_lists_runs_with_full_uuids(project: Path) -> None:
    write_module(project, "train", TRAIN)
    invoke("get", "optimize", "lr=0.5", "--launch")
    invoke("get", "optimize", "lr=1.0", "--launch")
    invoke("get", "train", "epochs=2", "--launch")
    optimize = sorted(get("optimize", {"lr": lr}).uuid for lr in (0.5, 1.0))
    train = get("train", {"epochs": 2}).uuid

    everything = invoke("ls").stdout
    assert "3 run(s)" in everything
    # Piped output keeps each run on one line (grep-able): uuid, module, status, config.
    rows = {line.split()[0]: line for line in everything.splitlines()[1:-1]}
    assert sorted(rows) == sorted([*optimize, train])
    assert rows[train].split()[1:3] == ["train", "finished"]
    assert rows[train].endswith('{"epochs": 2}')
    assert rows[optimize[0]].split()[1] == "optimize"

    only = invoke("ls", "optimize").stdout
    for uuid in optimize:
        assert uuid in only
    assert train not in only
    assert "2 run(s)" in only

    none = invoke("ls", "nothing_here")
    assert none.stdout == ""
    assert "0 run(s)" in none.stderr


def test_find_shows_what_the_index_knows(project: Path) -> None:
    invoke("get", "optimize", "lr=0.5", "--launch")
    uuid = get("optimize", {"lr": 0.5}).uuid
    shown = json.loads(invoke("find", uuid).stdout)
    assert shown["uuid"] == uuid
    assert shown["config"] == {"lr": 0.5, "steps": 100}
    assert shown["directories"] == [str(project / "storage" / uuid)]
    one_line_error(invoke("find", "0" * 32, ok=False), "0" * 32)


def test_version() -> None:
    result = invoke("version")
    assert result.stdout.strip() == machinable.__version__
    assert machinable.__version__ == importlib.metadata.version("machinable")


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["get", "nope"], ["nope"]),
        (["get", "not-a-module!"], ["not-a-module!"]),
        (["get", "optimize", "lr=fast"], ["lr"]),
        (["get", "optimize", "momentum=0.9"], ["momentum"]),
        (["get", "optimize", "lr=NaN", "--launch"], ["NaN"]),
        (["get", "optimize", "lr=nan", "--launch"], ["NaN"]),
        (["get", "optimize", "--nosuch"], ["nosuch"]),
        (["get", "optimize", "--launch", "--nosuch"], ["nosuch"]),
        (["get", "optimize", "lr"], ["lr"]),
    ],
)
def test_errors_are_one_line_nonzero_and_change_nothing(
    project: Path, args: list[str], needles: list[str]
) -> None:
    result = invoke(*args, ok=False)
    one_line_error(result, *needles)
    assert result.stdout == ""
    assert not (project / "storage").exists()
    assert calls(project) == []


def test_a_failing_run_is_one_line_error(project: Path) -> None:
    write_module(
        project,
        "broken",
        """
        from machinable import Interface

        class Broken(Interface):
            def __call__(self):
                raise ValueError("diverged at step 3")
        """,
    )
    result = invoke("get", "broken", "--launch", ok=False)
    one_line_error(result, "diverged at step 3")
    assert Index.get().find(get("broken").uuid).status == "failed"


def test_an_index_that_is_not_sqlite_is_one_line_error(sqlite_project: Path) -> None:
    project = sqlite_project
    index_file = project / ".machinable.sqlite"
    index_file.write_bytes(b"garbage" * 100)
    result = invoke("ls", ok=False)
    one_line_error(result, str(index_file), "not a SQLite database")
    assert index_file.read_bytes() == b"garbage" * 100


def test_an_index_newer_than_the_code_is_one_line_error(project: Path) -> None:
    invoke("get", "optimize", "lr=0.5", "--launch")
    dispose_all()
    url = index_url(project)
    if postgres_schema(url) is None:  # the SQLite file, written with plain sqlite3
        with sqlite3.connect(project / ".machinable.sqlite") as conn:
            conn.execute("UPDATE alembic_version SET version_num = 'ffff9999'")
        conn.close()
    else:
        engine = create_engine(url)
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = 'ffff9999'"))
        engine.dispose()
    result = invoke("get", "optimize", "lr=1.0", "--launch", ok=False)
    one_line_error(result, "ffff9999", "upgrade machinable")
    # No run directory was made (the launch locks live in storage/.locks).
    assert set(os.listdir(project / "storage")) - {".locks"} == {get("optimize", {"lr": 0.5}).uuid}


# --------------------------------------------------------------------------- help


def test_every_command_has_help() -> None:
    assert cli.help
    top = invoke("--help").stdout
    assert cli.commands
    for name, command in cli.commands.items():
        assert command.help and command.help.strip(), name
        assert command.get_short_help_str().strip(), name
        assert name in top
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"{name} {param.opts}"
        shown = invoke(name, "--help").stdout
        assert f"Usage: machinable {name}" in shown
        assert " ".join(command.help.split("\n\n")[0].split()) in " ".join(shown.split())
    for param in cli.params:
        if isinstance(param, click.Option):
            assert param.help, param.opts


# --------------------------------------------------------------------------- real entry points


def test_python_dash_m_machinable(project: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "machinable", "get", "optimize", "lr=0.5", "--launch", "--loss"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    uuid = get("optimize", {"lr": 0.5}).uuid
    status_line, loss_line = result.stdout.strip().splitlines()
    assert status_line.split()[:2] == [uuid, "finished"]
    assert float(loss_line) == pytest.approx(LOSS)
    # This process finds what the other one computed, without computing it again.
    assert get("optimize", {"lr": 0.5}).cached()
    assert calls(project) == [uuid]


def test_console_script(project: Path) -> None:
    script = shutil.which("machinable", path=str(Path(sys.executable).parent))
    assert script is not None
    get("optimize", {"lr": 0.5}).launch()
    uuid = get("optimize", {"lr": 0.5}).uuid
    dispose_all()

    listing = subprocess.run(
        [script, "ls", "optimize"], cwd=project, capture_output=True, text=True, timeout=120
    )
    assert listing.returncode == 0, listing.stderr
    assert uuid in listing.stdout

    failure = subprocess.run(
        [script, "get", "optimize", "lr=oops", "--launch"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failure.returncode != 0
    assert "Traceback" not in failure.stderr
    lines = failure.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "lr" in lines[0]
