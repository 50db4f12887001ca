"""Core catalog benchmarks: launch, get()+cached() at scale, and reindex.

    python benchmarks/bench_core.py                  # 100,000 runs (several minutes)
    python benchmarks/bench_core.py --runs 10000     # quicker

Every figure is printed beside a plain-Python baseline measured in the same run, and
the ratio is what to compare across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

MODULE = '''
from pydantic import BaseModel
from machinable import Interface


class Trivial(Interface):
    # 20 config leaves: what the index keeps searchable per run (catalog/leaves.py)
    class Config(BaseModel):
        i: int = 0
        lr: float = 0.1
        depth: int = 4
        width: int = 256
        dropout: float = 0.1
        decay: float = 0.0001
        momentum: float = 0.9
        epochs: int = 10
        batch: int = 64
        seed: int = 0
        optimizer: str = "adam"
        schedule: str = "cosine"
        dataset: str = "cifar10"
        split: str = "train"
        augment: bool = True
        shuffle: bool = True
        warmup: int = 100
        clip: float = 1.0
        precision: str = "fp32"
        note: str = ""

    def __call__(self):
        pass
'''

FULL_CONFIG = {
    "lr": 0.1, "depth": 4, "width": 256, "dropout": 0.1, "decay": 0.0001, "momentum": 0.9,
    "epochs": 10, "batch": 64, "seed": 0, "optimizer": "adam", "schedule": "cosine",
    "dataset": "cifar10", "split": "train", "augment": True, "shuffle": True, "warmup": 100,
    "clip": 1.0, "precision": "fp32", "note": "",
}


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


LEAVES_TABLE = (
    "CREATE TABLE leaves (run_uuid TEXT, path TEXT, kind TEXT, number REAL, text TEXT, scope INTEGER, "
    "PRIMARY KEY (run_uuid, path)) WITHOUT ROWID"
)
LEAVES_INDEX = "CREATE INDEX ix_leaves ON leaves (path, kind, number, text, scope, run_uuid)"


def plain_leaves(uuid: str, config: dict, scope: int = 1) -> list[tuple]:
    """A plain script's typed rows of a config (one per value), as a search side table
    needs them: what the baselines "with leaves" insert."""
    rows: list[tuple] = []

    def walk(prefix: str, mapping: dict) -> None:
        for key, value in mapping.items():
            path = f"{prefix}.{key}"
            if value is None or isinstance(value, bool):
                rows.append((uuid, path, {None: "z", True: "t", False: "f"}[value], None, None, scope))
            elif isinstance(value, (int, float)):
                rows.append((uuid, path, "n", float(value), None, scope))
            elif isinstance(value, str):
                rows.append((uuid, path, "s", None, value[:500], scope))
            elif isinstance(value, dict):
                rows.append((uuid, path, "o", None, None, scope))
                walk(path, value)
            else:
                rows.append((uuid, path, "a", None, None, scope))

    walk("config", config)
    return rows


class BaselineLauncher:
    """Write the same files atomically and commit one SQLite row per run: no library.
    ``leaves``: commit the config's typed rows with it, into an indexed side table (what
    a search of any config path needs; the floor of that design)."""

    def __init__(self, root: Path, leaves: bool = False):
        self.root = root
        self.leaves = leaves
        name = "baseline-leaves" if leaves else "baseline"
        self.folder = root / name
        self.db = sqlite3.connect(root / f"{name}.sqlite", isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE runs (uuid TEXT PRIMARY KEY, module TEXT, config TEXT, status TEXT)")
        if leaves:
            self.db.execute(LEAVES_TABLE)
            self.db.execute(LEAVES_INDEX)

    def launch(self, i: int) -> None:
        uuid = f"{i:032x}"
        directory = self.folder / uuid
        directory.mkdir(parents=True)
        header = json.dumps({"uuid": uuid, "module": "trivial"})
        model = json.dumps({"module": "trivial", "config": {"i": i, **FULL_CONFIG}})
        for name, text in (
            ("model.json", model),
            ("id.json", header),
            (".machinable", ""),
            ("started_at", "t"),
            ("updated_at", "t"),
            ("finished_at", "t"),
            ("updated_at", "t"),
        ):
            tmp = directory / f".{name}.tmp"
            with open(tmp, "w") as handle:
                handle.write(text)
            os.replace(tmp, directory / name)
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("INSERT INTO runs VALUES (?, ?, ?, ?)", (uuid, "trivial", model, "finished"))
        if self.leaves:
            rows = plain_leaves(uuid, {"i": i, **FULL_CONFIG})
            self.db.executemany("INSERT INTO leaves VALUES (?, ?, ?, ?, ?, ?)", rows)
        self.db.execute("COMMIT")


def interleaved_launches(root: Path, n: int) -> tuple[list[float], list[float], list[float]]:
    """Time machinable, the baseline and the baseline with leaves in turn, so all three
    see the same machine."""
    from machinable import get

    baseline = BaselineLauncher(root)
    with_leaves = BaselineLauncher(root, leaves=True)
    ours, base, base_leaves = [], [], []
    for i in range(n):
        start = time.perf_counter()
        get("trivial", {"i": i}).launch()
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        baseline.launch(i)
        base.append(time.perf_counter() - start)
        start = time.perf_counter()
        with_leaves.launch(i)
        base_leaves.append(time.perf_counter() - start)
    baseline.db.close()
    with_leaves.db.close()
    return ours, base, base_leaves


def make_records(storage: Path, n: int, project: str, start: int = 0) -> None:
    """Write finished record directories for i in [start, n) quickly (the same bytes launch() writes)."""
    from machinable.identity import compute_uuid, config_key, predicate_key
    from machinable.record import dump_json, id_header

    stamp = "2026-01-01T00:00:00+00:00"
    for i in range(start, n):
        canonical = {"i": i}
        uuid = compute_uuid(project, "trivial", canonical, {})
        directory = storage / uuid
        directory.mkdir(parents=True, exist_ok=True)
        header = id_header(uuid, project, "trivial", config_key(canonical), predicate_key({}))
        model = {
            "module": "trivial",
            "project": project,
            "config": {"i": i, **FULL_CONFIG},
            "canonical": canonical,
            "version": [{"i": i}],
            "predicate": {},
            "created_at": stamp,
        }
        (directory / "model.json").write_text(dump_json(model))
        (directory / "id.json").write_text(dump_json(header))
        (directory / ".machinable").write_text("")
        for marker in ("started_at", "finished_at", "updated_at"):
            (directory / marker).write_text(stamp)


def scan_headers(storage: Path, leaves: list | None = None) -> list[tuple[str, str, str, str]]:
    """The plain baseline's read side: scandir, then per run list the directory, json-load
    id.json and model.json, and read the status markers present (what reindex must read).
    ``leaves``: a list to add each config's typed rows to."""
    rows = []
    with os.scandir(storage) as entries:
        for entry in entries:
            if not entry.is_dir() or entry.name.startswith("."):
                continue
            names = os.listdir(entry.path)
            with open(os.path.join(entry.path, "id.json"), "rb") as handle:
                header = json.loads(handle.read())
            with open(os.path.join(entry.path, "model.json"), "rb") as handle:
                model = json.loads(handle.read())
            status = "created"
            for marker in ("started_at", "failed_at", "finished_at"):
                if marker in names:
                    with open(os.path.join(entry.path, marker), "rb") as handle:
                        handle.read()
                    status = marker
            rows.append((header["uuid"], header["module"], json.dumps(model["config"]), entry.path, status))
            if leaves is not None:
                leaves.extend(plain_leaves(header["uuid"], model["config"]))
    return rows


