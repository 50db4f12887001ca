"""Contexts: Storage and Project placement, MACHINABLE_STORAGE, nesting, threads, asyncio."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path

import pytest

from machinable import Project, Scope, Storage, get
from machinable.errors import MachinableError, ModuleResolutionError

from conftest import OPTIMIZE, calls, index_exists, run_python, write_module


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory that is not a project."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def make_project(root: Path, default_lr: float = 0.1) -> Path:
    root.mkdir(parents=True)
    write_module(root, "optimize", OPTIMIZE.replace("lr: float = 0.1", f"lr: float = {default_lr}"))
    return root


# Storage


def test_default_storage_is_the_project_storage_folder(project: Path, index_backend: str) -> None:
    run = get("optimize", {"lr": 0.5}).launch()
    assert run.local_directory() == project / "storage" / run.uuid
    assert (project / "storage" / run.uuid / "finished_at").is_file()
    # The index is the project's SQLite file, or the PostgreSQL schema MACHINABLE_INDEX names.
    assert index_exists(project)
    assert (project / ".machinable.sqlite").is_file() == (index_backend == "sqlite")


def test_absolute_storage_is_used_as_is(project: Path, tmp_path: Path) -> None:
    target = tmp_path / "data" / "experiments"
    plain_uuid = get("optimize", {"lr": 0.5}).uuid
    with Storage(target):
        run = get("optimize", {"lr": 0.5})
        assert run.uuid == plain_uuid
        run.launch()
    assert run.local_directory() == target / run.uuid
    assert (target / run.uuid / "result.json").is_file()
    assert not (project / "storage").exists()

    # The run is found from anywhere the index is, without the Storage context.
    again = get("optimize", {"lr": 0.5})
    assert again.cached()
    assert again.local_directory() == target / run.uuid
    assert again.loss() == pytest.approx(1 / 51)
    again.launch()
    assert calls(project) == [run.uuid]


def test_file_url_storage(project: Path, tmp_path: Path) -> None:
    with Storage(f"file://{tmp_path / 'via-url'}"):
        run = get("optimize", {"lr": 0.5}).launch()
    assert (tmp_path / "via-url" / run.uuid / "finished_at").is_file()


def test_remote_url_storage_is_refused_clearly(project: Path) -> None:
    with pytest.raises(MachinableError, match="s3://bucket"):
        Storage("s3://bucket/runs")


def test_relative_storage_resolves_against_the_project(project: Path, elsewhere: Path) -> None:
    with Project(project), Storage("results"):
        run = get("optimize", {"lr": 0.5}).launch()
    assert run.local_directory() == project / "results" / run.uuid
    assert (project / "results" / run.uuid / "finished_at").is_file()
    assert os.listdir(elsewhere) == []

    # A relative Storage entered before the Project still lands in the project.
    with Storage("results2"), Project(project):
        other = get("optimize", {"lr": 0.6}).launch()
    assert (project / "results2" / other.uuid / "finished_at").is_file()
    assert os.listdir(elsewhere) == []


def test_machinable_storage_environment(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MACHINABLE_STORAGE", str(tmp_path / "env-store"))
    run = get("optimize", {"lr": 0.5}).launch()
    assert run.local_directory() == tmp_path / "env-store" / run.uuid
    assert not (project / "storage").exists()

    monkeypatch.setenv("MACHINABLE_STORAGE", "relative-store")
    relative = get("optimize", {"lr": 0.6}).launch()
    assert relative.local_directory() == project / "relative-store" / relative.uuid

    with Storage(tmp_path / "explicit"):
        explicit = get("optimize", {"lr": 0.7}).launch()
    assert explicit.local_directory() == tmp_path / "explicit" / explicit.uuid

    out = run_python(
        """
        from machinable import get
        run = get("optimize", {"lr": 0.8}).launch()
        print(run.local_directory())
        print(get("optimize", {"lr": 0.5}).cached())
        """,
        cwd=project,
        env={"MACHINABLE_STORAGE": str(tmp_path / "sub-store")},
    )
    directory, cached = out.stdout.split()
    assert Path(directory).parent == tmp_path / "sub-store"
    assert (Path(directory) / "finished_at").is_file()
    assert cached == "True"
    assert len(calls(project)) == 4


# Project


def test_project_context_from_another_cwd(project: Path, elsewhere: Path, index_backend: str) -> None:
    with pytest.raises(ModuleResolutionError, match="optimize"):
        get("optimize")
    with Project(project):
        assert Project.get().path == project
        run = get("optimize", {"lr": 0.5}).launch()
    assert run.local_directory() == project / "storage" / run.uuid
    assert (project / "storage" / run.uuid / "finished_at").is_file()
    assert index_exists(project)
    assert (project / ".machinable.sqlite").is_file() == (index_backend == "sqlite")
    assert calls(project) == [run.uuid]
    assert os.listdir(elsewhere) == []

    out = run_python(
        f"""
        from machinable import Project, get
        with Project({str(project)!r}):
            run = get("optimize", {{"lr": 0.5}})
            cached = run.cached()
            run.launch()
            print(run.uuid, cached, run.loss())
        """,
        cwd=elsewhere,
    )
    uuid, cached, loss = out.stdout.split()
    assert (uuid, cached) == (run.uuid, "True")
    assert float(loss) == pytest.approx(1 / 51)
    assert calls(project) == [run.uuid]
    assert os.listdir(elsewhere) == []


def test_same_uuid_from_cwd_and_from_project_context(
    project: Path, elsewhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Project(project):
        from_context = get("optimize", {"lr": 0.5}).uuid
    monkeypatch.chdir(project)
    assert get("optimize", {"lr": 0.5}).uuid == from_context
    with Project(project.parent / "." / "study"):
        assert get("optimize", {"lr": 0.5}).uuid == from_context


def test_modules_resolve_from_the_connected_project(tmp_path: Path, elsewhere: Path) -> None:
    alpha = make_project(tmp_path / "alpha", default_lr=0.2)
    beta = make_project(tmp_path / "beta", default_lr=0.3)
    with Project(alpha):
        a = get("optimize").launch()
        assert a.config.lr == 0.2
    with Project(beta):
        b = get("optimize").launch()
        assert b.config.lr == 0.3
        assert [run.uuid for run in get("optimize").all()] == [b.uuid]
    assert calls(alpha) == [a.uuid]
    assert calls(beta) == [b.uuid]
    assert (alpha / "storage" / a.uuid).is_dir()
    assert (beta / "storage" / b.uuid).is_dir()
    assert not (beta / "storage" / a.uuid).exists()


# nesting


def test_contexts_nest_and_restore(project: Path, tmp_path: Path) -> None:
    alpha = make_project(tmp_path / "alpha")
    beta = make_project(tmp_path / "beta")
    assert Project.get().path == project
    with Project(alpha):
        assert Project.get().path == alpha
        with Project(beta):
            assert Project.get().path == beta
        assert Project.get().path == alpha
    assert Project.get().path == project

    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    with Storage(s1):
        with Storage(s2):
            inner = get("optimize", {"lr": 0.2}).launch()
        outer = get("optimize", {"lr": 0.3}).launch()
    after = get("optimize", {"lr": 0.4}).launch()
    assert inner.local_directory() == s2 / inner.uuid
    assert outer.local_directory() == s1 / outer.uuid
    assert after.local_directory() == project / "storage" / after.uuid

    with Scope(seed=1):
        with Scope(data="mnist"):
            assert get("optimize").predicate == {"seed": 1, "data": "mnist"}
        assert get("optimize").predicate == {"seed": 1}
    assert get("optimize").predicate == {}


def test_contexts_restore_after_an_exception(project: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with Storage(tmp_path / "s"), Project(tmp_path), Scope(seed=1):
            raise RuntimeError("boom")
    assert Project.get().path == project
    assert Storage.get().directory() == project / "storage"
    assert get("optimize").predicate == {}


# threads and asyncio


def test_threads_each_see_their_own_contexts(project: Path, tmp_path: Path) -> None:
    barrier = threading.Barrier(2, timeout=30)
    seen: dict[int, dict] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            with Storage(tmp_path / f"store{i}"), Project(project), Scope(seed=i):
                barrier.wait()  # both threads are inside their contexts now
                run = get("optimize", {"lr": 0.5}).launch()
                barrier.wait()
                seen[i] = {
                    "storage": Storage.get().directory(),
                    "directory": run.local_directory(),
                    "predicate": run.predicate,
                    "all": [r.uuid for r in get("optimize").all()],
                    "uuid": run.uuid,
                }
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    for i in (1, 2):
        assert seen[i]["storage"] == tmp_path / f"store{i}"
        assert seen[i]["directory"] == tmp_path / f"store{i}" / seen[i]["uuid"]
        assert seen[i]["predicate"] == {"seed": i}
        assert seen[i]["all"] == [seen[i]["uuid"]]
    assert seen[1]["uuid"] != seen[2]["uuid"]
    assert sorted(calls(project)) == sorted([seen[1]["uuid"], seen[2]["uuid"]])
    assert Storage.get().directory() == project / "storage"
    assert get("optimize").predicate == {}


def test_asyncio_tasks_each_see_their_own_contexts(project: Path, tmp_path: Path) -> None:
    async def work(i: int, entered: list[asyncio.Event]) -> dict:
        with Storage(tmp_path / f"store{i}"), Scope(seed=i):
            entered[i].set()
            await asyncio.gather(*(event.wait() for event in entered))  # interleave
            await asyncio.sleep(0)
            run = get("optimize", {"lr": 0.5}).launch()
            await asyncio.sleep(0)
            return {
                "storage": Storage.get().directory(),
                "directory": run.local_directory(),
                "predicate": get("optimize").predicate,
                "uuid": run.uuid,
            }

    async def main() -> list[dict]:
        entered = [asyncio.Event(), asyncio.Event()]
        return await asyncio.gather(work(0, entered), work(1, entered))

    results = asyncio.run(main())
    for i, seen in enumerate(results):
        assert seen["storage"] == tmp_path / f"store{i}"
        assert seen["directory"] == tmp_path / f"store{i}" / seen["uuid"]
        assert seen["predicate"] == {"seed": i}
    assert results[0]["uuid"] != results[1]["uuid"]
    assert Storage.get().directory() == project / "storage"


def test_run_stored_elsewhere_is_listed_by_a_fresh_process(project: Path, tmp_path: Path) -> None:
    """A run stored under a Storage context is listed by a fresh process without it."""
    with Storage(tmp_path / "elsewhere-store"):
        run = get("optimize", {"lr": 0.5}).launch()
    out = run_python(
        """
        import json
        from machinable import get
        print(json.dumps([[r.uuid, str(r.local_directory())] for r in get("optimize").all()]))
        """,
        cwd=project,
    )
    assert json.loads(out.stdout) == [[run.uuid, str(tmp_path / "elsewhere-store" / run.uuid)]]
