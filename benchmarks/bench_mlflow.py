"""MLflow's tracking server beside ours: bench_server.py's runs and reads, asked of MLflow.

MLflow lives in its own venv (this script does not import machinable, and the project's
venv does not have MLflow):

    python -m venv /work/mlflow-venv && /work/mlflow-venv/bin/pip install mlflow==3.17.2
    /work/mlflow-venv/bin/python benchmarks/bench_mlflow.py --runs 100000

MLflow creates its own SQLite schema (one experiment through ``MlflowClient``); the N runs
of bench_server.py's ``make_rows`` (params i, lr, seed, model.width; FINISHED, every 50th
FAILED; start_time one second apart; run name "train" for the module) plus one metric
``lr_metric`` = lr then go straight into its tables with executemany, and MLflow's own
``search_runs``/``get_run`` are asked to confirm the load. A real ``mlflow server`` (one
uvicorn worker, 127.0.0.1, telemetry and job execution off) is measured with keep-alive
``http.client`` connections, line by line as bench_server.py prints them; the same reads
are then timed in-process (MLflow's SqlAlchemyStore plus its JSON encoding) for the ratio.

Where MLflow's search cannot say what ours says, the output says so: params are strings
and take only =, !=, LIKE, ILIKE and IS [NOT] NULL (no range), so "config.lr >= 0.5" is
asked as ``metrics.lr_metric >= 0.5`` (the same runs); ordering by a param orders strings
("10" before "9"); there is no total count; the page token is an offset.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from datetime import datetime, timezone
from pathlib import Path

# bench_server's helpers (it imports machinable only inside its main(), so this venv,
# which has MLflow and not machinable, can import them)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import Client as ServerClient  # noqa: E402
from bench_server import free_port, summary, throughput, timed  # noqa: E402

# bench_server.py's PAGES, each with MLflow's nearest filter and order_by, and which k of
# make_rows it must return (to check the first page). lr_metric = lr, so the metric range
# stands for the config.lr range MLflow's params cannot express.
LR_RANGE = "metrics.lr_metric >= 0.5"
PAGES = [
    # (ours: where, order_by) -> (MLflow: filter, order_by, predicate on k)
    (("config.lr >= 0.5 and status = 'finished'", "-config.lr"),
     (f"{LR_RANGE} and attributes.status = 'FINISHED'", "params.lr DESC", lambda k: k % 100 >= 50 and k % 50)),
    (("config.lr >= 0.5 and status = 'finished'", "-created_at"),
     (f"{LR_RANGE} and attributes.status = 'FINISHED'", "attributes.start_time DESC", lambda k: k % 100 >= 50 and k % 50)),
    (("config.lr >= 0.5", "config.i"),
     (LR_RANGE, "params.i ASC", lambda k: k % 100 >= 50)),
    (("status = 'failed' and module = 'train'", "-created_at"),
     ("attributes.status = 'FAILED' and attributes.run_name = 'train'", "attributes.start_time DESC", lambda k: k % 50 == 0)),
    (("config.lr >= 0.5 and status = 'finished'", "-config.i"),
     (f"{LR_RANGE} and attributes.status = 'FINISHED'", "params.i DESC", lambda k: k % 100 >= 50 and k % 50)),
    ((None, None),  # the "100 runs in a metric range ordered by that metric"
     (LR_RANGE, "metrics.lr_metric DESC", lambda k: k % 100 >= 50)),
]
# The literal mapping of PAGES[0], which MLflow rejects (params are strings: no >=).
LITERAL = "params.lr >= '0.5' and attributes.status = 'FINISHED'"
SLOW = 10.0  # a query slower than this a sample is sampled fewer times
# The value of each order_by key for run k, as MLflow compares it (params as strings).
ORDER_KEYS = {
    "params.lr": lambda k: str((k % 100) / 100),
    "params.i": str,
    "metrics.lr_metric": lambda k: (k % 100) / 100,
    "attributes.start_time": lambda k: k,
}


def expected_page(n: int, predicate, order_by: str, size: int = 100) -> list[int]:
    """The k of the first page MLflow must return: order_by, then start_time DESC."""
    key, direction = order_by.split()
    ks = sorted((k for k in range(n) if predicate(k)), reverse=True)  # the start_time DESC tie-break
    ks.sort(key=ORDER_KEYS[key], reverse=direction == "DESC")  # stable: ties keep start_time DESC
    return ks[:size]


def make_rows(n: int) -> list[dict]:
    """bench_server.py's make_rows, in MLflow's terms (uuid4 hex ids, seeded)."""
    rng = random.Random(1)
    start_ms = int(datetime(2026, 1, 1, tzinfo=timezone.utc).timestamp() * 1000)
    rows = []
    for k in range(n):
        config = {"i": k, "lr": (k % 100) / 100, "seed": k % 10, "model": {"width": 64 * (1 + k % 4)}}
        rows.append(dict(
            uuid=uuidlib.UUID(int=rng.getrandbits(128), version=4).hex,
            status="FAILED" if k % 50 == 0 else "FINISHED",
            start_time=start_ms + 1000 * k,
            # mlflow.log_params stores str(value); the nested model.width as a dotted key
            params={"i": str(config["i"]), "lr": str(config["lr"]), "seed": str(config["seed"]),
                    "model.width": str(config["model"]["width"])},
            lr=config["lr"],
        ))
    return rows


def fill(db: Path, experiment_id: str, artifact_root: str, rows: list[dict]) -> None:
    """Insert the rows as MLflow's create_run/log_batch/set_terminated would leave them."""
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA synchronous = OFF")  # this connection only; the file keeps its journal mode
        eid = int(experiment_id)
        with conn:
            conn.executemany(
                "INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name, user_id, status,"
                " start_time, end_time, source_version, lifecycle_stage, artifact_uri, experiment_id)"
                " VALUES (?, 'train', 'UNKNOWN', '', '', 'unknown', ?, ?, ?, '', 'active', ?, ?)",
                ((r["uuid"], r["status"], r["start_time"], r["start_time"],
                  f"{artifact_root}/{r['uuid']}/artifacts", eid) for r in rows),
            )
            conn.executemany(
                "INSERT INTO params (key, value, run_uuid) VALUES (?, ?, ?)",
                ((key, value, r["uuid"]) for r in rows for key, value in r["params"].items()),
            )
            for table in ("metrics", "latest_metrics"):
                conn.executemany(
                    f"INSERT INTO {table} (key, value, timestamp, step, is_nan, run_uuid)"
                    " VALUES ('lr_metric', ?, ?, 0, 0, ?)",
                    ((r["lr"], r["start_time"], r["uuid"]) for r in rows),
                )
            conn.executemany(
                "INSERT INTO tags (key, value, run_uuid) VALUES ('mlflow.runName', 'train', ?)",
                ((r["uuid"],) for r in rows),
            )
    finally:
        conn.close()


