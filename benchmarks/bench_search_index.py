"""Config-filtered count() and search at 100,000 runs: the leaves index, with no setup.

    python benchmarks/bench_search_index.py            # SQLite and PostgreSQL
    python benchmarks/bench_search_index.py --runs 20000 --backend sqlite
    python benchmarks/bench_search_index.py --runs 1000000 --backend sqlite

Filters match the same number of runs at every N (a range of 10,000, 1% of names, 100
in order), so the figures show what a query costs as the catalog grows.

Rows are inserted directly into a fresh index (no record directories: this measures
the query side only).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
import uuid as uuidlib
from datetime import datetime, timezone


def median_ms(action, repeat: int = 15) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def query_set(index, low: int, width: int, uuids: list[str]) -> dict:
    """The measured queries, each a callable."""
    picks = iter(uuids * 100)
    return {
        "find(uuid) (what get() reads)": lambda: index.find(next(picks)),
        "baseline: count(), no filter": lambda: index.count(),
        "baseline: page of 100, no filter": lambda: index.search(limit=100),
        "count(config.i range, 10,000 runs)": lambda: index.count(
            f"config.i >= {low} and config.i < {low + width}"
        ),
        "count(config.i = N)": lambda: index.count(f"config.i = {low}"),
        "count(config.name = 'n005', 1%)": lambda: index.count("config.name = 'n005'"),
        "count(range) within the module": lambda: index.count(
            f"config.i >= {low} and config.i < {low + width}", project="bench", module="trivial"
        ),
        "page of 100, config.i range": lambda: index.search(
            f"config.i >= {low} and config.i < {low + width}", limit=100
        ),
        "page of 100, range, order by -config.i": lambda: index.search(
            f"config.i >= {low} and config.i < {low + width}", order_by="-config.i", limit=100
        ),
        "page of 100, order by config.i": lambda: index.search(order_by="config.i", limit=100),
        "page of 100, config.name = 'n005'": lambda: index.search(
            "config.name = 'n005'", limit=100
        ),
        "page of 100, config.name = 'n005', by -config.i": lambda: index.search(
            "config.name = 'n005'", order_by="-config.i", limit=100
        ),
        "page of 100, config.i >= N and status": lambda: index.search(
            f"config.i >= {low} and status = 'finished'", limit=100
        ),
        "100 in a range, ordered by config.i": lambda: index.search(
            f"config.i >= {low} and config.i < {low + 100}", order_by="config.i"
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--postgres", default="postgresql+psycopg://root@127.0.0.1:5432/test")
    args = parser.parse_args()
    from sqlalchemy import create_engine, text

    from machinable import Index
    from machinable.catalog.engine import dispose_all
    from machinable.identity import compute_uuid

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.runs} runs; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    now = datetime.now(timezone.utc)
    rows = [
        dict(
            uuid=compute_uuid("bench", "trivial", {"i": k}, {}),
            project="bench",
            module="trivial",
            config_key="k",
            predicate_key="p",
            config={"i": k, "lr": 0.1, "name": f"n{k % 100:03d}"},
            canonical={"i": k},
            predicate={},
            version=[{"i": k}],
            status="finished",
            created_at=now,
            started_at=now,
            finished_at=now,
            failed_at=None,
            updated_at=now,
        )
        for k in range(args.runs)
    ]
    for backend in ("sqlite", "postgresql") if args.backend == "both" else (args.backend,):
        schema = None
        if backend == "sqlite":
            index = Index(os.path.join(tempfile.mkdtemp(), "index.sqlite"))
        else:
            schema = f"si_{uuidlib.uuid4().hex[:8]}"
            admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'CREATE SCHEMA "{schema}"'))
            index = Index(f"{args.postgres}?options=-csearch_path%3D{schema}")
        try:
            index.add_rows(rows)
            low = args.runs // 2
            # the same result sizes at every N: what a query costs as the catalog grows
            width = min(10_000, args.runs // 10)
            uuids = [rows[k]["uuid"] for k in range(0, args.runs, max(1, args.runs // 50))]
            queries = query_set(index, low, width, uuids)
            for label, action in queries.items():
                print(f"[{backend}] {label:42s} {median_ms(action):7.2f} ms")
        finally:
            dispose_all()
            if schema is not None:
                with admin.connect() as conn:
                    conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
                admin.dispose()


if __name__ == "__main__":
    main()
