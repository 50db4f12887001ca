"""Honest edges (issue 14): listings print stored text verbatim, a run whose config no
longer validates is still listed, bad input to the CLI is one line, and read-only
commands on a missing project create nothing."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import text
from test_bad_input import Unchanged

from machinable import get
from machinable.catalog.engine import dispose_all
from machinable.identity import compute_uuid
from machinable.record import dump_json

from conftest import (
    POSTGRES_URL,
    _admin_engine,
    index_exists,
    index_url,
    invoke,
    one_line_error,
    postgres_schema,
    run_python,
    write_module,
)

LABEL = """
from pydantic import BaseModel
from machinable import Interface


class Label(Interface):
    class Config(BaseModel):
        text: str = ""

    def __call__(self):
        self.save_file("text.json", {"text": self.config.text})
"""


def forge_module_name(project: Path, uuid: str, module: str) -> str:
    """A collaborator's record: a copy of run ``uuid`` whose headers name ``module``
    (sealed, so it is a valid record); returns the forged run's uuid."""
    source = project / "storage" / uuid
    model = json.loads((source / "model.json").read_text())
    header = json.loads((source / "id.json").read_text())
    forged = compute_uuid(header["project"], module, model["canonical"], model["predicate"])
    target = project / "storage" / forged
    shutil.copytree(source, target)
    model["module"] = module
    header.update(module=module, uuid=forged)
    (target / "model.json").write_text(dump_json(model))
    (target / "id.json").write_text(dump_json(header))
    return forged


# --------------------------------------------------------------------------- 1. verbatim


def test_ls_prints_stored_strings_verbatim_and_escapes_control_characters(project: Path) -> None:
    write_module(project, "label", LABEL)
    texts = ["a[/]b", "[a-z]+[/]", "[bold]loud[/bold]", ":smile: [link=http://x]y[/link]"]
    for value in texts:
        invoke("get", "label", f"text={value}", "--launch")
    forged = forge_module_name(project, get("label", {"text": texts[0]}).uuid, "\x1b[31mevil\x1b]0;title\x07")
    invoke("reindex")

    result = invoke("ls")
    for value in texts:
        assert json.dumps({"text": value}) in result.stdout
    line = next(line for line in result.stdout.splitlines() if line.startswith(forged))
    assert "\\x1b[31mevil\\x1b]0;title\\x07" in line
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert f"{len(texts) + 1} run(s)" in result.stdout


def test_printable_escapes_what_would_drive_a_terminal() -> None:
    from machinable.cli import printable

    assert printable("plain [b]text[/b] ünïcödé 日本") == "plain [b]text[/b] ünïcödé 日本"
    assert printable("\x1b[2J\r\n\t\x00") == "\\x1b[2J\\r\\n\\t\\x00"
    assert printable("left\u202eright\u2028") == "left\\u202eright\\u2028"


# --------------------------------------------------------------------------- 2. invalid configs

LOOSE = """
from pydantic import BaseModel
from machinable import Interface


class Optimize(Interface):
    class Config(BaseModel):
        lr: float | str = 0.1
        steps: int = 100

    def __call__(self):
        self.save_file("result.json", {"loss": 0.5})

    def loss(self):
        return self.load_file("result.json")["loss"]
"""


def test_a_run_whose_config_no_longer_validates_is_listed_and_named_invalid(project: Path) -> None:
    # Another version of the module (a collaborator's, or last month's) accepted a string.
    loose = project.parent / "loose"
    loose.mkdir()
    write_module(loose, "optimize", LOOSE)
    run_python(
        f"""
        from machinable import Project, Storage, Index, get
        with Project({str(loose)!r}, name="study"), Storage({str(project / "storage")!r}), Index({index_url(project)!r}):
            get("optimize", {{"lr": "not-a-float"}}).launch()
        """,
        cwd=project,
    )
    good = get("optimize", {"lr": 0.5}).launch()
    invoke("reindex")

    runs = get("optimize").all()
    assert len(runs) == 2
    (bad,) = [run for run in runs if run.uuid != good.uuid]
    (valid,) = [run for run in runs if run.uuid == good.uuid]
    assert valid.config_error is None and valid.config.lr == 0.5
    assert bad.config_error is not None
    assert "lr" in bad.config_error and "not-a-float" in bad.config_error
    assert bad.config.lr == "not-a-float"  # the raw config stays readable
    assert bad.config.steps == 100
    assert "invalid config" in repr(bad)
    assert bad.loss() == 0.5  # its files are still there to read
    assert bad.launch() is bad  # finished: nothing to compute, nothing refused

    listing = invoke("ls")
    assert "2 run(s)" in listing.stdout
    line = next(line for line in listing.stdout.splitlines() if line.startswith(bad.uuid))
    assert '"lr": "not-a-float"' in line
    assert "invalid config" in line and "lr" in line
    other = next(line for line in listing.stdout.splitlines() if line.startswith(good.uuid))
    assert "invalid" not in other


