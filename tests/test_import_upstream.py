"""``machinable import``: a storage written by the real machinable 5.x, imported.

A session fixture installs ``machinable==5.1.0`` from PyPI into its own virtual
environment (cached in the temp directory between sessions) and launches runs with it
in a subprocess: finished ones with nested configs and files in subfolders, two seeds
of one config under scopes, a failed one, and one whose module this project lacks.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from datetime import datetime, timezone
from pathlib import Path

import filelock
import pytest

from machinable import Index, Scope, get
from machinable.operations.upstream import import_storage

from conftest import calls, invoke, one_line_error, table_rows, write_module

UPSTREAM = "5.1.0"

UPSTREAM_TRAIN = """
from pydantic import BaseModel, Field
from machinable import Interface


class Opt(BaseModel):
    name: str = "adam"
    beta: float = 0.9


class Train(Interface):
    class Config(BaseModel):
        lr: float = 0.1
        steps: int = 3
        opt: Opt = Field(default_factory=Opt)
        fail: bool = False

    def __call__(self):
        if self.config.fail:
            raise RuntimeError("boom: the learning rate exploded")
        self.save_file("result.json", {"loss": self.config.lr * self.config.steps})
        self.save_file("logs/epoch.txt", "epoch 1\\nepoch 2\\n")
"""

UPSTREAM_LEGACY = """
from machinable import Interface


class Legacy(Interface):
    def __call__(self):
        self.save_file("old.txt", "old")
"""

LAUNCH = """
from machinable import Scope, get

get("train", {"lr": 0.5, "opt": {"name": "sgd"}}).launch()
get("train", {"lr": 0.2, "steps": 10}).launch()
for seed in (1, 2):
    with Scope({"seed": seed}):
        get("train", {"lr": 0.3}).launch()
try:
    get("train", {"fail": True}).launch()
except Exception:
    pass
get("legacy").launch()
"""

# The same module written for this machinable: the config must fit, the code may differ.
OUR_TRAIN = """
from pydantic import BaseModel, Field
from machinable import Interface


class Opt(BaseModel):
    name: str = "adam"
    beta: float = 0.9


class Train(Interface):
    class Config(BaseModel):
        lr: float = 0.1
        steps: int = 3
        opt: Opt = Field(default_factory=Opt)
        fail: bool = False

    def __call__(self):
        with open(self.project.path / "calls.txt", "a") as handle:
            handle.write(self.uuid + "\\n")
        self.save_file("result.json", {"loss": -1})

    def loss(self):
        return self.load_file("result.json")["loss"]