def baseline_reindex(storage: Path, db_path: Path, leaves: bool = False) -> float:
    """scandir, read both headers and the markers present, insert rows with one executemany.
    ``leaves``: also insert each config's typed rows with one executemany, then index them."""
    start = time.perf_counter()
    typed: list | None = [] if leaves else None
    rows = scan_headers(storage, typed)
    db = sqlite3.connect(db_path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE runs (uuid TEXT PRIMARY KEY, module TEXT, config TEXT, directory TEXT, status TEXT)")
    db.executemany("INSERT INTO runs VALUES (?, ?, ?, ?, ?)", rows)
    if typed is not None:
        db.execute(LEAVES_TABLE)
        db.executemany("INSERT INTO leaves VALUES (?, ?, ?, ?, ?, ?)", typed)
        db.execute(LEAVES_INDEX)
    db.commit()
    db.close()
    return time.perf_counter() - start


def drop_caches_hint() -> str:
    return "warm page cache (directories were just written)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000, help="runs to index (default 100000)")
    parser.add_argument("--launches", type=int, default=1000, help="launches to time (default 1000)")
    parser.add_argument("--lookups", type=int, default=2000, help="get()+cached() to time")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="machinable-bench-"))
    project = work / "bench"
    project.mkdir()
    (project / "trivial.py").write_text(textwrap.dedent(MODULE))
    os.chdir(project)
    sys.path.insert(0, str(project))

    from machinable import Index, get
    from machinable.catalog.engine import dispose_all

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"work dir: {work} ({drop_caches_hint()})")
    print()

    # 1. launch
    get("trivial", {"i": -1}).launch()  # warm up: module import, index creation
    ours, base, base_leaves = interleaved_launches(work, args.launches)
    print(f"launch trivial run     machinable {median_ms(ours):7.3f} ms median   "
          f"baseline {median_ms(base):7.3f} ms   ratio {median_ms(ours) / median_ms(base):5.2f}x")
    print(f"  baseline with its 20 leaves in an indexed table {median_ms(base_leaves):7.3f} ms   "
          f"= {median_ms(base_leaves) / median_ms(base):5.2f}x the baseline; machinable "
          f"{median_ms(ours) / median_ms(base_leaves):5.2f}x it")

    # 2. reindex of args.runs directories
    storage = project / "storage"
    start = time.perf_counter()
    make_records(storage, args.runs - args.launches - 1, "bench")
    print(f"(wrote {args.runs - args.launches - 1} more record directories in "
          f"{time.perf_counter() - start:.1f} s)")
    total = sum(1 for e in os.scandir(storage) if not e.name.startswith("."))
    index = Index.get()
    dispose_all()
    for suffix in ("", "-wal", "-shm"):
        try:
            os.unlink(str(project / ".machinable.sqlite") + suffix)
        except FileNotFoundError:
            pass
    base_db = work / "baseline-reindex.sqlite"
    scan_headers(storage)  # untimed: every timed pass below finds the records in the page cache
    baseline_s = baseline_reindex(storage, base_db)
    start = time.perf_counter()
    report = Index.get().reindex()
    ours_s = time.perf_counter() - start
    assert report.indexed == total, (report.indexed, total, report.skipped[:3])
    leaves_s = baseline_reindex(storage, work / "baseline-reindex-leaves.sqlite", leaves=True)
    print(f"reindex {total} runs  machinable {ours_s:7.2f} s             "
          f"baseline {baseline_s:7.2f} s   ratio {ours_s / baseline_s:5.2f}x")
    print(f"  baseline with the leaves (one more executemany, then their index) {leaves_s:7.2f} s "
          f"= {leaves_s / baseline_s:5.2f}x the baseline; machinable {ours_s / leaves_s:5.2f}x it")

    # 3. get + cached at scale
    assert index.count() == total
    samples = []
    for i in range(args.lookups):
        k = (i * 7919) % (args.runs - args.launches - 1)
        start = time.perf_counter()
        run = get("trivial", {"i": k})
        hit = run.cached()
        samples.append(time.perf_counter() - start)
        assert hit
    db = sqlite3.connect(base_db)
    uuids = [row[0] for row in db.execute("SELECT uuid FROM runs LIMIT 2000")]
    base_samples = []
    for uuid in uuids:
        start = time.perf_counter()
        db.execute("SELECT directory FROM runs WHERE uuid = ?", (uuid,)).fetchone()
        base_samples.append(time.perf_counter() - start)
    db.close()
    print(f"get()+cached() @ {total} machinable {median_ms(samples):7.3f} ms median   "
          f"raw sqlite3 PK lookup {median_ms(base_samples):7.3f} ms")

    if not args.keep:
        dispose_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
