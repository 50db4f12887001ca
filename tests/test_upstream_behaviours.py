"""Behaviours that code written for machinable 5.x relies on (issue 13, part 3)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from machinable import Scope, get
from machinable.errors import ConfigError, IdentityWarning, RemoteError
from machinable.project import forget_imports

from conftest import invoke, one_line_error, write_module


@pytest.fixture(autouse=True)
def _fresh_imports():
    forget_imports()
    yield
    forget_imports()


# --------------------------------------------------------------------------- versions


def test_none_entries_in_a_version_list_are_skipped(project: Path) -> None:
    base = {"lr": 0.5}
    run = get("optimize", [base, None])
    assert run.uuid == get("optimize", base).uuid
    assert run.version == [base]
    assert get("optimize", [None]).uuid == get("optimize").uuid
    assert get("optimize", [None, {"steps": 3}, None]).config.steps == 3
    run.launch()
    assert run.loss() == pytest.approx(1 / (1 + 0.5 * 100))


LENIENT = """
from pydantic import BaseModel, ConfigDict
from machinable import Interface


class Optimizer(BaseModel):
    model_config = ConfigDict(extra="ignore")
    beta: float = 0.9


class Strict(BaseModel):
    gamma: float = 0.1


class Lenient(Interface):
    class Config(BaseModel):
        model_config = ConfigDict(extra="ignore")
        lr: float = 0.1
        opt: Optimizer = Optimizer()
        strict: Strict = Strict()


class Partly(Interface):
    class Config(BaseModel):
        lr: float = 0.1
        opt: Optimizer = Optimizer()
"""


def test_a_config_with_extra_ignore_ignores_unknown_keys(project: Path) -> None:
    write_module(project, "lenient", LENIENT)
    plain = get("lenient", {"lr": 0.5})
    noisy = get("lenient", {"lr": 0.5, "momentum": 0.9, "opt": {"beta": 0.8, "old_key": 1}})
    assert noisy.config.opt.beta == 0.8
    assert noisy.uuid == get("lenient", {"lr": 0.5, "opt": {"beta": 0.8}}).uuid
    assert "momentum" not in noisy.config.model_dump()
    assert plain.uuid != noisy.uuid  # beta differs; the ignored keys play no part
    noisy.launch()
    assert get("lenient", {"lr": 0.5, "opt.beta": 0.8}).cached()

    # a nested model that does not ignore extras still refuses them
    with pytest.raises(ConfigError, match="strict.delta"):
        get("lenient", {"strict": {"delta": 1}})
    # nested ignore inside a strict model: only the nested model's extras are ignored
    assert get("lenient:Partly", {"opt": {"junk": 1}}).uuid == get("lenient:Partly").uuid
    with pytest.raises(ConfigError, match="junk"):
        get("lenient:Partly", {"junk": 1})


# --------------------------------------------------------------------------- identity


HIDDEN = """
from typing import Annotated
from pydantic import BaseModel
from machinable import Interface
from machinable.identity import NotIdentifying


class Hidden(Interface):
    class Config(BaseModel):
        lr: float = 0.1
        workers: Annotated[int, NotIdentifying] = 1


class Separated(Interface):
    class Config(BaseModel):
        workers: Annotated[int, NotIdentifying] = 1

    def on_compute_predicate(self):
        return {"workers": self.config.workers}
"""


def _identity_warnings(action) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    return [str(w.message) for w in caught if issubclass(w.category, IdentityWarning)]


def test_a_non_identifying_value_without_a_predicate_warns(project: Path) -> None:
    write_module(project, "hidden", HIDDEN)
    found = _identity_warnings(lambda: get("hidden", {"workers": 8}))
    assert len(found) == 1
    assert "workers" in found[0] and get("hidden").uuid in found[0]
    assert get("hidden", {"workers": 8}).uuid == get("hidden").uuid  # what the warning is about

    # nothing to warn about: the default, a scope, or a predicate of the module's own
    assert _identity_warnings(lambda: get("hidden", {"lr": 0.3})) == []
    with Scope({"run": 2}):
        assert _identity_warnings(lambda: get("hidden", {"workers": 8})) == []
    assert _identity_warnings(lambda: get("hidden:Separated", {"workers": 8})) == []
    assert get("hidden:Separated", {"workers": 8}).uuid != get("hidden:Separated").uuid


# --------------------------------------------------------------------------- scopes


def test_a_scope_merges_a_list_of_predicates_in_order(project: Path) -> None:
    scope = Scope([{"seed": 1, "data": {"name": "mnist", "split": "train"}}, None, {"seed": 2, "data": {"split": "test"}}])
    assert scope.predicate == {"seed": 2, "data": {"name": "mnist", "split": "test"}}
    with scope:
        listed = get("optimize").launch()
    with Scope({"seed": 2, "data": {"name": "mnist", "split": "test"}}):
        assert get("optimize").uuid == listed.uuid
        assert [run.uuid for run in get("optimize").all()] == [listed.uuid]
    with Scope({"seed": 1, "data": {"name": "mnist", "split": "train"}}):
        assert get("optimize").uuid != listed.uuid
    with pytest.raises(ConfigError, match="list of dicts"):
        Scope([{"seed": 1}, 3])
    with pytest.raises(ConfigError, match="list of dicts"):
        Scope("seed")


# --------------------------------------------------------------------------- remotes


def _provider(project: Path, remotes: dict) -> None:
    write_module(
        project,
        "interface.project",
        "from machinable import Project\n\n\n"
        "class Provider(Project):\n"
        f"    def on_resolve_remotes(self):\n        return {remotes!r}\n",
    )


MAIN = """
from machinable import Interface
from .helper import double


