"""What a run's content digest costs: on the launch of a trivial run, and on a 1 GB run.

    python benchmarks/bench_digest.py [--launches 500] [--gigabytes 1]

machinable records a run's digest lazily (at its first push, evict, fetch or
``verify --checksums``), so a launch computes none. This script measures what it would
cost to compute it when a run finishes anyway, interleaving three launches of trivial
runs so each sees the same disk: machinable's launch as shipped, the same launch
followed by the digest (manifest of the run directory, then the index row updated),
and bench_core's plain-Python baseline (the same files written atomically, one SQLite
row). For the large run it times the manifest (sha256 and md5 of every file, which a
push needs anyway) and the digest derived from it, against hashing the same bytes
with one ``hashlib.sha256`` (page cache warm in both).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_core import BaselineLauncher  # noqa: E402

TRIVIAL = """
from pydantic import BaseModel
from machinable import Interface


class Trivial(Interface):
    class Config(BaseModel):
        i: int = 0
        lr: float = 0.1

    def __call__(self):
        pass
"""


def launches(root: Path, n: int) -> dict[str, list[float]]:
    from machinable import Index, Project, get
    from machinable.stores.manifest import build_manifest, manifest_digest

    project = root / "project"
    project.mkdir()
    (project / "trivial.py").write_text(textwrap.dedent(TRIVIAL))
    baseline = BaselineLauncher(root)
    times: dict[str, list[float]] = {"launch": [], "launch + digest": [], "baseline": []}
    with Project(project):
        index = Index.get()
        get("trivial", {"i": -1}).launch()  # the index exists and is migrated
        for i in range(n):
            start = time.perf_counter()
            get("trivial", {"i": i}).launch()
            times["launch"].append(time.perf_counter() - start)

            start = time.perf_counter()
            run = get("trivial", {"i": n + i}).launch()
            index.set_digest(run.uuid, manifest_digest(build_manifest(run.local_directory())))
            times["launch + digest"].append(time.perf_counter() - start)

            start = time.perf_counter()
            baseline.launch(i)
            times["baseline"].append(time.perf_counter() - start)
    baseline.db.close()
    return times


def large_run(root: Path, gigabytes: float) -> dict[str, float]:
    from machinable.stores.manifest import build_manifest, manifest_digest

    directory = root / "large" / ("0" * 32)
    directory.mkdir(parents=True)
    for name in (".machinable", "id.json", "model.json", "finished_at"):
        (directory / name).write_text("{}")
    total = int(gigabytes * 2**30)
    chunk = os.urandom(1 << 20)
    files = 8
    for k in range(files):
        with open(directory / f"shard-{k}.bin", "wb") as handle:
            for _ in range(total // files // len(chunk)):
                handle.write(chunk)
    # warm the page cache, then time each twice and keep the faster
    def plain() -> None:
        for path in sorted(directory.iterdir()):
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                while block := handle.read(1 << 20):
                    digest.update(block)

    def ours() -> None:
        manifest_digest(build_manifest(directory))

    plain()
    results = {}
    for label, action in (("sha256 of every file (baseline)", plain), ("manifest + digest", ours)):
        best = float("inf")
        for _ in range(2):
            start = time.perf_counter()
            action()
            best = min(best, time.perf_counter() - start)
        results[label] = best
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=500)
    parser.add_argument("--gigabytes", type=float, default=1.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-digest-") as tmp:
        root = Path(tmp)
        times = launches(root, args.launches)
        medians = {label: statistics.median(values) * 1000 for label, values in times.items()}
        for label, value in medians.items():
            print(f"{label:>18}: median {value:.3f} ms over {args.launches}")
        extra = medians["launch + digest"] / medians["launch"] - 1
        print(f"digest at finish would add {extra * 100:.1f}% to a trivial launch "
              f"(machinable/baseline {medians['launch'] / medians['baseline']:.2f}x as shipped)")
        large = large_run(root, args.gigabytes)
        for label, value in large.items():
            print(f"{args.gigabytes:g} GB run, {label}: {value:.2f} s")
        values = list(large.values())
        print(f"ratio manifest+digest / sha256 baseline: {values[1] / values[0]:.2f}x")


if __name__ == "__main__":
    main()
