"""verify benchmark: verify(index) over N record directories, beside a plain baseline.

    python benchmarks/bench_verify.py                    # 100,000 runs
    python benchmarks/bench_verify.py --runs 20000       # quicker

It writes N finished record directories (bench_core.make_records), indexes them with
reindex() into a fresh SQLite index, then times ``verify(Index.get())`` (headers and index rows, no file hashing:
``checksums=False`` is the default) and ``verify(checksums=True)`` (the same, plus a
lookup of each run's store copies; none is pushed here, so every run is counted as
unchecked and no file is hashed). The baseline, measured in the same run, is what any
verify must at least do: scandir the storage and json-load both headers of every run.
The ratio is what to compare across machines. The page cache is warm.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_core import MODULE, make_records, scan_headers  # noqa: E402


def baseline_scan(storage: Path) -> tuple[float, int]:
    """scandir + read and json-load id.json and model.json of every run (no index)."""
    start = time.perf_counter()
    count = len(scan_headers(storage))
    return time.perf_counter() - start, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000, help="record directories (default 100000)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="machinable-bench-verify-"))
    project = work / "bench"
    project.mkdir()
    (project / "trivial.py").write_text(textwrap.dedent(MODULE))
    os.chdir(project)
    sys.path.insert(0, str(project))

    from machinable import Index
    from machinable.catalog.engine import dispose_all
    from machinable.operations.verify import verify

    index = Index.get()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"index: {index.dialect}; work dir: {work} (warm page cache: directories were just written)")

    storage = project / "storage"
    start = time.perf_counter()
    make_records(storage, args.runs, "bench")
    print(f"wrote {args.runs} record directories in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    report = index.reindex(progress=False)
    assert report.indexed == args.runs, (report.indexed, report.skipped[:3])
    print(f"indexed them in {time.perf_counter() - start:.1f} s")
    print()

    base_s, counted = baseline_scan(storage)
    assert counted == args.runs
    rows = [("baseline: scandir + json-load both headers", base_s, None)]

    start = time.perf_counter()
    plain = verify(index, progress=False)
    plain_s = time.perf_counter() - start
    assert plain.ok and plain.checked == args.runs, str(plain)[-500:]
    rows.append(("verify(index)  (checksums=False)", plain_s, plain))

    start = time.perf_counter()
    hashed = verify(index, checksums=True, progress=False)
    hashed_s = time.perf_counter() - start
    assert hashed.ok and hashed.checked == args.runs and len(hashed.unchecked) == args.runs
    rows.append(("verify(checksums=True)  (no store copies)", hashed_s, hashed))

    for label, seconds, _ in rows:
        ratio = "" if label.startswith("baseline") else f"   ratio {seconds / base_s:5.2f}x"
        print(f"{label:44s} {seconds:7.2f} s   {args.runs / seconds:9.0f} runs/s{ratio}")

    dispose_all()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