"""

FINISHED = 4  # lr=0.5/sgd, lr=0.2, and lr=0.3 under two seeds


@pytest.fixture(scope="session")
def upstream_python() -> Path:
    """A Python with machinable 5.1.0 installed from PyPI, made once and cached."""
    version = f"{sys.version_info.major}{sys.version_info.minor}"
    base = Path(tempfile.gettempdir()) / f"machinable-test-upstream-{UPSTREAM}-py{version}"
    python = base / "bin" / "python"
    with filelock.FileLock(f"{base}.lock", timeout=1200):
        if not (base / "installed").is_file():
            shutil.rmtree(base, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(base)], check=True, timeout=300)
            subprocess.run(
                [str(python), "-m", "pip", "install", "-q", f"machinable=={UPSTREAM}"],
                check=True,
                timeout=1200,
            )
            (base / "installed").write_text(UPSTREAM)
    return python


@pytest.fixture(scope="session")
def upstream_storage(upstream_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A storage folder written by machinable 5.1.0 (never modified by the tests)."""
    root = tmp_path_factory.mktemp("upstream") / "old-study"
    root.mkdir()
    (root / "train.py").write_text(textwrap.dedent(UPSTREAM_TRAIN))
    (root / "legacy.py").write_text(textwrap.dedent(UPSTREAM_LEGACY))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MACHINABLE_")}
    result = subprocess.run(
        [str(upstream_python), "-c", LAUNCH], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    storage = root / "storage"
    # check what the fixture is meant to hold: 6 runs in 5.x's layout
    runs = [p.parent for p in storage.glob("*/*/.machinable")]
    assert len(runs) == 6, sorted(storage.rglob("*"))
    return storage


def upstream_runs(storage: Path) -> dict[str, Path]:
    """{5.x id: run directory} of every 5.x run in ``storage``."""
    found = {}
    for sentinel in storage.glob("*/*/.machinable"):
        header = json.loads((sentinel.parent / "id.json").read_text())
        found[header["uuid"]] = sentinel.parent
    return found


def upstream_id(storage: Path, **config) -> str:
    for uuid, directory in upstream_runs(storage).items():
        model = json.loads((directory / "model.json").read_text())
        update = model["config"]["_update_"]
        if update == config.get("update") and model["predicate"] == config.get("predicate", {}):
            return uuid
    raise AssertionError(f"no 5.x run with {config}")


def tree_digest(root: Path) -> str:
    """Names, kinds, modes, sizes, mtimes and contents of everything below ``root``."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        digest.update(f"{path.relative_to(root)}|{info.st_mode}|{info.st_size}|{info.st_mtime_ns}\n".encode())
        if stat.S_ISREG(info.st_mode):
            digest.update(path.read_bytes())
        elif stat.S_ISLNK(info.st_mode):
            digest.update(os.readlink(path).encode())
    return digest.hexdigest()


def files_of(directory: Path) -> dict[str, bytes]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def ours(project: Path) -> Path:
    write_module(project, "train", OUR_TRAIN)
    return project


def test_import_brings_every_run_with_its_files_status_and_ids(ours: Path, upstream_storage: Path) -> None:
    report = import_storage(upstream_storage, live_window=0)
    assert len(report.imported) == FINISHED + 1
    assert report.unchanged == []
    (skipped,) = report.skipped
    assert "legacy" in skipped[1] and "does not resolve" in skipped[1]

    # finished runs are found by get() under this project's uuids, and never computed again
    sgd = get("train", {"lr": 0.5, "opt": {"name": "sgd"}})
    assert sgd.cached() and sgd.status() == "finished"
    assert sgd.loss() == 1.5  # the 5.x result, not what our code would compute
    assert sgd.load_file("logs/epoch.txt") == "epoch 1\nepoch 2\n"
    assert get("train", {"lr": 0.2, "steps": 10}).loss() == 2.0
    with Scope({"seed": 1}):
        first = get("train", {"lr": 0.3})
    with Scope({"seed": 2}):
        second = get("train", {"lr": 0.3})
    assert first.uuid != second.uuid and first.cached() and second.cached()
    assert [run.uuid for run in get("train").all(where="config.lr = 0.3")] != []
    for run in (sgd, first, second):
        run.launch()
    assert calls(ours) == []

    # the failed run stays failed, with 5.x's traceback
    failed = get("train", {"fail": True})
    assert failed.status() == "failed" and not failed.cached()
    assert "boom: the learning rate exploded" in (failed.local_directory() / "error.txt").read_text()

    # the upstream id and timestamps are kept; every file is copied byte for byte
    source = upstream_runs(upstream_storage)
    sgd_id = upstream_id(upstream_storage, update={"lr": 0.5, "opt": {"name": "sgd"}})
    model = json.loads((sgd.local_directory() / "model.json").read_text())
    upstream_model = json.loads((source[sgd_id] / "model.json").read_text())
    assert model["upstream"]["id"] == sgd_id
    created = datetime.fromtimestamp(upstream_model["created_at_ns"] / 1e9, timezone.utc)
    record = sgd.record()
    assert record.created_at == created
    execution = next(p.parent for p in source[sgd_id].rglob("finished_at"))
    assert record.finished_at == datetime.fromisoformat((execution / "finished_at").read_text().strip())
    assert record.started_at == datetime.fromisoformat((execution / "started_at").read_text().strip())
    for run, upstream in ((sgd, source[sgd_id]), (failed, source[model_id(failed)])):
        theirs = files_of(upstream)
        mine = files_of(run.local_directory())
        for name, content in theirs.items():
            candidates = [name, f"upstream/{name}", f"upstream/records/{name}"]
            assert any(mine.get(c) == content for c in candidates), name
    assert (sgd.local_directory() / "result.json").read_bytes() == (source[sgd_id] / "result.json").read_bytes()

    # the index rows are what a reindex of the directories gives
    rows = table_rows("runs")
    Index.get().reindex(full=True)
    assert table_rows("runs") == rows


def model_id(run) -> str:
    return json.loads((run.local_directory() / "model.json").read_text())["upstream"]["id"]


def test_importing_again_changes_nothing_and_the_source_is_only_read(
    ours: Path, upstream_storage: Path, tmp_path: Path
) -> None:
    source = tmp_path / "readonly-copy"
    shutil.copytree(upstream_storage, source, symlinks=True)
    for path in [source, *source.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    before = tree_digest(source)
    try:
        first = import_storage(source, live_window=0)
        storage = ours / "storage"
        after_first = tree_digest(storage)
        rows = table_rows("runs")
        second = import_storage(source, live_window=0)
        assert tree_digest(source) == before
    finally:
        for path in [source, *source.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert len(first.imported) == FINISHED + 1
    assert second.imported == [] and sorted(second.unchanged) == sorted(first.imported)
    assert second.skipped == first.skipped
    assert tree_digest(storage) == after_first
    assert table_rows("runs") == rows


def test_an_index_that_lost_an_imported_run_gets_it_back_on_import(ours: Path, upstream_storage: Path) -> None:
    import_storage(upstream_storage, live_window=0)
    from conftest import wipe_index

    wipe_index(ours)
    again = import_storage(upstream_storage, live_window=0)
    assert again.imported == [] and len(again.unchanged) == FINISHED + 1
    assert get("train", {"lr": 0.5, "opt": {"name": "sgd"}}).cached()


def test_the_cli_imports_and_names_each_skipped_run(ours: Path, upstream_storage: Path, tmp_path: Path) -> None:
    # A run whose heartbeat is fresh may still be running in 5.x: left for later.
    source = tmp_path / "source"
    shutil.copytree(upstream_storage, source, symlinks=True)
    failed = source / next(
        p.relative_to(upstream_storage) for p in upstream_storage.rglob("output.log")
    ).parent
    (failed / "heartbeat_at").write_text(datetime.now(timezone.utc).isoformat())

    result = invoke("import", str(source))
    lines = result.stdout.strip().splitlines()
    assert lines[0] == f"{source}: {FINISHED} imported, 0 already here, 2 skipped"
    assert len(lines) == 3
    assert any("may still be running" in line for line in lines[1:])
    assert any("'legacy'" in line and "does not resolve" in line for line in lines[1:])
    assert result.stderr == ""

    later = invoke("import", str(source), "--live-window", "0")
    assert later.stdout.splitlines()[0] == f"{source}: 1 imported, {FINISHED} already here, 1 skipped"
    assert get("train", {"fail": True}).status() == "failed"

    one_line_error(invoke("import", str(tmp_path / "missing"), ok=False), "missing")


# --------------------------------------------------------------------------- hostile sources


def _sgd(source: Path) -> Path:
    return upstream_runs(source)[upstream_id(source, update={"lr": 0.5, "opt": {"name": "sgd"}})]


def _make_fifo(path: Path) -> None:
    os.mkfifo(path)


def _evil_pickle(path: Path, marker: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path.write_bytes(pickle.dumps(Evil()))


HOSTILE = {
    "malformed model.json": (lambda d, t: (d / "model.json").write_text("{not json"), "not valid JSON"),
    "deeply nested model.json": (
        lambda d, t: (d / "model.json").write_text("[" * 200_000 + "]" * 200_000),
        "nested too deeply",
    ),
    "huge model.json": (lambda d, t: os.truncate(d / "model.json", 3 << 30), "the limit is"),
    "wrong types": (
        lambda d, t: (d / "model.json").write_text('{"uuid": "x", "module": "train", "config": [1]}'),
        "not a machinable 5.x record",
    ),
    "NaN in the config": (
        lambda d, t: (d / "model.json").write_text(
            (d / "model.json").read_text().replace('"lr": 0.5', '"lr": NaN', 1)
        ),
        "NaN",
    ),
    "a module name that is a path": (
        lambda d, t: (d / "model.json").write_text(
            (d / "model.json").read_text().replace('"module": "train"', '"module": "../../etc/passwd"', 1)
        ),
        "not a valid module name",
    ),
    "a symlink out of the run": (
        lambda d, t: os.symlink(t / "secret.txt", d / "stolen.txt"),
        "points outside the run",
    ),
    "a FIFO in the run": (lambda d, t: _make_fifo(d / "logs" / "pipe"), "a FIFO"),
    "a FIFO as id.json": (
        lambda d, t: ((d / "id.json").unlink(), _make_fifo(d / "id.json")),
        "a FIFO",
    ),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_run_is_skipped_with_its_reason_and_the_rest_import(
    sqlite_project: Path, upstream_storage: Path, tmp_path: Path, case: str
) -> None:
    write_module(sqlite_project, "train", OUR_TRAIN)
    (tmp_path / "secret.txt").write_text("secret")
    source = tmp_path / "source"
    shutil.copytree(upstream_storage, source, symlinks=True)
    bad = _sgd(source)
    tamper, reason = HOSTILE[case]
    tamper(bad, tmp_path)
    before = tree_digest(source)

    result = invoke("import", str(source), "--live-window", "0")
    lines = result.stdout.strip().splitlines()
    assert "Traceback" not in result.stdout + result.stderr
    assert lines[0] == f"{source}: {FINISHED} imported, 0 already here, 2 skipped", lines
    named = [line for line in lines[1:] if str(bad.relative_to(source)) in line]
    assert len(named) == 1 and reason in named[0], lines
    assert tree_digest(source) == before
    assert not get("train", {"lr": 0.5, "opt": {"name": "sgd"}}).cached()
    assert get("train", {"lr": 0.2, "steps": 10}).cached()
    stored = "\n".join(p.read_text(errors="replace") for p in (sqlite_project / "storage").rglob("*") if p.is_file())
    assert "secret" not in stored


def test_files_from_the_source_are_data_and_links_and_fifos_outside_runs_are_not_followed(
    sqlite_project: Path, upstream_storage: Path, tmp_path: Path
) -> None:
    write_module(sqlite_project, "train", OUR_TRAIN)
    source = tmp_path / "source"
    shutil.copytree(upstream_storage, source, symlinks=True)
    marker = tmp_path / "UNPICKLED"
    _evil_pickle(_sgd(source) / "state.p", marker)
    (source / "elsewhere").mkdir()
    os.symlink(_sgd(source), source / "elsewhere" / "linked-run")
    os.mkfifo(source / "queue")

    report = import_storage(source, live_window=0)
    assert len(report.imported) == FINISHED + 1
    reasons = dict(report.skipped)
    assert reasons["elsewhere/linked-run"] == "a symlink; not followed"
    assert reasons["queue"] == "a FIFO"
    sgd = get("train", {"lr": 0.5, "opt": {"name": "sgd"}})
    assert (sgd.local_directory() / "state.p").read_bytes() == (_sgd(source) / "state.p").read_bytes()
    assert not marker.exists()  # copied as bytes, never unpickled


def _many_runs(storage: Path, target: Path, count: int) -> None:
    """A 5.x storage of ``count`` finished runs: one real run, cloned with other configs."""
    template = _sgd(storage)
    for number in range(count):
        uuid = f"clone{number:07d}"
        clone = target / f"{number:024x}" / template.name
        shutil.copytree(template, clone, symlinks=True)
        header = json.loads((clone / "id.json").read_text())
        model = json.loads((clone / "model.json").read_text())
        header["uuid"] = model["uuid"] = uuid
        model["config"]["steps"] = 1000 + number
        (clone / "id.json").write_text(json.dumps(header))
        (clone / "model.json").write_text(json.dumps(model))


def test_progress_shows_on_a_terminal_and_never_when_quiet_or_piped(
    sqlite_project: Path, upstream_storage: Path, tmp_path: Path
) -> None:
    from test_stores import run_in_terminal

    write_module(sqlite_project, "train", OUR_TRAIN)
    source = tmp_path / "many"
    _many_runs(upstream_storage, source, 220)
    env = {k: v for k, v in os.environ.items() if k != "MACHINABLE_QUIET"}
    env.update(TERM="xterm-256color", COLUMNS="100")

    code, out, err = run_in_terminal(["--quiet", "import", str(source)], sqlite_project, env)
    assert code == 0 and err == b""
    assert out.startswith(f"{source}: 220 imported")
    code, out, err = run_in_terminal(["import", str(source)], sqlite_project, env)
    assert code == 0 and out.startswith(f"{source}: 0 imported, 220 already here")
    assert b"import" in err and b"220" in err  # the bar and its count, on the terminal
    piped = subprocess.run(
        [sys.executable, "-m", "machinable", "import", str(source)],
        cwd=sqlite_project, env=env, capture_output=True, text=True, timeout=300,
    )
    assert piped.returncode == 0 and piped.stderr == ""
    assert len(get("train").all()) == 220


def test_the_readme_import_commands_run(ours: Path, upstream_storage: Path) -> None:
    import shlex

    from test_docs import BLOCK, section

    lines = [
        line.split("#")[0].strip()
        for language, body in BLOCK.findall(section("Coming from machinable 5.x"))
        if language == "bash"
        for line in body.splitlines()
        if line.startswith("machinable ")
    ]
    assert len(lines) == 2
    for line in lines:
        invoke(*shlex.split(line.replace("../old-study/storage", str(upstream_storage)))[1:])
    assert get("train", {"lr": 0.5, "opt": {"name": "sgd"}}).cached()
    assert get("train", {"fail": True}).status() == "failed"


def test_a_module_file_inside_the_imported_folder_is_never_imported(
    sqlite_project: Path, upstream_storage: Path, tmp_path: Path
) -> None:
    """A 5.x folder copied into the project cannot name its own .py files as modules."""
    write_module(sqlite_project, "train", OUR_TRAIN)
    source = sqlite_project / "old" / "storage"
    shutil.copytree(upstream_storage, source, symlinks=True)
    marker = tmp_path / "IMPORTED"
    (source / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from machinable import Interface\n\n\nclass Evil(Interface):\n    pass\n"
    )
    bad = _sgd(source)
    model = (bad / "model.json").read_text().replace('"module": "train"', '"module": "old.storage.evil"', 1)
    (bad / "model.json").write_text(model)

    report = import_storage(source, live_window=0)
    reasons = dict(report.skipped)
    assert "inside the imported folder" in reasons[bad.relative_to(source).as_posix()]
    assert not marker.exists()
    assert len(report.imported) == FINISHED


def test_two_imports_at_once_write_each_run_once(sqlite_project: Path, upstream_storage: Path) -> None:
    write_module(sqlite_project, "train", OUR_TRAIN)
    command = [sys.executable, "-m", "machinable", "import", str(upstream_storage), "--live-window", "0"]
    processes = [
        subprocess.Popen(command, cwd=sqlite_project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    counts = []
    for out, err in outputs:
        assert "Traceback" not in err
        head = out.splitlines()[0]
        imported, here = (int(part.split()[0]) for part in head.split(": ", 1)[1].split(", ")[:2])
        assert imported + here == FINISHED + 1, head
        counts.append(imported)
    assert sum(counts) == FINISHED + 1  # every run written by exactly one of them
    records = [p for p in (sqlite_project / "storage").iterdir() if p.name != ".locks"]
    assert len(records) == FINISHED + 1 and not any(".partial-" in p.name for p in records)
    assert len(table_rows("runs")) == FINISHED + 1


def test_a_killed_import_leaves_no_half_record_and_a_second_one_completes(
    sqlite_project: Path, upstream_storage: Path, tmp_path: Path
) -> None:
    from conftest import kill_when

    write_module(sqlite_project, "train", OUR_TRAIN)
    source = tmp_path / "many"
    _many_runs(upstream_storage, source, 220)
    storage = sqlite_project / "storage"

    def records() -> list[Path]:
        return [p for p in storage.iterdir() if len(p.name) == 32] if storage.is_dir() else []

    process = subprocess.Popen(
        [sys.executable, "-m", "machinable", "import", str(source)],
        cwd=sqlite_project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    kill_when(process, lambda: len(records()) >= 20, "import")
    done = records()
    assert 20 <= len(done) < 220
    for record in done:  # every record there is whole: renamed into place only when complete
        names = {p.name for p in record.iterdir()}
        assert {".machinable", "id.json", "model.json", "finished_at", "result.json", "upstream"} <= names

    report = import_storage(source)
    assert len(report.imported) + len(report.unchanged) == 220 and report.skipped == []
    assert len(records()) == 220
    assert len(get("train").all()) == 220
