"""The README's examples run as written, so the guide never drifts from the code."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO, index_exists

README = (REPO / "README.md").read_text()
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks(language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(README) if lang == language]


def section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else len(README)]


def test_python_examples_run_in_order(tmp_path: Path, monkeypatch, index_backend: str) -> None:
    project = tmp_path / "my-study"
    project.mkdir()
    shutil.copy(REPO / "example" / "optimize.py", project / "optimize.py")
    monkeypatch.chdir(project)
    namespace: dict = {"__name__": "readme"}
    examples = blocks("python")
    assert len(examples) >= 5
    for code in examples:
        exec(compile(code, "README.md", "exec"), namespace)
    assert (project / "results" / "sweep-1").is_dir()
    # The project's SQLite file, or the PostgreSQL schema MACHINABLE_INDEX names.
    assert index_exists(project)
    assert (project / ".machinable.sqlite").is_file() == (index_backend == "sqlite")


def test_install_and_test_commands_are_the_first_two_blocks() -> None:
    first, second = blocks("bash")[:2]
    assert "quickstart.py" in first and "pip install" in first
    assert "pytest" in second
    ci = (REPO / ".ci" / "run").read_text()
    assert second.strip() in ci


def test_cli_examples_run(tmp_path: Path, index_backend: str) -> None:
    project = tmp_path / "my-study"
    project.mkdir()
    shutil.copy(REPO / "example" / "optimize.py", project / "optimize.py")
    machinable = [sys.executable, "-m", "machinable"]
    env = {**os.environ}  # MACHINABLE_INDEX is set only in the [postgresql] variant
    env.pop("MACHINABLE_STORAGE", None)
    uuid = None
    lines = [
        line.split("#")[0].strip()
        for block in BLOCK.findall(section("Command line"))
        for line in block[1].splitlines()
        if line.startswith("machinable ")
    ]
    assert len(lines) >= 6
    for line in lines:
        line = line.replace("/data/runs", str(tmp_path / "data-runs"))
        line = line.replace("/data/archive", str(tmp_path / "archive"))
        if "<uuid>" in line:
            line = line.replace("<uuid>", uuid)
        args = shlex.split(line)[1:]
        result = subprocess.run(
            machinable + args, cwd=project, env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, (line, result.stdout, result.stderr)
        if args[:2] == ["get", "optimize"] and uuid is None:
            uuid = result.stdout.split()[0]
    assert (tmp_path / "data-runs").is_dir()
    assert any((tmp_path / "archive").iterdir())
    assert index_exists(project)
    assert (project / ".machinable.sqlite").is_file() == (index_backend == "sqlite")


def test_alembic_example_runs_from_a_checkout(tmp_path: Path) -> None:
    (line,) = [
        line for block in blocks("bash") for line in block.splitlines() if "alembic upgrade" in line
    ]
    assignment, *command = shlex.split(line)
    key, _, value = assignment.partition("=")
    env = {**os.environ, key: str(tmp_path / value)}
    result = subprocess.run(
        [sys.executable, "-m", "alembic", *command[1:]],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / value).is_file()
