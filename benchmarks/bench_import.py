"""``machinable import`` of a machinable 5.x storage, against a plain copy of it.

    python benchmarks/bench_import.py               # 1,000 runs
    python benchmarks/bench_import.py --runs 5000

Writes a storage in 5.x's layout (each run: id.json, model.json, cached, updated_at, two
result files and one execution record with its markers and log), then times the import
into a fresh project and, as the baseline measured in the same run, ``shutil.copytree``
of the same folder (the bytes alone, no parsing, no index).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path

MODULE = """
from pydantic import BaseModel
from machinable import Interface


class Train(Interface):
    class Config(BaseModel):
        lr: float = 0.1
        steps: int = 3
"""

STAMP = "2026-11-30T10:00:00.000000+00:00"


def write_upstream(root: Path, runs: int) -> None:
    for i in range(runs):
        run = root / f"{i:024x}" / ("0" * 32)
        execution = run / ("e" * 24) / "2026-11-30_100000"
        execution.mkdir(parents=True)
        uid = f"r{i:011d}"
        config = {"lr": i / runs, "steps": 3, "_default_": {"lr": 0.1, "steps": 3}, "_version_": [], "_update_": {}}
        (run / ".machinable").write_text(uid)
        (run / "id.json").write_text(json.dumps({"format": 1, "uuid": uid, "kind": "Interface", "parent": None}))
        (run / "model.json").write_text(json.dumps({
            "uuid": uid, "kind": "Interface", "module": "train", "version": [{"lr": i / runs}],
            "config": config, "predicate": {}, "created_at_ns": 1796000000000000000 + i,
        }))
        (run / "cached").write_text("finished")
        (run / "updated_at").write_text(STAMP)
        (run / "result.json").write_text(json.dumps({"loss": i}))
        (run / "log.txt").write_text("step\n" * 100)
        (execution / ".machinable").write_text(f"x{i:011d}")
        (execution / "id.json").write_text(json.dumps({"uuid": f"x{i:011d}", "kind": "Execution", "parent": uid}))
        for marker in ("started_at", "finished_at", "heartbeat_at", "updated_at"):
            (execution / marker).write_text(STAMP)
        (execution / "output.log").write_text("done\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=1000)
    args = parser.parse_args()
    from machinable import Index, Project
    from machinable.operations.upstream import import_storage

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        source = base / "old" / "storage"
        write_upstream(source, args.runs)
        project = base / "study"
        project.mkdir()
        (project / "train.py").write_text(textwrap.dedent(MODULE))

        start = time.perf_counter()
        shutil.copytree(source, base / "plain-copy", symlinks=True)
        baseline = time.perf_counter() - start

        with Project(project), Index(project / ".machinable.sqlite"):
            start = time.perf_counter()
            report = import_storage(source, progress=False)
            elapsed = time.perf_counter() - start
            assert len(report.imported) == args.runs, str(report)
            start = time.perf_counter()
            again = import_storage(source, progress=False)
            second = time.perf_counter() - start
            assert len(again.unchanged) == args.runs

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    print(f"{args.runs} runs")
    print(f"import:             {elapsed:8.2f} s  ({elapsed / args.runs * 1000:.2f} ms per run)")
    print(f"copytree baseline:  {baseline:8.2f} s  ratio {elapsed / baseline:.1f}x")
    print(f"import again (no-op): {second:6.2f} s  ({second / args.runs * 1000:.2f} ms per run)")


if __name__ == "__main__":
    main()
