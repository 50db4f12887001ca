"""Push and fetch many small runs to a real S3 API (SeaweedFS), against an s3fs baseline.

    /work/venv/bin/python benchmarks/bench_transfer.py [--runs 1000] [--repeat 1]

The baseline is what a bulk sync tool (``aws s3 sync``) does: one ``fs.put(storage/,
remote/, recursive=True)`` of the directory holding the same runs, and one
``fs.get(remote/, local/, recursive=True)`` back, with no manifests and no verification.
(A list of run directories with one target string would be flattened by fsspec, so the
baseline puts their common parent.) machinable's
``push_runs`` / ``fetch_runs`` additionally checksum every file, verify the store's copy
(listing ETags) or every downloaded byte, and write one manifest per run. Each variant
gets its own fresh bucket; the ratio (machinable / baseline) is the figure of merit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid as uuidlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

from machinable.stores.transfer import fetch_runs, open_store, push_runs  # noqa: E402

import s3server  # noqa: E402


def make_runs(storage: Path, count: int) -> list[Path]:
    """Create small record directories (7 files, about 2 KB each run)."""
    runs = []
    for i in range(count):
        uuid = uuidlib.uuid4().hex
        run = storage / uuid
        (run / "data").mkdir(parents=True)
        (run / ".machinable").write_text("")
        (run / "id.json").write_text(json.dumps({"format": 1, "uuid": uuid, "module": "bench"}))
        (run / "model.json").write_text(json.dumps({"module": "bench", "config": {"i": i}}))
        (run / "started_at").write_text("2024-01-01T00:00:00+00:00")
        (run / "finished_at").write_text("2024-01-01T00:01:00+00:00")
        (run / "data" / "metrics.json").write_text(json.dumps({"loss": [i * 0.1] * 50}))
        (run / "data" / "weights.bin").write_bytes(os.urandom(1024))
        runs.append(run)
    return runs


def timed(label: str, fn) -> float:
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    print(f"  {label:<28} {elapsed:8.2f} s", flush=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-transfer-"))
    server = s3server._start(s3server._weed_binary(), work / "seaweedfs")
    try:
        problem = s3server._wait_ready(server, time.monotonic() + s3server.STARTUP_DEADLINE)
        if problem:
            raise SystemExit(f"SeaweedFS did not start: {problem}\n{server.log_tail()}")
        runs = make_runs(work / "storage", args.runs)
        files = sum(1 for run in runs for p in run.rglob("*") if p.is_file())
        print(f"{len(runs)} runs, {files} files, SeaweedFS at {server.endpoint_url}")
        totals: dict[str, list[float]] = {}

        def fresh_store() -> tuple:
            bucket = server.make_bucket("bench")
            fs, root = open_store(f"s3://{bucket}/runs", **server.storage_options)
            fs.pipe_file(f"{bucket}/warm", b"x")  # SeaweedFS grows volumes on first write
            return fs, root

        storage = work / "storage"

        def baseline(attempt: int) -> None:
            fs, root = fresh_store()
            totals.setdefault("baseline put", []).append(
                timed("baseline fs.put", lambda: fs.put(f"{storage}/", f"{root}/", recursive=True))
            )
            assert len(fs.find(root)) == files, "baseline did not upload every file"
            back = work / f"baseline-back-{attempt}"
            back.mkdir()
            totals.setdefault("baseline get", []).append(
                timed("baseline fs.get", lambda: fs.get(f"{root}/", f"{back}/", recursive=True))
            )
            assert sum(1 for p in back.rglob("*") if p.is_file()) == files
            shutil.rmtree(back)

        def machinable(attempt: int) -> None:
            fs, root = fresh_store()
            items = [(run.name, run) for run in runs]
            totals.setdefault("push_runs", []).append(
                timed("machinable push_runs", lambda: push_runs(items, fs, root))
            )
            totals.setdefault("re-push (no change)", []).append(
                timed("machinable re-push unchanged", lambda: push_runs(items, fs, root))
            )
            dest = work / f"fetched-{attempt}"
            dest.mkdir()
            pairs = [(run.name, dest / run.name) for run in runs]
            totals.setdefault("fetch_runs", []).append(
                timed("machinable fetch_runs", lambda: fetch_runs(pairs, fs, root))
            )
            shutil.rmtree(dest)

        for attempt in range(args.repeat):
            print(f"round {attempt + 1}  (load average {os.getloadavg()[0]:.1f})")
            # alternate the order so a change in machine load does not favour one side
            first, second = (baseline, machinable) if attempt % 2 == 0 else (machinable, baseline)
            first(attempt)
            second(attempt)
        best = {name: min(values) for name, values in totals.items()}
        print("\nbest of", args.repeat)
        for name, value in best.items():
            print(f"  {name:<28} {value:8.2f} s")
        print(f"  push / baseline put         {best['push_runs'] / best['baseline put']:8.2f} x")
        print(f"  fetch / baseline get        {best['fetch_runs'] / best['baseline get']:8.2f} x")
    finally:
        s3server._stop(server.process)
        s3server._remove_sockets(server.ports)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
