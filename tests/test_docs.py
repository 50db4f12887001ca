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
    # CI starts from a fresh environment, and provisions what the tests connect to.
    assert ci.index("rm -rf .venv") < ci.index(second.strip())
    assert "createuser --superuser $PG_ROLE" in ci and "createdb --owner $PG_ROLE $PG_DATABASE" in ci
    assert "PG_ROLE=root" in ci and "PG_DATABASE=test" in ci


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


# The README's other blocks and the example script, run as written (issue 14).


def machinable_lines(title: str, language: str = "bash") -> list[str]:
    """The ``machinable ...`` lines of a section's blocks, comments removed."""
    return [
        line.split("#")[0].strip()
        for lang, body in BLOCK.findall(section(title))
        if lang == language
        for line in body.splitlines()
        if line.startswith("machinable ")
    ]


def run_cli(line: str, project: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "machinable", *shlex.split(line)[1:]],
        cwd=project, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, (line, result.stdout, result.stderr)
    return result


def example_project(tmp_path: Path) -> Path:
    project = tmp_path / "my-study"
    project.mkdir()
    for name in ("optimize.py", "quickstart.py"):
        shutil.copy(REPO / "example" / name, project / name)
    return project


def test_the_quickstart_script_runs_and_computes_nothing_the_second_time(tmp_path: Path) -> None:
    project = example_project(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MACHINABLE_")}

    def quickstart() -> str:
        result = subprocess.run(
            [sys.executable, "quickstart.py"], cwd=project, env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    first = quickstart()
    assert "3 run(s) of 'optimize'" in first and "cached=True" in first
    finished = {p.name: (p / "finished_at").read_text() for p in (project / "storage").iterdir() if p.name != ".locks"}
    assert len(finished) == 3
    assert quickstart() == first
    assert {p.name: (p / "finished_at").read_text() for p in (project / "storage").iterdir() if p.name != ".locks"} == finished


def test_the_store_commands_run(tmp_path: Path, s3_store_url: tuple[str, dict], s3_server) -> None:  # type: ignore[no-untyped-def]
    project = example_project(tmp_path)
    url, options = s3_store_url
    env = {k: v for k, v in os.environ.items() if not k.startswith("MACHINABLE_")}
    env.update(
        FSSPEC_S3_KEY=options["key"], FSSPEC_S3_SECRET=options["secret"], FSSPEC_S3_ENDPOINT_URL=s3_server.endpoint_url
    )
    small = run_cli("machinable get optimize lr=0.05 --launch", project, env).stdout.split()[0]
    run_cli("machinable get optimize lr=0.5 --launch", project, env)
    lines = machinable_lines("Remote stores: mirror, evict, fetch back")
    assert [shlex.split(line)[1] for line in lines] == ["push", "whereis", "evict", "pull", "stores", "reindex"]
    outputs = [run_cli(line.replace("s3://bucket/runs", url).replace("<uuid>", small), project, env) for line in lines]
    assert "pushed 2 run(s)" in outputs[0].stdout
    assert "present" in outputs[1].stdout
    assert "evicted 1 run(s)" in outputs[2].stdout
    assert small in outputs[3].stdout and (project / "storage" / small / "finished_at").is_file()
    assert url in outputs[4].stdout


def test_the_checking_and_cleaning_commands_run(tmp_path: Path) -> None:
    project = example_project(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MACHINABLE_")}
    run_cli("machinable get optimize lr=0.5 --launch", project, env)
    lines = machinable_lines("Checking and cleaning up")
    assert [shlex.split(line)[1] for line in lines] == ["verify"] * 4 + ["gc"] * 2
    for line in lines:
        run_cli(line, project, env)  # a clean project: verify exits 0
    assert (project / "storage").is_dir() and len(run_cli("machinable ls", project, env).stdout.splitlines()) == 3


def test_the_postgresql_export_works(tmp_path: Path) -> None:
    import uuid as uuidlib

    from sqlalchemy import text

    from conftest import POSTGRES_URL, _admin_engine

    (line,) = [line for lang, body in BLOCK.findall(section("Many jobs, shared catalogs and PostgreSQL"))
               for line in body.splitlines() if line.startswith("export ")]
    name, _, value = line.removeprefix("export ").partition("=")
    assert name == "MACHINABLE_INDEX" and value.startswith("postgresql+psycopg://")
    schema = f"mt_{uuidlib.uuid4().hex[:12]}"
    admin = _admin_engine()
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        project = example_project(tmp_path)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MACHINABLE_")}
        env[name] = f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
        run_cli("machinable get optimize lr=0.5 --launch", project, env)
        assert "1 run(s)" in run_cli("machinable ls", project, env).stdout
        assert not (project / ".machinable.sqlite").exists()
        with admin.connect() as conn:
            assert conn.execute(text(f'SELECT count(*) FROM "{schema}".runs')).scalar() == 1
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


def test_the_provider_and_fetch_commands_run(tmp_path: Path, http_server) -> None:  # type: ignore[no-untyped-def]
    import hashlib

    project = example_project(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MACHINABLE_")}
    slurm = b"from machinable import Interface\n\n\nclass Slurm(Interface):\n    pass\n"
    served = http_server.add("/integrations/v1.2/slurm.py", slurm)
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "eval.py").write_text("from machinable import Interface\n\n\nclass SharedEval(Interface):\n    pass\n")
    (shared / "plots.py").write_text("from machinable import Interface\n\n\nclass Plots(Interface):\n    pass\n")
    (provider,) = [body for lang, body in BLOCK.findall(section("Remotes: shareable modules by URL"))
                   if "on_resolve_remotes" in body]
    provider = provider.replace("https://example.org/integrations/v1.2/slurm.py", served)
    provider = provider.replace("<hex>", hashlib.sha256(slurm).hexdigest())
    (project / "interface").mkdir()
    (project / "interface" / "project.py").write_text(provider)

    lines = machinable_lines("Remotes: shareable modules by URL")
    assert [shlex.split(line)[1:] for line in lines] == [["fetch"], ["fetch", "slurm"], ["fetch", "--check"]]
    fetched = run_cli(lines[0], project, env).stdout
    assert f"sha256 {hashlib.sha256(slurm).hexdigest()}" in fetched
    assert (project / "interface" / "remotes" / "slurm.py").read_bytes() == slurm
    assert (project / "interface" / "remotes" / "plots.py").is_symlink()
    assert "cached" in run_cli(lines[1], project, env).stdout
    assert "3 remote(s) match" in run_cli(lines[2], project, env).stdout
    assert http_server.hits["/integrations/v1.2/slurm.py"] == 1