class Main(Interface):
    def answer(self):
        return double(21)
"""

HELPER = """
from .base import ONE


def double(x):
    return 2 * x * ONE
"""


def test_remotes_declared_as_a_list_bring_their_dependencies(project: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    write_module(shared, "main", MAIN)
    write_module(shared, "helper", HELPER)
    write_module(shared, "base", "ONE = 1\n")
    write_module(shared, "unused", "X = 0\n")
    _provider(
        project,
        {
            "main": [f"file+{shared / 'main.py'}", "helper"],
            "helper": [f"file+{shared / 'helper.py'}", "base"],  # resolved transitively
            "base": f"file+{shared / 'base.py'}",
            "unused": f"file+{shared / 'unused.py'}",
        },
    )
    assert get("main").answer() == 42
    remotes = project / "interface" / "remotes"
    assert sorted(p.name for p in remotes.glob("*.py")) == ["base.py", "helper.py", "main.py"]

    # the CLI fetches a named remote with what it depends on
    for path in remotes.glob("*.py"):
        path.unlink()
    invoke("fetch", "main")
    assert sorted(p.name for p in remotes.glob("*.py")) == ["base.py", "helper.py", "main.py"]


def test_an_undeclared_remote_dependency_is_a_remote_error(project: Path, tmp_path: Path) -> None:
    write_module(tmp_path / "shared", "main", MAIN)
    _provider(project, {"main": [f"file+{tmp_path / 'shared' / 'main.py'}", "helper"]})
    with pytest.raises(RemoteError, match="'helper'"):
        get("main")
    one_line_error(invoke("fetch", ok=False), "helper", "does not declare")
    assert not (project / "interface" / "remotes").exists()
    for bad in ([], [3], [f"file+{tmp_path}", 4]):
        forget_imports()
        _provider(project, {"main": bad})
        with pytest.raises(RemoteError, match="main"):
            get("main")


# --------------------------------------------------------------------------- the CLI


HELLO = """
from machinable import Interface


class Hello(Interface):
    def greet(self, name="world", repeat=1):
        return " ".join([f"hello {name}"] * repeat)

    def echo(self, *values, **options):
        return {"values": list(values), "options": options}
"""


def test_cli_calls_a_method_with_literal_arguments(project: Path) -> None:
    write_module(project, "hello", HELLO)
    assert invoke("get", "hello", "--greet(name='CLI', repeat=2)").stdout.strip() == "hello CLI hello CLI"
    assert invoke("get", "hello", "--greet").stdout.strip() == "hello world"
    assert invoke("get", "hello", "--greet()").stdout.strip() == "hello world"
    assert invoke("get", "hello", '--greet("pos")').stdout.strip() == "hello pos"
    out = invoke("get", "hello", "--echo(1, [2, 3], flag=True, none=None, d={'a': (1, 2)})").stdout
    assert out.strip() == '{"values": [1, [2, 3]], "options": {"flag": true, "none": null, "d": {"a": [1, 2]}}}'


@pytest.mark.parametrize(
    "arg, needle",
    [
        ("--greet(name=__import__('os').system('touch pwned'))", "literal"),
        ("--greet(name=open('pwned', 'w'))", "literal"),
        ("--greet(name='x'", "')'"),
        ("--greet(name=)", "invalid arguments"),
        ("--greet(**{'name': 'x'})", "literal"),
        ("--greet(*['x'])", "literal"),
        ("--greet(nope=1)", "nope"),
        ("--greet(1, 2, 3)", "too many"),
        ("--greet(name='x', name='y')", "invalid arguments"),
        ("--greet(" + "(" * 3000 + ")" * 3000 + ")", "invalid arguments"),
        ("--greet(name='" + "x" * 20_000 + "')", "longer than"),
        ("--gr-eet!(1)", "not a method name"),
    ],
)
def test_cli_refuses_invalid_method_arguments_in_one_line(project: Path, arg: str, needle: str) -> None:
    write_module(project, "hello", HELLO)
    result = invoke("get", "hello", arg, ok=False)
    one_line_error(result, needle)
    assert not (project / "pwned").exists()
    assert not (project / "storage").exists()


def test_bare_machinable_prints_help_and_succeeds(project: Path) -> None:
    result = invoke()
    assert result.exit_code == 0
    assert "Usage: machinable" in result.stdout and "Commands:" in result.stdout
    assert result.stderr == ""
