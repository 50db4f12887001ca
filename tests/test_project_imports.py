"""How project modules are imported: relative imports, no shadowing of the standard
library, and one identity per Interface class."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from machinable import get
from machinable.errors import ModuleResolutionError

from conftest import calls, invoke, run_python, write_module

BASE = """
from pydantic import BaseModel
from machinable import Interface

SCALE = 10


class Base(Interface):
    class Config(BaseModel):
        x: int = 1

    def __call__(self):
        self.save_file("out.json", {"value": self.config.x * self.scale()})

    def scale(self):
        return SCALE

    def value(self):
        return self.load_file("out.json")["value"]
"""

TRAIN = """
from .base import Base
from . import helpers


class Train(Base):
    def scale(self):
        return helpers.FACTOR
"""


def test_a_module_in_a_subfolder_imports_its_siblings_relatively(project: Path) -> None:
    write_module(project, "experiments.base", BASE)
    write_module(project, "experiments.helpers", "FACTOR = 7\n")
    write_module(project, "experiments.train", TRAIN)
    run = get("experiments.train", {"x": 3}).launch()
    assert run.value() == 21
    assert run.module == "experiments.train"
    assert get("experiments.base", {"x": 3}).launch().value() == 30

    # the same in a fresh process, and through the CLI
    result = run_python(
        """
        from machinable import get
        print(get("experiments.train", {"x": 3}).value())
        """,
        cwd=project,
    )
    assert result.stdout.split() == ["21"]
    assert invoke("get", "experiments.train", "x=3", "--value").stdout.split() == ["21"]


def test_a_top_level_module_imports_a_sibling_relatively(project: Path) -> None:
    write_module(project, "shared", "OFFSET = 5\n")
    write_module(
        project,
        "relative",
        """
        from machinable import Interface
        from .shared import OFFSET


        class Relative(Interface):
            def answer(self):
                return OFFSET
        """,
    )
    assert get("relative").answer() == 5


SOUND = """
import wave

from machinable import Interface


class Sound(Interface):
    def __call__(self):
        path = self.local_directory() / "tone.wav"
        with wave.open(str(path), "wb") as handle:  # the standard library's wave
            handle.setnchannels(1)
            handle.setsampwidth(1)
            handle.setframerate(8000)
            handle.writeframes(bytes(80))

    def frames(self):
        with wave.open(str(self.local_directory() / "tone.wav"), "rb") as handle:
            return handle.getnframes()
"""

WAVE = """
from machinable import Interface


class Wave(Interface):
    def kind(self):
        return "project"
"""


def test_a_project_module_named_wave_does_not_shadow_the_standard_library(
    project: Path, tmp_path: Path
) -> None:
    write_module(project, "wave", WAVE)
    write_module(project, "sound", SOUND)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # A fresh interpreter started outside the project (``python -c`` puts its own cwd
    # first on sys.path; the project must not get there by machinable).
    result = run_python(
        f"""
        import sys, sysconfig
        from machinable import Project, get

        with Project({str(project)!r}):
            assert get("wave").kind() == "project"
            assert get("sound").launch().frames() == 80
        import wave
        assert wave.__file__.startswith(sysconfig.get_paths()["stdlib"]), wave.__file__
        assert hasattr(wave, "open")
        root = {str(project)!r}
        assert sys.path[0] != root
        assert sys.path.index(root) > sys.path.index(sysconfig.get_paths()["stdlib"])
        print("ok")
        """,
        cwd=elsewhere,
    )
    assert result.stdout.split() == ["ok"]

    # `python -m machinable` run inside the project: a project module that uses the
    # standard library's wave still gets it.
    second = subprocess.run(
        [sys.executable, "-m", "machinable", "get", "sound", "--launch", "--frames"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode == 0, second.stderr
    assert second.stdout.split()[-1] == "80"


def test_absolute_imports_of_project_siblings_keep_working(project: Path) -> None:
    """Modules written for machinable 5.x import their siblings by absolute name."""
    write_module(project, "siblinghelpers", "VALUE = 11\n")
    write_module(
        project,
        "absolute",
        """
        import siblinghelpers
        from machinable import Interface


        class Absolute(Interface):
            def answer(self):
                return siblinghelpers.VALUE
        """,
    )
    assert get("absolute").answer() == 11


MODELS = """
from machinable import Interface


class Models(Interface):
    def __call__(self):
        with open(self.project.path / "calls.txt", "a") as handle:
            handle.write(type(self).__name__ + "\\n")
        self.save_file("who.txt", type(self).__name__)

    def who(self):
        return self.load_file("who.txt")


class Bigger(Models):
    pass
"""


def test_a_class_and_its_subclass_in_one_module_are_different_runs(project: Path) -> None:
    write_module(project, "models", MODELS)
    parent = get("models").launch()
    child = get("models:Bigger")
    assert type(child).__name__ == "Bigger"
    assert child.module == "models:Bigger" and parent.module == "models"
    assert child.uuid != parent.uuid
    assert not child.cached()
    child.launch()
    assert child.who() == "Bigger" and parent.who() == "Models"
    assert calls(project) == ["Models", "Bigger"]

    # the class object itself names the same run as its name does
    assert get(type(child)).uuid == child.uuid
    assert get(type(parent)).uuid == parent.uuid
    assert [run.uuid for run in get("models").all()] == [parent.uuid]
    assert [run.uuid for run in get("models:Bigger").all()] == [child.uuid]
    assert invoke("get", "models:Bigger", "--who").stdout.split() == ["Bigger"]

    with pytest.raises(ModuleResolutionError, match="Smaller"):
        get("models:Smaller")


def test_a_subclass_in_another_module_never_inherits_its_parents_name(project: Path) -> None:
    write_module(project, "models", MODELS)
    write_module(
        project,
        "special",
        """
        from .models import Models


        class Special(Models):
            pass
        """,
    )
    special = get("special").launch()
    assert special.module == "special"
    assert special.uuid != get("models").uuid
    assert special.who() == "Special"


def test_a_module_of_several_unrelated_interfaces_names_how_to_pick_one(project: Path) -> None:
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
    with pytest.raises(ModuleResolutionError, match="twice:First"):
        get("twice")
    assert get("twice:First").uuid != get("twice:Second").uuid
