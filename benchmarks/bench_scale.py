"""Scale benchmarks on SQLite and PostgreSQL: lookups, search, reindex at 100k runs.

    python benchmarks/bench_scale.py                       # both backends, 100,000 runs
    python benchmarks/bench_scale.py --runs 20000 --backend sqlite
    python benchmarks/bench_scale.py --postgres postgresql+psycopg://root@127.0.0.1/test

Each backend gets a fresh index (a new file, or a new PostgreSQL schema that is dropped
afterwards). Reindex is compared with a plain script that scans the same directories,
json-loads the headers and inserts rows with one executemany into the same backend.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import textwrap
import time
import uuid as uuidlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_core import MODULE, make_records, scan_headers  # noqa: E402


def ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def baseline_reindex(storage: Path, backend: str, target: str) -> float:
    start = time.perf_counter()
    rows = scan_headers(storage)
    if backend == "sqlite":
        import sqlite3

        db = sqlite3.connect(target)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("CREATE TABLE runs (uuid TEXT PRIMARY KEY, module TEXT, config TEXT, directory TEXT, status TEXT)")
        db.executemany("INSERT INTO runs VALUES (?, ?, ?, ?, ?)", rows)
        db.commit()
        db.close()
    else:
        import psycopg

        with psycopg.connect(target) as db:
            db.execute(
                "CREATE TABLE baseline_runs (uuid TEXT PRIMARY KEY, module TEXT, config JSONB, directory TEXT, status TEXT)"
            )
            with db.cursor() as cursor:
                cursor.executemany("INSERT INTO baseline_runs VALUES (%s, %s, %s, %s, %s)", rows)
            db.commit()
    return time.perf_counter() - start


def run_backend(backend: str, args: argparse.Namespace, project: Path, storage: Path) -> None:
    from sqlalchemy import create_engine, text

    from machinable import Index, get
    from machinable.catalog.engine import dispose_all

    schema = None
    if backend == "sqlite":
        index_spec = str(project / f"bench-{uuidlib.uuid4().hex[:6]}.sqlite")
        baseline_target = str(project / "baseline.sqlite")
        if os.path.exists(baseline_target):
            os.unlink(baseline_target)
    else:
        schema = f"bench_{uuidlib.uuid4().hex[:8]}"
        admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        index_spec = f"{args.postgres}?options=-csearch_path%3D{schema}"
        baseline_target = args.postgres.replace("+psycopg", "") + f"?options=-csearch_path%3D{schema}"
    os.environ["MACHINABLE_INDEX"] = index_spec
    try:
        index = Index.get()
        index.count()  # create the schema outside the timings
        total = sum(1 for e in os.scandir(storage) if not e.name.startswith("."))

        start = time.perf_counter()
        report = index.reindex(progress=False)
        full = time.perf_counter() - start
        assert report.indexed == total, report
        base = baseline_reindex(storage, backend, baseline_target)
        print(f"[{backend}] full reindex of {total}: {full:.2f} s; baseline {base:.2f} s; ratio {full / base:.2f}x")

        start = time.perf_counter()
        again = index.reindex(progress=False)
        incremental = time.perf_counter() - start
        assert again.unchanged == total and again.added == again.updated == 0, again
        print(f"[{backend}] incremental reindex, nothing changed: {incremental:.2f} s "
              f"({100 * incremental / full:.1f}% of full)")

        samples = []
        for _ in range(args.lookups):
            k = random.randrange(total - 10)
            start = time.perf_counter()
            hit = get("trivial", {"i": k}).cached()
            samples.append(time.perf_counter() - start)
            assert hit
        print(f"[{backend}] get()+cached() hit: {ms(samples):.3f} ms median")

        samples = []
        for _ in range(20):
            start = time.perf_counter()
            n = index.count("config.i >= 50000 and config.i < 60000")
            samples.append(time.perf_counter() - start)
        print(f"[{backend}] count() with a config filter ({n} match): {ms(samples):.2f} ms median")

        samples = []
        for _ in range(20):
            low = random.randrange(total - 2000)
            start = time.perf_counter()
            found = index.search(f"config.i >= {low} and status = 'finished'", limit=100)
            samples.append(time.perf_counter() - start)
            assert len(found) == 100
        print(f"[{backend}] filtered search returning 100 runs: {ms(samples):.2f} ms median")

        samples = []
        for _ in range(10):
            low = random.randrange(total - 200)
            start = time.perf_counter()
            found = index.search(f"config.i >= {low} and config.i < {low + 100}", order_by="config.i")
            samples.append(time.perf_counter() - start)
            assert len(found) == 100
        print(f"[{backend}] selective search (100 of {total}, ordered): {ms(samples):.2f} ms median")
    finally:
        dispose_all()
        os.environ.pop("MACHINABLE_INDEX", None)
        if schema is not None:
            with admin.connect() as conn:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--lookups", type=int, default=2000)
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--postgres", default="postgresql+psycopg://root@127.0.0.1:5432/test")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="machinable-scale-"))
    project = work / "bench"
    project.mkdir()
    (project / "trivial.py").write_text(textwrap.dedent(MODULE))
    os.chdir(project)
    storage = project / "storage"
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    start = time.perf_counter()
    make_records(storage, args.runs, "bench")
    print(f"wrote {args.runs} record directories in {time.perf_counter() - start:.1f} s")
    time.sleep(2.5)  # reindex does not trust the mtime of a directory written in the last 2 s
    try:
        for backend in ("sqlite", "postgresql") if args.backend == "both" else (args.backend,):
            run_backend(backend, args, project, storage)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
