"""Names longer than the index can hold are refused before anything is computed,
and an index named by the caller is the one migrated."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command

from machinable import Index, Project, get
from machinable.catalog.engine import (
    SCHEMA_HEAD,
    alembic_config,
    current_revision,
    make_engine,
    to_url,
)
from machinable.errors import ModuleResolutionError

from conftest import calls, write_module


def test_an_overlong_module_name_is_refused_up_front(project: Path):
    name = ".".join(["segment"] * 40)  # 319 characters of valid identifiers
    write_module(project, name, (project / "optimize.py").read_text())
    with pytest.raises(ModuleResolutionError, match="the limit is 255"):
        get(name)
    assert calls(project) == []
    assert Index.get().count() == 0


def test_an_overlong_project_name_is_refused_up_front(tmp_path: Path, project: Path):
    with Project(project, name="p" * 300):
        with pytest.raises(ModuleResolutionError, match="project name"):
            get("optimize").launch()
    assert calls(project) == []


def test_alembic_config_url_wins_over_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    elsewhere = tmp_path / "from-environment.sqlite"
    wanted = tmp_path / "named.sqlite"
    monkeypatch.setenv("MACHINABLE_INDEX", str(elsewhere))
    command.upgrade(alembic_config(to_url(wanted)), "head")
    assert current_revision(make_engine(to_url(wanted))) == SCHEMA_HEAD
    assert not elsewhere.exists()