def test_an_unfinished_invalid_run_is_refused_not_computed(project: Path) -> None:
    loose = project.parent / "loose"
    loose.mkdir()
    write_module(
        loose,
        "optimize",
        LOOSE.replace('self.save_file("result.json", {"loss": 0.5})', 'raise RuntimeError("first try")'),
    )
    run_python(
        f"""
        from machinable import Project, Storage, Index, get
        with Project({str(loose)!r}, name="study"), Storage({str(project / "storage")!r}), Index({index_url(project)!r}):
            try:
                get("optimize", {{"lr": "x"}}).launch()
            except RuntimeError:
                pass
        """,
        cwd=project,
    )
    (failed,) = get("optimize").all()
    assert failed.config_error is not None
    from machinable.errors import ConfigError

    with pytest.raises(ConfigError, match="lr"):
        failed.launch()
    assert not (project / "calls.txt").exists()


# --------------------------------------------------------------------------- 3. one line


def _where(expression: str) -> list[str]:
    return ["ls", "--where", expression]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (_where("config.lr = 123456789012345678901234567890"), ["64 bits", "position 12"]),
        (_where("(" * 3000 + "config.lr = 1" + ")" * 3000), ["nested deeper than", "position"]),
        (_where(" or ".join(["config.lr = 1"] * 1200)), ["more than", "comparisons", "position"]),
        (_where('config.lr = "a\\q"'), ["unknown escape \\q", "position 14"]),
        (_where("config.lr = 'open"), ["unterminated string", "position 12"]),
        (["--index", "notaurl://x", "ls"], ["notaurl"]),
        (["--index", "postgresql+nosuchdriver://h/db", "ls"], ["nosuchdriver"]),
        (["get", "optimize", "--push"], ["--push", "store"]),
        (["get", "optimize", "--fetch"], []),  # fetch takes no required argument: an error about the run
    ],
)
def test_bad_input_is_one_line(project: Path, args: list[str], needles: list[str]) -> None:
    get("optimize", {"lr": 0.5}).launch()
    unchanged = Unchanged(project / "storage")
    result = invoke(*args, ok=False)
    one_line_error(result, *needles)
    unchanged.check()


def test_a_quote_can_be_escaped_inside_a_string(project: Path) -> None:
    write_module(project, "label", LABEL)
    quoted = get("label", {"text": 'a"b'}).launch()
    apostrophe = get("label", {"text": "it's"}).launch()
    get("label", {"text": "a\\b"}).launch()

    def found(where: str) -> list[str]:
        lines = invoke("ls", "label", "--where", where).stdout.splitlines()[1:-1]
        return [line.split()[0] for line in lines]

    assert found('config.text = "a\\"b"') == [quoted.uuid]
    assert found("config.text = 'a\"b'") == [quoted.uuid]
    assert found("config.text = 'it\\'s'") == [apostrophe.uuid]
    assert found('config.text = "it\'s"') == [apostrophe.uuid]
    assert len(found("config.text = 'a\\\\b'")) == 1


def test_an_index_whose_runs_table_was_dropped_is_one_line(project: Path) -> None:
    get("optimize", {"lr": 0.5}).launch()
    url = index_url(project)
    dispose_all()
    schema = postgres_schema(url)
    if schema is None:
        conn = sqlite3.connect(project / ".machinable.sqlite")
        conn.execute("DROP TABLE locations")
        conn.execute("DROP TABLE runs")
        conn.commit()
        conn.close()
    else:
        admin = _admin_engine()
        with admin.connect() as conn:
            conn.execute(text(f'DROP TABLE "{schema}".runs CASCADE'))
        admin.dispose()
    for args in (["ls"], ["ls", "--count"], ["find", "0" * 32], ["verify"], ["get", "optimize", "lr=0.5"]):
        one_line_error(invoke(*args, ok=False), "damaged", "runs", "reindex")


def test_a_postgresql_index_without_psycopg_is_one_line(sqlite_project: Path) -> None:
    # A separate interpreter in which the driver cannot be imported, as on a machine
    # where it was never installed.
    for url in (POSTGRES_URL, "postgresql://root@127.0.0.1:5432/test"):
        code = textwrap.dedent(
            f"""
            import sys
            sys.modules["psycopg"] = None
            sys.modules["psycopg2"] = None
            from machinable.cli import main
            main(["--index", {url!r}, "ls"])
            """
        )
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=sqlite_project, capture_output=True, text=True, timeout=120
        )
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
        assert "psycopg" in lines[0] and "not installed" in lines[0]
        assert "pip install" in lines[0]


# --------------------------------------------------------------------------- 4. read-only


@pytest.mark.parametrize(
    "args",
    [
        ["ls"],
        ["ls", "--count"],
        ["ls", "--all-projects"],
        ["find", "0" * 32],
        ["whereis", "0" * 32],
        ["verify"],
        ["verify", "--checksums"],
        ["gc"],
        ["stores"],
        ["index", "list"],
        ["fetch", "--check"],
        ["reindex"],
        ["get", "optimize"],
    ],
)
def test_commands_on_a_missing_project_create_nothing(project: Path, tmp_path: Path, args: list[str]) -> None:
    missing = tmp_path / "nonexistent" / "project"
    had_index = index_exists(project)
    result = invoke("--project", str(missing), *args, ok=False)
    one_line_error(result, "does not exist", str(missing))
    assert not (tmp_path / "nonexistent").exists()
    assert index_exists(project) == had_index  # on PostgreSQL: no schema tables either
    assert os.listdir(tmp_path) == ["study"]
