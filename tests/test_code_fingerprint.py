"""Same name, different code (issue 14, finding 6): each run records the fingerprint of
the code that computed it in model.json (module sha256; git commit and dirty flag in a
git working tree), ``ls --code`` shows it, and launching a cached run warns when the
code resolving its module now differs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from machinable import code, get
from machinable.code import CodeChangedWarning

from conftest import OPTIMIZE, calls, invoke, run_python, write_module


def git(project: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
        cwd=project,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


@pytest.fixture(autouse=True)
def _fresh_fingerprints():
    code.forget()
    yield
    code.forget()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model(run) -> dict:  # type: ignore[no-untyped-def]
    return json.loads((run.local_directory() / "model.json").read_text())


def test_a_run_records_the_code_that_computed_it(project: Path) -> None:
    (project / ".gitignore").write_text("storage/\n.machinable.sqlite*\ncalls.txt\n")
    git(project, "init", "-q")
    git(project, "add", ".")
    git(project, "commit", "-q", "-m", "first")
    head = git(project, "rev-parse", "HEAD")

    run = get("optimize", {"lr": 0.5}).launch()
    assert model(run)["code"] == {
        "file": "optimize.py",
        "sha256": sha256(project / "optimize.py"),
        "git": {"commit": head, "dirty": False},
    }
    listing = invoke("ls", "--code").stdout
    line = next(line for line in listing.splitlines() if line.startswith(run.uuid))
    assert f"sha256:{sha256(project / 'optimize.py')[:12]} git:{head[:12]}" in line
    assert "+dirty" not in line
    assert "code" not in invoke("ls").stdout.splitlines()[0]  # only on request

    # A tracked file changed but not committed: the next process records a dirty tree.
    (project / ".gitignore").write_text("storage/\n.machinable.sqlite*\ncalls.txt\n# edited\n")
    run_python("from machinable import get; get('optimize', {'lr': 0.7}).launch()", cwd=project)
    dirty = get("optimize", {"lr": 0.7})
    assert model(dirty)["code"]["git"] == {"commit": head, "dirty": True}
    listing = invoke("ls", "--code").stdout
    assert any(line.startswith(dirty.uuid) and "+dirty" in line for line in listing.splitlines())


def test_outside_git_only_the_module_file_is_recorded(sqlite_project: Path) -> None:
    run = get("optimize", {"lr": 0.5}).launch()
    assert model(run)["code"] == {"file": "optimize.py", "sha256": sha256(sqlite_project / "optimize.py")}


def test_a_cached_run_computed_by_other_code_warns(project: Path) -> None:
    launch = "from machinable import get; get('optimize', {'lr': 0.5}).launch()"
    first = run_python(launch, cwd=project)
    assert "CodeChangedWarning" not in first.stderr
    same = run_python(launch, cwd=project)
    assert "CodeChangedWarning" not in same.stderr  # same code: silent

    # A collaborator's optimize.py: same project name, same module, different code.
    write_module(project, "optimize", OPTIMIZE.replace("1 / (1 +", "2 / (2 +"))
    changed = run_python(launch, cwd=project)
    assert "CodeChangedWarning" in changed.stderr
    assert "computed by different code" in changed.stderr
    assert len(calls(project)) == 1  # still cached: warned, not recomputed

    run = get("optimize", {"lr": 0.5})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.launch()
    (warning,) = [w for w in caught if issubclass(w.category, CodeChangedWarning)]
    assert run.uuid in str(warning.message)
    assert f"sha256:{sha256(project / 'optimize.py')[:12]}" in str(warning.message)


def test_a_relaunch_records_the_code_that_finally_computed_it(sqlite_project: Path) -> None:
    project = sqlite_project
    write_module(project, "flaky", FLAKY.replace("FAIL = False", "FAIL = True"))
    run_python(
        "from machinable import get\ntry:\n    get('flaky').launch()\nexcept RuntimeError:\n    pass",
        cwd=project,
    )
    write_module(project, "flaky", FLAKY)
    run = get("flaky").launch()
    assert run.status() == "finished"
    assert model(run)["code"]["sha256"] == sha256(project / "flaky.py")


FLAKY = """
from machinable import Interface

FAIL = False


class Flaky(Interface):
    def __call__(self):
        if FAIL:
            raise RuntimeError("first try")
"""


def test_the_fingerprint_is_computed_once_per_module_file_per_process(
    sqlite_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    git(sqlite_project, "init", "-q")
    git(sqlite_project, "add", "optimize.py")
    git(sqlite_project, "commit", "-q", "-m", "first")
    started = []
    real = subprocess.Popen

    def counting(args, *rest, **kwargs):  # type: ignore[no-untyped-def]
        started.append(args)
        return real(args, *rest, **kwargs)

    monkeypatch.setattr(code.subprocess, "Popen", counting)
    for i in range(20):
        get("optimize", {"lr": i / 10}).launch()
    assert [args[3] for args in started if args[0] == "git"] == ["rev-parse", "status"]


def test_a_hung_git_is_left_out(sqlite_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A git that hangs (a stuck credential helper, a network filesystem) and would
    # eventually answer: past GIT_TIMEOUT it and its children are killed, git left out.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "git").write_text("#!/bin/sh\nsleep 30\necho " + "d" * 40 + "\n")
    (fake / "git").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(code, "GIT_TIMEOUT", 0.5)
    run = get("optimize", {"lr": 0.5}).launch()
    assert model(run)["code"] == {"file": "optimize.py", "sha256": sha256(sqlite_project / "optimize.py")}


def test_a_class_without_a_file_records_no_fingerprint(sqlite_project: Path) -> None:
    result = run_python(
        """
        import json
        from machinable import Interface, get

        class Inline(Interface):
            pass

        Inline.__module__ = "not_a_module"
        run = get(Inline).launch()
        print(json.dumps("code" in json.loads((run.local_directory() / "model.json").read_text())))
        """,
        cwd=sqlite_project,
    )
    assert result.stdout.strip() == "false"
    assert sys.executable  # the subprocess ran with this interpreter
