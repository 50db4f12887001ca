"""Catalog cost per run as the number of runs grows: reindex, verify, count, search, get,
and a loop over every run, with the peak memory of each pass.

    python benchmarks/bench_million.py --runs 10000 30000          # a quick look
    python benchmarks/bench_million.py --runs 100000 300000 1000000 --backend both

Record directories (20 config leaves each, as bench_core writes them) are created once
in a work directory and grown to each N in turn; every N gets a fresh index per
backend. Each pass runs in its own process, so its peak RSS (``ru_maxrss``, including
the reindex's scan workers) is its own. Baselines, measured in the same run: a plain
script that lists every record directory, json-loads id.json and model.json, reads the
status markers present and inserts one row per run with one executemany into SQLite
(for reindex), and the same without the inserts (for verify).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid as uuidlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_core import MODULE, make_records, scan_headers  # noqa: E402

POSTGRES = "postgresql+psycopg://root@127.0.0.1:5432/test"


def peak_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def phase(args: argparse.Namespace) -> dict:
    """One measured pass, in this (child) process."""
    project = Path(args.project)
    os.chdir(project)
    sys.path.insert(0, str(project))
    os.environ["MACHINABLE_INDEX"] = args.index
    storage = project / "storage"
    out: dict = {}
    if args.phase == "baseline":
        start = time.perf_counter()
        rows = scan_headers(storage)
        out["scan_s"] = time.perf_counter() - start
        if args.index.startswith("postgresql"):
            import psycopg

            with psycopg.connect(args.index.replace("+psycopg", "")) as db:
                db.execute("CREATE TABLE baseline_runs (uuid TEXT PRIMARY KEY, module TEXT, config JSONB, "
                           "directory TEXT, status TEXT)")
                with db.cursor() as cursor:
                    cursor.executemany("INSERT INTO baseline_runs VALUES (%s, %s, %s, %s, %s)", rows)
                db.commit()
            out["reindex_s"] = time.perf_counter() - start
            with psycopg.connect(args.index.replace("+psycopg", "")) as db:
                db.execute("DROP TABLE baseline_runs")
            return out
        db_path = project / f"baseline-{uuidlib.uuid4().hex[:6]}.sqlite"
        db = sqlite3.connect(db_path)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("CREATE TABLE runs (uuid TEXT PRIMARY KEY, module TEXT, config TEXT, directory TEXT, status TEXT)")
        db.executemany("INSERT INTO runs VALUES (?, ?, ?, ?, ?)", rows)
        db.commit()
        db.close()
        out["reindex_s"] = time.perf_counter() - start
        os.unlink(db_path)
        return out
    from machinable import Index, get

    index = Index.get()
    if args.phase == "reindex":
        index.count()  # schema outside the timing
        start = time.perf_counter()
        report = index.reindex(storage, progress=False)
        out["seconds"] = time.perf_counter() - start
        out["indexed"] = report.indexed
    elif args.phase == "verify":
        from machinable.operations.verify import verify

        start = time.perf_counter()
        report = verify(index, storage, progress=False)
        out["seconds"] = time.perf_counter() - start
        out["ok"] = report.ok
    elif args.phase == "loop":
        start = time.perf_counter()
        n = 0
        for run in get("trivial").all():
            n += run.config.i >= 0
        out["seconds"] = time.perf_counter() - start
        out["runs"] = n
    elif args.phase == "queries":
        n = index.count()
        low, width = n // 2, max(n // 10, 1)

        def median_ms(action, repeat: int = 15) -> float:
            action()
            samples = []
            for _ in range(repeat):
                start = time.perf_counter()
                action()
                samples.append(time.perf_counter() - start)
            return statistics.median(samples) * 1000

        out["count_ms"] = median_ms(lambda: index.count())
        out["count_filter_ms"] = median_ms(lambda: index.count(f"config.i >= {low} and config.i < {low + width}"))
        out["count_module_filter_ms"] = median_ms(
            lambda: get("trivial").all(f"config.i >= {low} and config.i < {low + width}").__len__()
        )
        out["page_filter_ms"] = median_ms(lambda: index.search(f"config.i >= {low} and config.i < {low + width}", limit=100))
        out["page_ordered_ms"] = median_ms(
            lambda: index.search(f"config.i >= {low} and config.i < {low + width}", order_by="-config.i", limit=100)
        )
        out["page_plain_ms"] = median_ms(lambda: index.search(limit=100))
        keys = iter(range(0, n, max(n // 200, 1)))
        out["get_cached_ms"] = median_ms(lambda: get("trivial", {"i": next(keys)}).cached(), repeat=100)
    out["peak_mb"] = peak_mb()
    return out


def child(project: Path, index: str, name: str) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--phase", name, "--project", str(project), "--index", index],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def fresh_index(project: Path, backend: str, postgres: str) -> tuple[str, object]:
    if backend == "sqlite":
        return str(project / f"index-{uuidlib.uuid4().hex[:6]}.sqlite"), None
    from sqlalchemy import create_engine, text

    schema = f"million_{uuidlib.uuid4().hex[:8]}"
    admin = create_engine(postgres, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()

    return f"{postgres}?options=-csearch_path%3D{schema}", drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="sqlite")
    parser.add_argument("--postgres", default=POSTGRES)
    parser.add_argument("--work", help="work directory (kept; records are reused when it exists)")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--project", help=argparse.SUPPRESS)
    parser.add_argument("--index", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(phase(args)))
        return

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="machinable-million-"))
    project = work / "bench"
    storage = project / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    (project / "trivial.py").write_text(textwrap.dedent(MODULE))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"load average {os.getloadavg()[0]:.1f}; work dir {work}")
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    have = sum(1 for e in os.scandir(storage) if not e.name.startswith("."))
    for n in sorted(args.runs):
        if have < n:
            start = time.perf_counter()
            make_records(storage, n, "bench", start=have)
            print(f"\n== {n} runs (wrote {n - have} more in {time.perf_counter() - start:.0f} s; "
                  f"disk free {shutil.disk_usage(work).free / 2**30:.0f} GiB)")
            have = n
        else:
            print(f"\n== {n} runs")
        for backend in backends:
            spec, drop = fresh_index(project, backend, args.postgres)
            try:
                # An untimed scan first: the baseline must not be the one pass that reads
                # the records from disk while the others find them in the page cache.
                scan_headers(storage)
                base = child(project, spec if backend == "postgresql" else "sqlite", "baseline")
                print(f"[{backend}] baseline: scan {base['scan_s']:.2f} s, scan + executemany {base['reindex_s']:.2f} s "
                      f"({1e6 * base['reindex_s'] / n:.1f} us/run)")
                r = child(project, spec, "reindex")
                assert r["indexed"] == n, r
                print(f"[{backend}] reindex {r['seconds']:.2f} s = {1e6 * r['seconds'] / n:.1f} us/run, "
                      f"{r['seconds'] / base['reindex_s']:.2f}x baseline, peak {r['peak_mb']:.0f} MB")
                v = child(project, spec, "verify")
                print(f"[{backend}] verify {v['seconds']:.2f} s = {1e6 * v['seconds'] / n:.1f} us/run, "
                      f"{v['seconds'] / base['scan_s']:.2f}x scan baseline, peak {v['peak_mb']:.0f} MB, ok={v['ok']}")
                loop = child(project, spec, "loop")
                assert loop["runs"] == n, loop
                print(f"[{backend}] for run in get('trivial').all(): {loop['seconds']:.2f} s = "
                      f"{1e6 * loop['seconds'] / n:.1f} us/run, peak {loop['peak_mb']:.0f} MB")
                q = child(project, spec, "queries")
                print(f"[{backend}] count() {q['count_ms']:.2f} ms; count(config.i range, 10%) "
                      f"{q['count_filter_ms']:.2f} ms; len(all(range)) {q['count_module_filter_ms']:.2f} ms; "
                      f"page of 100 filtered {q['page_filter_ms']:.2f} ms, filtered+ordered "
                      f"{q['page_ordered_ms']:.2f} ms, unfiltered {q['page_plain_ms']:.2f} ms; "
                      f"get()+cached() {q['get_cached_ms']:.3f} ms")
            finally:
                if drop is not None:
                    drop()
                for path in project.glob("index-*.sqlite*"):
                    path.unlink()
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
