"""get / launch / cached / uuid / all, predicates and scopes, module import, bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import machinable.catalog.index
from machinable import Interface, MachinableError, Project, Scope, get
from machinable.errors import ConfigError, ModuleResolutionError

from conftest import OPTIMIZE, calls, index_exists, run_python, table_rows, write_module

SEEDED = """
import os
from pydantic import BaseModel
from machinable import Interface


class Seeded(Interface):
    class Config(BaseModel):
        lr: float = 0.1

    def on_compute_predicate(self):
        return {"seed": int(os.environ.get("SEED", "0"))}

    def __call__(self):
        with open(self.project.path / "calls.txt", "a") as handle:
            handle.write(self.uuid + "\\n")
"""

NESTED = """
from pydantic import BaseModel
from machinable import Interface


class Adam(BaseModel):
    beta: float = 0.9
    eps: float = 1e-8


class Nested(Interface):
    class Config(BaseModel):
        lr: float = 0.1
        opt: Adam = Adam()

    def __call__(self):
        pass
"""

CONTAINERS = """
from typing import Optional
from pydantic import BaseModel
from machinable import Interface


class Layer(BaseModel):
    width: int = 8


class Containers(Interface):
    class Config(BaseModel):
        head: Optional[Layer] = None
        layers: list[Layer] = []
        named: dict[str, Layer] = {}
"""



def index_rows(project: Path) -> list[tuple]:
    """Every row of the project's index (runs, then locations), on SQLite or PostgreSQL;
    empty while the index does not exist (reading it never creates it)."""
    if not index_exists(project):
        return []
    return table_rows("runs") + table_rows("locations")


def tree(root: Path) -> list[str]:
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# launch / cached / uuid


def test_launch_computes_once_and_reads_result(project: Path) -> None:
    run = get("optimize", {"lr": 0.5})
    assert not run.cached()
    assert run.status() == "new"
    assert run.launch() is run
    assert calls(project) == [run.uuid]
    assert run.cached()
    assert run.status() == "finished"
    assert run.loss() == pytest.approx(1 / (1 + 0.5 * 100))

    run.launch()
    get("optimize", {"lr": 0.5}).launch()
    assert calls(project) == [run.uuid]


def test_uuid_is_content_addressed_and_stable_across_launch(project: Path) -> None:
    run = get("optimize", {"lr": 0.5})
    before = run.uuid
    assert len(before) == 32 and set(before) <= set("0123456789abcdef")
    assert get("optimize", {"lr": 0.5}).uuid == before
    run.launch()
    assert run.uuid == before
    assert get("optimize", {"lr": 0.5}).uuid == before
    assert get("optimize", {"lr": 0.6}).uuid != before


def test_fresh_process_computes_same_uuid_and_does_not_recompute(project: Path) -> None:
    run = get("optimize", {"lr": 0.5})
    unlaunched = get("optimize", {"lr": 0.25}).uuid
    run.launch()
    out = run_python(
        """
        import json
        from machinable import get
        run = get("optimize", {"lr": 0.5})
        cached = run.cached()
        run.launch()
        print(json.dumps({
            "uuid": run.uuid,
            "cached": cached,
            "loss": run.loss(),
            "dir": str(run.local_directory()),
            "other": get("optimize", {"lr": 0.25}).uuid,
        }))
        """,
        cwd=project,
    )
    seen = json.loads(out.stdout)
    assert seen["uuid"] == run.uuid
    assert seen["other"] == unlaunched
    assert seen["cached"] is True
    assert seen["loss"] == pytest.approx(run.loss())
    assert seen["dir"] == str(run.local_directory())
    assert calls(project) == [run.uuid]


def test_run_launched_in_another_process_is_found_here(project: Path) -> None:
    out = run_python(
        """
        from machinable import get
        print(get("optimize", {"lr": 0.5}).launch().uuid)
        """,
        cwd=project,
    )
    run = get("optimize", {"lr": 0.5})
    assert run.uuid == out.stdout.strip()
    assert run.cached()
    assert run.is_mounted()
    run.launch()
    assert calls(project) == [run.uuid]
    assert [r.uuid for r in get("optimize").all()] == [run.uuid]


GATED = """
import os
import time
from machinable import Interface


