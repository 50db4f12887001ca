"""The mixed soak of tests/test_soak.py, run longer: issue 10's invariants under load.

    python benchmarks/bench_soak.py [--seconds 60] [--runs 24] [--store file|s3]

Three processes launch overlapping runs and read them back while others loop
``machinable reindex``, ``push --all``, ``verify``, and ``evict --where`` with
``pull --all``. Prints how many times each loop ran and every violated invariant (no
failed command, no traceback, a clean final verify, each run computed once and holding
the bytes its launch wrote); exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

from soak import run_soak  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--runs", type=int, default=24)
    parser.add_argument("--store", choices=["file", "s3"], default="file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        project = Path(tmp) / "study"
        project.mkdir()
        os.chdir(project)
        server = None
        if args.store == "s3":
            import time

            import s3server

            server = s3server._start(s3server._weed_binary(), Path(tmp) / "s3")
            problem = s3server._wait_ready(server, time.monotonic() + s3server.STARTUP_DEADLINE)
            if problem is not None:
                raise SystemExit(f"SeaweedFS did not start: {problem}")
            bucket = server.make_bucket("soak")
            options = server.storage_options
            os.environ.update(
                AWS_ACCESS_KEY_ID=options["key"],
                AWS_SECRET_ACCESS_KEY=options["secret"],
                AWS_ENDPOINT_URL=server.endpoint_url,
                AWS_DEFAULT_REGION="us-east-1",
            )
            store = f"s3://{bucket}/runs"
        else:
            store = (Path(tmp) / "store").as_uri()
        try:
            result = run_soak(project, store, args.seconds, runs=args.runs)
        finally:
            if server is not None:
                s3server._stop(server.process)
        problems = result.problems(project)
    print(f"soak of {args.seconds:g} s ({result.seconds:.0f} s with start-up and settling), store {args.store}")
    for name, count in sorted(result.commands.items()):
        print(f"  {name}: {count}")
    print(f"  runs launched: {len(result.launches)}, reads checked: {len(result.reads)}")
    for problem in problems:
        print(f"PROBLEM {problem}")
    print("clean" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
