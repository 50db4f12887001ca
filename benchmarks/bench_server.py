"""The catalog server at 100,000 runs: run detail and filtered pages over HTTP and in-process.

    python benchmarks/bench_server.py                      # SQLite, 100,000 runs
    python benchmarks/bench_server.py --runs 20000 --backend postgresql

A fresh project index gets the rows directly (with one location each; the directories do
not exist, so every copy reads as evicted: this measures the catalog side only). A real
``machinable serve`` (one uvicorn worker) is started on 127.0.0.1 and measured with
keep-alive connections; the same reads are then timed in-process (the server's own query
functions plus JSON encoding), which is the baseline of the ratio.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuidlib
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlencode

# Filtered and sorted pages of 100, as the web page asks for them (the rows with
# count=false; the total in its own request): (where, order_by).
PAGES = [
    ("config.lr >= 0.5 and status = 'finished'", "-config.lr"),  # ordered by the filtered path
    ("config.lr >= 0.5 and status = 'finished'", "-created_at"),  # by a time column
    ("config.lr >= 0.5", "config.i"),  # by another config path, ascending
    ("status = 'failed' and module = 'train'", "-created_at"),  # index columns only
    ("config.lr >= 0.5 and status = 'finished'", "-config.i"),  # another path, descending: a sort
]
FILTER, ORDER = PAGES[0]


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def summary(samples: list[float]) -> str:
    return f"p50 {statistics.median(samples) * 1000:7.2f} ms  p99 {percentile(samples, 0.99):7.2f} ms"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_rows(n: int, project: str, storage: Path) -> tuple[list[dict], list[dict]]:
    from machinable.identity import compute_uuid

    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    runs, locations = [], []
    for k in range(n):
        uuid = compute_uuid(project, "train", {"i": k}, {})
        moment = start + timedelta(seconds=k)
        status = "failed" if k % 50 == 0 else "finished"
        runs.append(
            dict(uuid=uuid, project=project, module="train", config_key=uuid, predicate_key="p",
                 config={"i": k, "lr": (k % 100) / 100, "seed": k % 10, "model": {"width": 64 * (1 + k % 4)}},
                 canonical={"i": k}, predicate={}, version=[{"i": k}], status=status, created_at=moment,
                 started_at=moment, finished_at=moment if status == "finished" else None,
                 failed_at=moment if status == "failed" else None, updated_at=moment)
        )
        locations.append({"run_uuid": uuid, "storage": str(storage), "directory": str(storage / uuid)})
    return runs, locations


def fill(index_url: str, runs: list[dict], locations: list[dict]) -> None:
    from machinable import Index
    from machinable.catalog.models import Location

    index = Index(index_url)
    index.add_rows(runs)
    with index.engine.begin() as conn:
        for start in range(0, len(locations), 5000):
            conn.execute(Location.__table__.insert(), locations[start : start + 5000])
    if index.dialect == "postgresql":
        # as a reindex leaves its tables (Index._analyze): statistics, hint bits and the
        # visibility map of the locations written here too
        with index.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM (ANALYZE) runs, leaves, locations")


class Client:
    """One keep-alive HTTP connection."""

    def __init__(self, port: int, timeout: float = 30):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def request(self, method: str, path: str, body: bytes | None = None, ok: bool = True) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        try:
            self.conn.request(method, path, body=body, headers=headers)
            response = self.conn.getresponse()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            self.conn.close()  # the server closed an idle keep-alive connection
            self.conn.request(method, path, body=body, headers=headers)
            response = self.conn.getresponse()
        data = response.read()
        if ok and response.status != 200:
            raise RuntimeError(f"{method} {path}: {response.status} {data[:300]!r}")
        return response.status, data

    def get(self, path: str) -> bytes:
        return self.request("GET", path)[1]


def throughput(connect, paths: list[str], seconds: float, clients: int = 8) -> str:
    """``clients`` threads, each on its own keep-alive connection (``connect()``), GET a
    random one of ``paths`` for ``seconds``: the line that says how many a second."""
    done = [0] * clients
    stop = time.monotonic() + seconds

    def worker(slot: int) -> None:
        mine = connect()
        local_rng = random.Random(slot)
        while time.monotonic() < stop:
            mine.get(local_rng.choice(paths))
            done[slot] += 1

    threads = [threading.Thread(target=worker, args=(slot,)) for slot in range(clients)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    return f"run detail, {clients} concurrent clients: {sum(done) / elapsed:.0f} requests/s ({sum(done)} in {elapsed:.1f} s)"


def timed(action, count: int) -> list[float]:
    samples = []
    for i in range(count):
        start = time.perf_counter()
        action(i)
        samples.append(time.perf_counter() - start)
    return samples


def runs_path(project: str, **params) -> str:
    return f"/api/v1/projects/{project}/runs?{urlencode(params)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--postgres", default="postgresql+psycopg://root@127.0.0.1:5432/test")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--detail-only", action="store_true", help="measure run detail and throughput only")
    parser.add_argument("--page-samples", type=int, default=50, help="samples of the filtered page")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the 8-client throughput run")
    args = parser.parse_args()

    from sqlalchemy import create_engine, text

    from machinable.catalog.engine import dispose_all, to_url
    from machinable.server import queries
    from machinable.server.config import make_config

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{args.runs} runs, backend {args.backend}, {time.strftime('%Y-%m-%d')}")
    root = Path(tempfile.mkdtemp(prefix="bench-server-"))
    project = root / "bench"
    project.mkdir()
    env = dict(os.environ)
    env.pop("MACHINABLE_INDEX", None)
    schema = None
    admin = None
    if args.backend == "sqlite":
        index_url = to_url(project / ".machinable.sqlite")
    else:
        schema = f"bs_{uuidlib.uuid4().hex[:8]}"
        admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        index_url = f"{args.postgres}?options=-csearch_path%3D{schema}"
        env["MACHINABLE_INDEX"] = index_url
        os.environ["MACHINABLE_INDEX"] = index_url
    process = None
    try:
        started = time.perf_counter()
        runs, locations = make_rows(args.runs, "bench", project / "storage")
        fill(index_url, runs, locations)
        print(f"filled the index in {time.perf_counter() - started:.1f} s")
        uuids = [row["uuid"] for row in runs]
        del runs, locations
        rng = random.Random(7)
        picks = [rng.choice(uuids) for _ in range(args.samples)]

        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "machinable", "serve", "--project", str(project), "--port", str(port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                Client(port).get("/api/v1/projects")
                break
            except (ConnectionError, OSError) as exc:
                if time.monotonic() > deadline or process.poll() is not None:
                    output = process.stderr.read() if process.stderr else ""
                    raise SystemExit(f"the server did not start: {output}") from exc
                time.sleep(0.2)

        client = Client(port)
        detail = "/api/v1/projects/bench/runs/{}"
        page = runs_path("bench", where=FILTER, order_by=ORDER, limit=100)
        for i in range(200):  # warm both sides
            client.get(detail.format(picks[i]))
        for _ in range(3):
            client.get(page)

        http_detail = timed(lambda i: client.get(detail.format(picks[i])), args.samples)
        if args.detail_only:
            args.page_samples = 1
        unfiltered = timed(lambda i: client.get(runs_path("bench", limit=100, count="false")), args.page_samples)

        config = make_config([project], [])
        served = config.project("bench")
        assert served is not None
        def page_in_process(where: str, order: str) -> bytes:
            page, total, cursor = queries.list_runs(served, where, order, 100, 0, with_count=False)
            return queries.page_json(page, total, 100, 0, cursor)

        local_detail = timed(lambda i: queries.get_run(served, picks[i]).encode(), args.samples)
        print(f"run detail          HTTP {summary(http_detail)}   in-process {summary(local_detail)}   "
              f"ratio {statistics.median(http_detail) / statistics.median(local_detail):.1f}x")
        print(f"first page (100), no filter, HTTP {summary(unfiltered)}")
        for where, order in PAGES:
            rows = runs_path("bench", where=where, order_by=order, limit=100, count="false")
            for _ in range(2):
                client.get(rows)
            http_page = timed(lambda i, r=rows: client.get(r), args.page_samples)
            local_page = timed(
                lambda i, w=where, o=order: page_in_process(w, o),
                args.page_samples,
            )
            counted = timed(
                lambda i, w=where: client.get(runs_path("bench", where=w, limit=0)), max(3, args.page_samples // 3)
            )
            print(f"page (100) where {where!r} order_by {order!r}: HTTP {summary(http_page)}   "
                  f"in-process {summary(local_page)}   ratio {statistics.median(http_page) / statistics.median(local_page):.1f}x"
                  f"   | its total (limit=0) HTTP p50 {percentile(counted, 0.5):.2f} ms")

        # Throughput: 8 clients, each on its own keep-alive connection, for a fixed time.
        print(throughput(lambda: Client(port), [detail.format(uuid) for uuid in uuids], args.seconds))

        if args.detail_only:
            return
        # Deep pages: by offset, and by the cursor of the row just before (limit=1 at
        # offset-1 returns it), for the default order and a config-path order.
        for order, repeat in ((None, 10), ("config.i", 3), ("-config.i", 3)):
            extra = {"order_by": order, "count": "false"} if order else {"count": "false"}
            cells = []
            for fraction in (0.0, 0.5, 0.999):
                offset = int((args.runs - 100) * fraction)
                by_offset = timed(lambda i, o=offset, e=extra: client.get(runs_path("bench", limit=100, offset=o, **e)), repeat)
                if offset:
                    before = json.loads(client.get(runs_path("bench", limit=1, offset=offset - 1, **extra)))["next"]
                    by_cursor = timed(
                        lambda i, c=before, e=extra: client.get(runs_path("bench", limit=100, after=c, **e)), repeat
                    )
                else:
                    by_cursor = by_offset
                cells.append(
                    f"at {offset}: offset {statistics.median(by_offset) * 1000:.1f} ms, "
                    f"cursor {statistics.median(by_cursor) * 1000:.1f} ms"
                )
            print(f"page of 100, order_by {order or 'uuid (default)'}: " + "; ".join(cells))

        # Every run, 1000 a page, in the default order: by offset, and by each page's cursor.
        pages = args.runs // 1000
        by_offset = timed(lambda i: client.get(runs_path("bench", limit=1000, offset=i * 1000, count="false")), pages)
        cursor: list[str | None] = [None]

        def by_cursor(i: int) -> None:
            params = {"limit": 1000, "count": "false", **({"after": cursor[0]} if cursor[0] else {})}
            cursor[0] = json.loads(client.get(runs_path("bench", **params)))["next"]

        keyset = timed(by_cursor, pages)
        for label, samples in (("offset", by_offset), ("cursor", keyset)):
            print(f"every run by {label}: {len(samples)} pages in {sum(samples):.2f} s; "
                  f"first 5 pages {statistics.median(samples[:5]) * 1000:.1f} ms, "
                  f"last 5 {statistics.median(samples[-5:]) * 1000:.1f} ms a page")
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=10)
        dispose_all()
        if schema is not None and admin is not None:
            with admin.connect() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            admin.dispose()


if __name__ == "__main__":
    main()
