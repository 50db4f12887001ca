"""The package's layers go one way (DESIGN.md, "Layers"), and this suite proves it.

import-linter checks the contracts in pyproject.toml; tools/import_graph.py counts
modules in import cycles (imports inside functions count). Both run on this checkout,
and once on a copy with an upward import added, to show that they catch one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root, env=env, capture_output=True, text=True, timeout=120,
    )


def graph(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "import_graph.py")],
        cwd=root, env=env, capture_output=True, text=True, timeout=120,
    )


def test_the_layer_contracts_hold():
    result = lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_no_module_sits_in_an_import_cycle():
    result = graph(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "modules in import cycles: 0" in result.stdout
    assert "upward imports from the catalog: 0" in result.stdout


def test_an_upward_import_inside_a_function_breaks_both_checks(tmp_path: Path):
    shutil.copytree(REPO / "machinable", tmp_path / "machinable", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    index = tmp_path / "machinable" / "catalog" / "index.py"
    index.write_text(
        index.read_text()
        + "\n\ndef _upward():\n    from machinable.stores import whereis\n\n    return whereis\n"
    )
    result = lint(tmp_path)
    assert result.returncode != 0
    assert "machinable.catalog.index -> machinable.stores" in result.stdout
    counted = graph(tmp_path)
    assert counted.returncode == 1
    assert "upward imports from the catalog: 1" in counted.stdout
    assert "modules in import cycles: 0" not in counted.stdout


def test_every_module_of_the_package_has_a_layer():
    """A module missing from the contract would be free to import anything."""
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    [layers] = [c for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "layers"]
    named = {
        part.strip().strip("()")
        for layer in layers["layers"]
        for part in layer.replace(":", "|").split("|")
    }
    package = REPO / "machinable"
    children = {
        path.stem if path.is_file() else path.name
        for path in package.iterdir()
        if (path.suffix == ".py" and path.stem != "__init__") or (path / "__init__.py").is_file()
    }
    assert children - named == set(), f"give these modules a layer in pyproject.toml: {sorted(children - named)}"
