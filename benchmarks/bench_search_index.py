"""Config-filtered count() and search at 100,000 runs, without and with a search index.

    python benchmarks/bench_search_index.py            # SQLite and PostgreSQL
    python benchmarks/bench_search_index.py --runs 20000 --backend sqlite

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

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.runs} runs")
    now = datetime.now(timezone.utc)
    rows = [
        dict(uuid=compute_uuid("bench", "trivial", {"i": k}, {}), project="bench", module="trivial",
             config_key="k", predicate_key="p", config={"i": k, "lr": 0.1}, canonical={"i": k},
             predicate={}, version=[{"i": k}], status="finished", created_at=now, started_at=now,
             finished_at=now, failed_at=None, updated_at=now)
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
            if backend == "postgresql":
                with index.engine.connect() as conn:
                    conn.exec_driver_sql("ANALYZE runs")
            low = args.runs // 2
            count = f"config.i >= {low} and config.i < {low + args.runs // 10}"
            selective = f"config.i >= {low} and config.i < {low + 100}"
            for label in ("no search index", "with index add config.i"):
                if label.startswith("with"):
                    index.add_search_index("config.i")
                c = median_ms(lambda ix=index, q=count: ix.count(q))
                s = median_ms(lambda ix=index, q=selective: ix.search(q, order_by="config.i"))
                print(f"[{backend}] {label:26s} count(): {c:7.2f} ms   search of 100: {s:7.2f} ms")
        finally:
            dispose_all()
            if schema is not None:
                with admin.connect() as conn:
                    conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
                admin.dispose()


if __name__ == "__main__":
    main()