def check_load(client, experiment_id: str, rows: list[dict]) -> None:
    """MLflow's own API must see the rows: a wrong schema fails here, loudly."""
    n = len(rows)
    want = sum(1 for k in range(n) if k % 100 == 37)
    found, token = [], None
    while True:
        page = client.search_runs([experiment_id], "params.lr = '0.37'", max_results=50000, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            break
    assert len(found) == want, f"search_runs params.lr = '0.37': {len(found)} runs, expected {want}"
    assert all(run.data.params["lr"] == "0.37" for run in found)
    k = min(n - 1, 1234)
    one = client.search_runs([experiment_id], f"params.i = '{k}'")
    assert [run.info.run_id for run in one] == [rows[k]["uuid"]], "search_runs params.i finds the wrong run"
    for k in {0, n // 2, n - 1}:
        run = client.get_run(rows[k]["uuid"])
        assert run.data.params == rows[k]["params"], (run.data.params, rows[k]["params"])
        assert run.data.metrics == {"lr_metric": rows[k]["lr"]}, run.data.metrics
        assert run.info.status == rows[k]["status"] and run.info.start_time == rows[k]["start_time"]
        assert run.info.run_name == "train"


class Client(ServerClient):
    """One keep-alive HTTP connection to MLflow's server."""

    def __init__(self, port: int):
        super().__init__(port, timeout=600)

    def search(self, experiment_id: str, filter: str = "", order_by: str | None = None,
               max_results: int = 100, page_token: str | None = None) -> dict:
        body = {"experiment_ids": [experiment_id], "filter": filter, "max_results": max_results}
        if order_by:
            body["order_by"] = [order_by]
        if page_token:
            body["page_token"] = page_token
        return json.loads(self.request("POST", "/api/2.0/mlflow/runs/search", json.dumps(body).encode())[1])


SLOW_SAMPLES = 3  # samples of a query slower than SLOW (--slow-samples)


def sampled(action, count: int, warm: int = 2) -> tuple[list[float], str]:
    """timed() after warm-up calls; a query slower than SLOW seconds is sampled fewer
    times (its first call counts as one sample)."""
    first = timed(action, 1)[0]
    if first > SLOW:
        count = min(count, SLOW_SAMPLES)
        samples = [first, *timed(action, count - 1)]
        return samples, f" [{count} sample(s) only: {first:.1f} s a call]"
    timed(action, warm - 1)
    return timed(action, count), ""


def offset_token(offset: int) -> str:
    """MLflow's page token is its offset, base64 JSON (SearchUtils.create_page_token)."""
    return base64.b64encode(json.dumps({"offset": offset}).encode()).decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--page-samples", type=int, default=15, help="samples of each page query")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the 8-client throughput run")
    parser.add_argument("--skip-slow-orders", action="store_true",
                        help="skip pages ordered by the param i or by the metric (at 100,000 runs one such call "
                             "ran for over 5 minutes on this machine)")
    parser.add_argument("--slow-samples", type=int, default=3, help=f"samples of a query slower than {SLOW:.0f} s a call")
    args = parser.parse_args()
    global SLOW_SAMPLES
    SLOW_SAMPLES = max(1, args.slow_samples)

    # No telemetry, no background job runner (huey), nothing that leaves the machine.
    for key, value in {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
                       "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                       "MLFLOW_SERVER_JOB_ENABLE_PERIODIC_TASKS": "false"}.items():
        os.environ[key] = value
    os.environ.pop("MLFLOW_TRACKING_URI", None)

    import mlflow
    from mlflow.entities import ViewType
    from mlflow.protos.service_pb2 import GetRun, SearchRuns
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.tracking import MlflowClient
    from mlflow.utils.proto_json_utils import message_to_json

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{args.runs} runs, MLflow {mlflow.__version__} (SQLite, 1 uvicorn worker), {time.strftime('%Y-%m-%d')}")
    root = Path(tempfile.mkdtemp(prefix="bench-mlflow-"))
    db = root / "mlflow.db"
    db_uri = f"sqlite:///{db}"
    artifact_root = str(root / "artifacts")
    process = None
    log = None
    began_all = time.perf_counter()
    try:
        started = time.perf_counter()
        client = MlflowClient(tracking_uri=db_uri)
        experiment_id = client.create_experiment("bench", artifact_location=artifact_root)
        schema_s = time.perf_counter() - started
        rows = make_rows(args.runs)
        fill(db, experiment_id, artifact_root, rows)
        print(f"filled MLflow's tables in {time.perf_counter() - started:.1f} s "
              f"(its schema {schema_s:.1f} s, then {len(rows)} runs, {4 * len(rows)} params, "
              f"{len(rows)} metrics by executemany)")
        started = time.perf_counter()
        check_load(client, experiment_id, rows)
        print(f"checked the load through MLflow's search_runs/get_run in {time.perf_counter() - started:.1f} s")
        store = SqlAlchemyStore(db_uri, artifact_root)  # the in-process side: what the server calls
        uuids = [row["uuid"] for row in rows]
        del rows
        rng = random.Random(7)
        picks = [rng.choice(uuids) for _ in range(args.samples)]

        port = free_port()
        log = open(root / "server.log", "wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", db_uri,
             "--default-artifact-root", artifact_root, "--no-serve-artifacts",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=root, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                Client(port).get("/health")
                break
            except (ConnectionError, OSError, RuntimeError) as exc:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise SystemExit(f"the server did not start: {(root / 'server.log').read_text()[-3000:]}") from exc
                time.sleep(0.5)

        web = Client(port)
        detail = "/api/2.0/mlflow/runs/get?run_id={}"
        got = json.loads(web.get(detail.format(uuids[0])))["run"]
        assert {p["key"]: p["value"] for p in got["data"]["params"]} == {
            "i": "0", "lr": "0.0", "seed": "0", "model.width": "64"}, got
        for i in range(min(200, args.samples)):  # warm both sides
            web.get(detail.format(picks[i]))
        first_filter, first_order, _ = PAGES[0][1]
        for _ in range(3):
            web.search(experiment_id, first_filter, first_order)

        http_detail = timed(lambda i: web.get(detail.format(picks[i])), args.samples)
        unfiltered = timed(lambda i: web.search(experiment_id), args.page_samples)
        assert len(web.search(experiment_id)["runs"]) == min(100, args.runs)

        local_detail = timed(
            lambda i: message_to_json(GetRun.Response(run=store.get_run(picks[i]).to_proto())).encode(), args.samples)
        print(f"run detail          HTTP {summary(http_detail)}   in-process {summary(local_detail)}   "
              f"ratio {statistics.median(http_detail) / statistics.median(local_detail):.1f}x")
        print(f"first page (100), no filter, HTTP {summary(unfiltered)}   "
              f"(MLflow's default order: start_time DESC, run_uuid)")

        status, body = web.request("POST", "/api/2.0/mlflow/runs/search", json.dumps(
            {"experiment_ids": [experiment_id], "filter": LITERAL, "max_results": 100}).encode(), ok=False)
        message = json.loads(body).get("message", body[:200]) if status != 200 else "accepted"
        print(f"filter {LITERAL!r}: MLflow cannot (HTTP {status}: {message}); params are strings "
              f"(=, !=, LIKE, ILIKE, IS [NOT] NULL only), so config.lr >= 0.5 is asked as {LR_RANGE!r}, "
              f"the same runs (lr_metric = lr)")

        def search_local(filter: str, order: str | None, max_results: int = 100, token: str | None = None) -> bytes:
            found = store.search_runs([experiment_id], filter, ViewType.ACTIVE_ONLY, max_results, [order] if order else [], token)
            response = SearchRuns.Response(runs=[run.to_proto() for run in found])
            if found.token:
                response.next_page_token = found.token
            return message_to_json(response).encode()

        for (where, order), (mfilter, morder, predicate) in PAGES:
            if args.skip_slow_orders and morder.split()[0] in ("params.i", "metrics.lr_metric"):
                print(f"page (100) filter {mfilter!r} order_by {morder!r}: not measured (--skip-slow-orders)")
                continue
            got = web.search(experiment_id, mfilter, morder)["runs"]
            got_k = [int(next(p["value"] for p in run["data"]["params"] if p["key"] == "i")) for run in got]
            assert got_k == expected_page(args.runs, predicate, morder), f"{mfilter!r} {morder!r}: wrong page {got_k[:10]}"
            http_page, note = sampled(lambda i, f=mfilter, o=morder: web.search(experiment_id, f, o), args.page_samples)
            local_page, local_note = sampled(lambda i, f=mfilter, o=morder: search_local(f, o), args.page_samples)
            ours = f"ours where {where!r} order_by {order!r}" if where else "no bench_server counterpart"
            caveat = " (param order is string order)" if morder.startswith("params.") else ""
            print(f"page (100) filter {mfilter!r} order_by {morder!r}{caveat} [{ours}]: HTTP {summary(http_page)}{note}   "
                  f"in-process {summary(local_page)}{local_note}   "
                  f"ratio {statistics.median(http_page) / statistics.median(local_page):.1f}x"
                  f"   | its total: MLflow's search has no count")

        # Throughput: 8 clients, each on its own keep-alive connection, for a fixed time.
        print(throughput(lambda: Client(port), [detail.format(uuid) for uuid in uuids], args.seconds))

        # Deep pages of 100: MLflow's page token is an offset, so a page deep in is the
        # token of that offset (made as MLflow makes it); there is no keyset cursor.
        for order, repeat in ((None, 10), ("params.i ASC", 3), ("params.i DESC", 3)):
            if args.skip_slow_orders and order:
                print(f"page of 100, order_by {order}: not measured (--skip-slow-orders)")
                continue
            cells = []
            for fraction in (0.0, 0.5, 0.999):
                offset = int((args.runs - 100) * fraction)
                token = offset_token(offset) if offset else None
                deep, note = sampled(lambda i, o=order, t=token: web.search(experiment_id, "", o, 100, t), repeat, warm=1)
                cells.append(f"at {offset}: page_token {statistics.median(deep) * 1000:.1f} ms{note}")
            label = f"{order} (string order)" if order else "start_time DESC, run_uuid (MLflow default)"
            print(f"page of 100, order_by {label}: " + "; ".join(cells))

        # The "paging through 10,000 runs 1,000 at a time", by next_page_token.
        pages = max(1, min(args.runs, 10_000) // 1000)
        token: list[str | None] = [None]
        seen = [0]

        def by_token(i: int) -> None:
            page = web.search(experiment_id, "", None, 1000, token[0])
            seen[0] += len(page["runs"])
            token[0] = page.get("next_page_token")

        paged = timed(by_token, pages)
        assert seen[0] == pages * 1000, seen[0]
        print(f"first {pages * 1000} runs by page_token: {len(paged)} pages in {sum(paged):.2f} s; "
              f"first 5 pages {statistics.median(paged[:5]) * 1000:.1f} ms, "
              f"last 5 {statistics.median(paged[-5:]) * 1000:.1f} ms a page")
    finally:
        if process is not None:
            try:  # mlflow server runs uvicorn as its child: end the session's group it leads
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=15)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        if log is not None:
            log.close()
        shutil.rmtree(root, ignore_errors=True)
        print(f"whole run {time.perf_counter() - began_all:.1f} s")


if __name__ == "__main__":
    main()