class Gated(Interface):
    def __call__(self):
        with open(self.project.path / "calls.txt", "a") as handle:
            handle.write(self.uuid + "\\n")
        (self.project.path / "computing").write_text(str(os.getpid()))
        while not (self.project.path / "gate").exists():  # opened by the test
            time.sleep(0.01)
"""

# A launcher that says when it has tried the run's lock and found it held: the lock logs
# "lock ... not acquired" at DEBUG before it waits.
WAITER = """
import logging, os, sys
from pathlib import Path


class Waiting(logging.Handler):
    def emit(self, record):
        if "not acquired" in record.getMessage():
            Path(f"waiting-{os.getpid()}").touch()


logging.getLogger("machinable.locks").addHandler(Waiting())
logging.getLogger("machinable.locks").setLevel(logging.DEBUG)
from machinable import get
run = get("gated").launch()
print(run.uuid, run.status())
"""


def test_concurrent_launches_in_separate_processes_compute_once(project: Path) -> None:
    """Certain overlap: the first launch holds the lock inside __call__ until the test
    opens the gate, and it does so only after both other launches have found the lock
    held and are waiting for it."""
    write_module(project, "gated", GATED)
    processes: list[subprocess.Popen[str]] = []

    def start() -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-c", WAITER], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        processes.append(process)
        return process

    try:
        first = start()
        wait_for(lambda: (project / "computing").exists(), first)
        for waiter in (start(), start()):
            wait_for(lambda w=waiter: (project / f"waiting-{w.pid}").exists(), waiter)
        assert calls(project) == [get("gated").uuid]  # only the first, still inside __call__
        (project / "gate").touch()
        outputs = [process.communicate(timeout=120) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    uuid = get("gated").uuid
    assert [out.split() for out, _ in outputs] == [[uuid, "finished"]] * 3, outputs
    assert calls(project) == [uuid]


def wait_for(condition, process, timeout: float = 120) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"a launcher ended early: {out} {err[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("a launcher never got there")
        time.sleep(0.01)


def test_defaults_and_equivalent_configs_name_the_same_run(project: Path) -> None:
    default = get("optimize").uuid
    assert get("optimize", {}).uuid == default
    assert get("optimize", {"lr": 0.1}).uuid == default
    assert get("optimize", {"lr": 0.1, "steps": 100}).uuid == default
    assert get("optimize", {"lr": 1}).uuid == get("optimize", {"lr": 1.0}).uuid
    assert (
        get("optimize", {"lr": 0.5, "steps": 3}).uuid
        == get("optimize", {"steps": 3, "lr": 0.5}).uuid
    )
    assert get("optimize", {"steps": 3}).uuid != default

    get("optimize", {"lr": 0.1, "steps": 100}).launch()
    assert get("optimize").cached()
    get("optimize").launch()
    assert calls(project) == [default]


def test_nested_config_defaults_and_dotted_keys(project: Path) -> None:
    write_module(project, "nested", NESTED)
    default = get("nested").uuid
    assert get("nested", {"opt": {"beta": 0.9}}).uuid == default
    assert get("nested", {"opt.beta": 0.9}).uuid == default
    changed = get("nested", {"opt": {"beta": 0.5}})
    assert changed.uuid != default
    assert get("nested", {"opt.beta": 0.5}).uuid == changed.uuid
    assert changed.config.opt.beta == 0.5
    assert changed.config.opt.eps == 1e-8


def test_config_is_validated(project: Path) -> None:
    run = get("optimize", {"lr": 1})
    assert run.config.lr == 1.0
    assert isinstance(run.config.lr, float)
    assert run.config.steps == 100
    assert get("optimize", {"steps": "7"}).config.steps == 7


def test_identity_uses_project_name_not_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    roots = [tmp_path / "a" / "study", tmp_path / "b" / "study", tmp_path / "c" / "other"]
    for root in roots:
        write_module(root, "optimize", OPTIMIZE)
    uuids = []
    for root in roots:
        with Project(root):
            uuids.append(get("optimize", {"lr": 0.5}).uuid)
    assert uuids[0] == uuids[1]
    assert uuids[2] != uuids[0]

    with Project(roots[0]):
        get("optimize", {"lr": 0.5}).launch()
    assert (roots[0] / "storage" / uuids[0] / "finished_at").is_file()
    # The copy in b/ is its own checkout: computing there finds the same uuid in a
    # fresh process, from a cwd that is neither project.
    out = run_python(
        f"""
        from machinable import Project, get
        with Project({str(roots[1])!r}):
            print(get("optimize", {{"lr": 0.5}}).uuid)
        """,
        cwd=tmp_path,
    )
    assert out.stdout.strip() == uuids[0]


# all()


def test_all_returns_every_stored_run_of_the_module(project: Path) -> None:
    write_module(project, "nested", NESTED)
    launched = {get("optimize", {"lr": lr}).launch().uuid for lr in (0.2, 0.3, 0.4)}
    get("optimize", {"lr": 0.9})  # named but never launched
    get("nested").launch()

    found = get("optimize").all()
    assert {run.uuid for run in found} == launched
    assert len(found) == 3
    for run in found:
        assert type(run) is type(get("optimize"))
        assert run.cached()
        assert run.loss() == pytest.approx(1 / (1 + run.config.lr * 100))
    assert {run.config.lr for run in found} == {0.2, 0.3, 0.4}
    # all() from any run of the module, not only the defaults
    assert {run.uuid for run in get("optimize", {"lr": 0.2}).all()} == launched


def test_all_pages_without_a_cap(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machinable.catalog.index, "PAGE_SIZE", 2)
    launched = {get("optimize", {"steps": steps}).launch().uuid for steps in range(1, 6)}
    found = get("optimize").all()
    assert len(found) == 5
    assert {run.uuid for run in found} == launched


def test_all_in_a_fresh_process(project: Path) -> None:
    launched = sorted(get("optimize", {"lr": lr}).launch().uuid for lr in (0.2, 0.3))
    out = run_python(
        """
        from machinable import get
        print(" ".join(sorted(r.uuid for r in get("optimize").all())))
        """,
        cwd=project,
    )
    assert out.stdout.split() == launched


def test_is_mounted(project: Path) -> None:
    run = get("optimize", {"lr": 0.5})
    assert not run.is_mounted()
    assert not get("optimize", {"lr": 0.7}).is_mounted()
    run.launch()
    assert run.is_mounted()
    assert get("optimize", {"lr": 0.5}).is_mounted()
    assert not get("optimize", {"lr": 0.7}).is_mounted()


# predicates and scopes


def test_on_compute_predicate_separates_runs(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_module(project, "seeded", SEEDED)
    monkeypatch.setenv("SEED", "1")
    one = get("seeded", {"lr": 0.5})
    assert one.predicate == {"seed": 1}
    monkeypatch.setenv("SEED", "2")
    two = get("seeded", {"lr": 0.5})
    assert two.predicate == {"seed": 2}
    assert one.uuid != two.uuid
    one.launch()
    two.launch()
    assert calls(project) == [one.uuid, two.uuid]
    model = json.loads((one.local_directory() / "model.json").read_text())
    assert model["predicate"] == {"seed": 1}

    out = run_python(
        """
        from machinable import get
        run = get("seeded", {"lr": 0.5})
        print(run.uuid, run.cached())
        """,
        cwd=project,
        env={"SEED": "1"},
    )
    assert out.stdout.split() == [one.uuid, "True"]


def test_scope_makes_distinct_runs_and_filters_all(project: Path) -> None:
    plain = get("optimize", {"lr": 0.5}).launch()
    with Scope({"seed": 3}):
        three = get("optimize", {"lr": 0.5})
        assert three.predicate == {"seed": 3}
        three.launch()
    with Scope({"seed": 4}):
        four = get("optimize", {"lr": 0.5}).launch()
    assert len({plain.uuid, three.uuid, four.uuid}) == 3
    assert calls(project) == [plain.uuid, three.uuid, four.uuid]

    with Scope({"seed": 3}):
        again = get("optimize", {"lr": 0.5})
        assert again.uuid == three.uuid
        assert again.cached()
        again.launch()
        assert [run.uuid for run in get("optimize").all()] == [three.uuid]
    assert calls(project) == [plain.uuid, three.uuid, four.uuid]
    assert {run.uuid for run in get("optimize").all()} == {plain.uuid, three.uuid, four.uuid}

    with Scope({"seed": 3}), Scope(data="mnist"):
        inner = get("optimize", {"lr": 0.5})
        assert inner.predicate == {"seed": 3, "data": "mnist"}
        assert inner.uuid not in {plain.uuid, three.uuid}
        assert get("optimize").all() == []

    out = run_python(
        """
        from machinable import Scope, get
        with Scope({"seed": 3}):
            run = get("optimize", {"lr": 0.5})
            print(run.uuid, run.cached())
        """,
        cwd=project,
    )
    assert out.stdout.split() == [three.uuid, "True"]


def test_scope_with_structured_values_finds_its_runs(project: Path) -> None:
    with Scope({"pair": (1, 2), "data": {"name": "mnist", "split": [0.8, 0.2]}}):
        run = get("optimize", {"lr": 0.5}).launch()
        assert [r.uuid for r in get("optimize").all()] == [run.uuid]
    with Scope({"pair": [1, 2], "data": {"split": [0.8, 0.2], "name": "mnist"}}):
        assert get("optimize", {"lr": 0.5}).uuid == run.uuid
        assert [r.uuid for r in get("optimize").all()] == [run.uuid]
    with Scope({"pair": [2, 1]}):
        assert get("optimize").all() == []


# module import


def test_module_top_level_code_runs_once_per_process(project: Path) -> None:
    write_module(
        project,
        "counted",
        """
        import os
        from machinable import Interface

        with open(os.path.join(os.path.dirname(__file__), "imports.txt"), "a") as handle:
            handle.write(str(os.getpid()) + "\\n")


        class Counted(Interface):
            pass
        """,
    )
    first = get("counted")
    assert type(first) is type(get("counted"))
    first.launch()
    get("counted").launch()
    get("counted").all()
    assert (project / "imports.txt").read_text().split() == [str(os.getpid())]

    run_python(
        """
        from machinable import get
        assert type(get("counted")) is type(get("counted"))
        get("counted").launch()
        get("counted").all()
        """,
        cwd=project,
    )
    lines = (project / "imports.txt").read_text().split()
    assert len(lines) == 2
    assert lines[0] == str(os.getpid()) and lines[1] != lines[0]


def test_get_hydrates_only_the_run_it_names(project: Path) -> None:
    write_module(
        project,
        "counting",
        """
        from pydantic import BaseModel, model_validator
        from machinable import Interface

        VALIDATED = []


        class Counting(Interface):
            class Config(BaseModel):
                x: int = 0

                @model_validator(mode="after")
                def _count(self):
                    VALIDATED.append(self.x)
                    return self
        """,
    )
    for x in range(1, 21):
        get("counting", {"x": x}).launch()
    validated = sys.modules[type(get("counting")).__module__].VALIDATED
    validated.clear()
    run = get("counting", {"x": 7})
    assert run.cached() and run.is_mounted() and run.status() == "finished"
    assert validated == [7]
    validated.clear()
    runs = get("counting", {"x": 7}).all()
    assert len(runs) == 20 and validated == [7]  # all() is lazy: counting hydrates no run
    assert sorted(run.config.x for run in runs) == list(range(1, 21))
    assert sorted(validated) == sorted([7, *range(1, 21)])


def test_get_accepts_an_interface_class(project: Path) -> None:
    cls = type(get("optimize"))
    assert issubclass(cls, Interface)
    assert get(cls, {"lr": 0.5}).uuid == get("optimize", {"lr": 0.5}).uuid


# bad input: a clear error and nothing stored changes


@pytest.fixture
def stored(project: Path):
    """A project with one stored run; yields a function that says nothing changed."""
    write_module(project, "nested", NESTED)
    get("optimize", {"lr": 0.5}).launch()
    before = (tree(project / "storage"), index_rows(project), calls(project))

    def unchanged() -> bool:
        return (tree(project / "storage"), index_rows(project), calls(project)) == before

    assert len(before[1]) == 2  # one run, one location
    return unchanged


def _bad(call, error: type[Exception], *needles: str) -> str:
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert isinstance(info.value, MachinableError)
    return message


def test_unknown_module(stored, project: Path) -> None:
    _bad(lambda: get("nosuchmodule").launch(), ModuleResolutionError, "nosuchmodule")
    _bad(lambda: get("../optimize"), ModuleResolutionError, "../optimize")
    assert stored()


def test_module_without_interface(stored, project: Path) -> None:
    write_module(project, "plain", "def helper():\n    return 1\n")
    _bad(lambda: get("plain", {"lr": 0.5}).launch(), ModuleResolutionError, "plain", "Interface")
    assert stored()


def test_module_that_fails_to_import(stored, project: Path) -> None:
    write_module(project, "broken", "raise ImportError('needs torch')\n")
    _bad(lambda: get("broken").launch(), ModuleResolutionError, "broken", "needs torch")
    assert stored()


def test_invalid_config_names_the_field(stored) -> None:
    message = _bad(lambda: get("optimize", {"lr": "fast"}).launch(), ConfigError, "optimize", "lr")
    assert "fast" in message
    _bad(lambda: get("optimize", {"steps": 1.5}).launch(), ConfigError, "steps")
    _bad(lambda: get("nested", {"opt": {"beta": "high"}}).launch(), ConfigError, "opt.beta")
    _bad(lambda: get("optimize", "lr=0.5"), ConfigError, "optimize", "dict")
    assert stored()


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_are_refused(stored, value: float) -> None:
    message = _bad(lambda: get("optimize", {"lr": value}).launch(), ConfigError, "optimize", "lr")
    assert "nan" in message.lower() or "inf" in message.lower()
    _bad(lambda: get("nested", {"opt": {"eps": value}}).launch(), ConfigError, "nested", "opt.eps")
    with pytest.raises(ConfigError):
        with Scope({"seed": value}):
            get("optimize").launch()
    assert stored()


def test_unknown_config_keys_are_refused(stored) -> None:
    _bad(lambda: get("optimize", {"lrr": 0.5}).launch(), ConfigError, "optimize", "lrr")
    _bad(lambda: get("nested", {"opt": {"betta": 0.5}}).launch(), ConfigError, "nested", "opt.betta")
    _bad(lambda: get("nested", {"opt.betta": 0.5}).launch(), ConfigError, "opt.betta")
    assert stored()


def test_unknown_keys_inside_optional_list_and_dict_models(stored, project: Path) -> None:
    write_module(project, "containers", CONTAINERS)
    _bad(lambda: get("containers", {"head": {"widht": 4}}).launch(), ConfigError, "head.widht")
    _bad(
        lambda: get("containers", {"layers": [{"width": 4}, {"widht": 4}]}).launch(),
        ConfigError,
        "layers[1].widht",
    )
    _bad(lambda: get("containers", {"named": {"x": {"widht": 4}}}).launch(), ConfigError, "widht")
    assert stored()
    run = get("containers", {"head": {"width": 4}, "layers": [{}], "named": {"x": {"width": 2}}})
    assert run.config.head.width == 4
    assert run.uuid != get("containers", {"head": {}}).uuid


def test_bad_input_in_a_fresh_project_creates_nothing(project: Path) -> None:
    write_module(project, "plain", "X = 1\n")
    write_module(
        project,
        "notpydantic",
        """
        from machinable import Interface


        class Notpydantic(Interface):
            class Config:
                lr = 0.1
        """,
    )
    write_module(
        project,
        "twice",
        """
        from machinable import Interface


        class First(Interface):
            pass


        class Second(Interface):
            pass
        """,
    )
    before = tree(project)
    _bad(lambda: get("missing").launch(), ModuleResolutionError, "missing")
    _bad(lambda: get("plain").launch(), ModuleResolutionError, "plain")
    _bad(lambda: get("notpydantic").launch(), ConfigError, "Notpydantic.Config", "pydantic")
    _bad(lambda: get("twice").launch(), ModuleResolutionError, "twice", "First", "Second")
    _bad(lambda: get("optimize", {"lr": "x"}).launch(), ConfigError, "lr")
    _bad(lambda: get("optimize", {"lr": math.nan}).launch(), ConfigError, "lr")
    _bad(lambda: get("optimize", {"nope": 1}).launch(), ConfigError, "nope")
    after = [p for p in tree(project) if "__pycache__" not in p]
    assert after == [p for p in before if "__pycache__" not in p]
    assert not (project / "storage").exists()
    assert not (project / ".machinable.sqlite").exists()
    assert not index_exists(project)  # the SQLite file, or any table in the PostgreSQL schema


def test_get_rejects_a_non_module(stored) -> None:
    _bad(lambda: get(42), MachinableError, "42")
    assert stored()
