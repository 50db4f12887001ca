"""Issue 10, finding 13: a mixed soak of real processes stays correct.

Three processes launch overlapping runs and read them back while others loop reindex,
``push --all``, verify, and ``evict --where`` with ``pull --all`` against one store. No
command may fail or print a traceback, the final verify must be clean, and every run's
bytes must be the ones its launch wrote. Short here (about 15 s of load); the same
harness runs longer as ``benchmarks/bench_soak.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from soak import run_soak

SECONDS = 15.0


@pytest.mark.timeout(900)
def test_a_mixed_soak_keeps_every_run_and_its_bytes(sqlite_project: Path, tmp_path: Path) -> None:
    store = (tmp_path / "store").as_uri()
    result = run_soak(sqlite_project, store, SECONDS)
    problems = result.problems(sqlite_project)
    assert problems == [], "\n".join(problems[:20])
    # the soak did exercise every loop, and read runs back
    for name in ("reindex", "push", "verify", "evict-pull"):
        assert result.commands[name] >= 1, result.commands
    assert len(result.launches) >= 5
    assert result.reads
