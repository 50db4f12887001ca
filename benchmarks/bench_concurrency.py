"""Many writers: N processes x M launches into one fresh index, on SQLite and PostgreSQL.

    python benchmarks/bench_concurrency.py                   # 8 x 500, both backends
    python benchmarks/bench_concurrency.py --processes 4 --launches 200 --backend sqlite

Prints launches per second for the parallel run and, as the baseline measured in the
same run, one process doing all the launches alone.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid as uuidlib
from pathlib import Path

MODULE = """
from pydantic import BaseModel
from machinable import Interface


class Trivial(Interface):
    class Config(BaseModel):
        i: int = 0

    def __call__(self):
        self.save_file("out.txt", str(self.config.i))
"""

WORKER = """
import sys, time
from pathlib import Path
go = Path(sys.argv[3])
while not go.exists():
    time.sleep(0.002)
from machinable import get
worker, count = int(sys.argv[1]), int(sys.argv[2])
for i in range(count):
    get("trivial", {"i": worker * 1000000 + i}).launch()
"""


def timed_run(project: Path, processes: int, launches: int, env: dict[str, str]) -> float:
    script = project / "worker.py"
    go = project / f"go-{uuidlib.uuid4().hex}"
    children = [
        subprocess.Popen([sys.executable, str(script), str(w), str(launches), str(go)], cwd=project, env=env)
        for w in range(processes)
    ]
    time.sleep(1.5)  # all children imported and waiting
    start = time.perf_counter()
    go.touch()
    codes = [child.wait() for child in children]
    elapsed = time.perf_counter() - start
    if any(codes):
        raise SystemExit(f"a worker failed: exit codes {codes}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--launches", type=int, default=500)
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--postgres", default="postgresql+psycopg://root@127.0.0.1:5432/test")
    args = parser.parse_args()
    total = args.processes * args.launches
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    for backend in ("sqlite", "postgresql") if args.backend == "both" else (args.backend,):
        for label, processes, launches in (
            ("1 process (baseline)", 1, total),
            (f"{args.processes} processes", args.processes, args.launches),
        ):
            work = Path(tempfile.mkdtemp(prefix="machinable-conc-"))
            project = work / "bench"
            project.mkdir()
            (project / "trivial.py").write_text(textwrap.dedent(MODULE))
            (project / "worker.py").write_text(textwrap.dedent(WORKER))
            env = {**os.environ}
            schema = None
            if backend == "postgresql":
                from sqlalchemy import create_engine, text

                schema = f"conc_{uuidlib.uuid4().hex[:8]}"
                admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
                with admin.connect() as conn:
                    conn.execute(text(f'CREATE SCHEMA "{schema}"'))
                env["MACHINABLE_INDEX"] = f"{args.postgres}?options=-csearch_path%3D{schema}"
            else:
                env.pop("MACHINABLE_INDEX", None)
            try:
                elapsed = timed_run(project, processes, launches, env)
                print(f"[{backend}] {label}: {total} launches in {elapsed:.1f} s = {total / elapsed:.0f} launches/s")
            finally:
                shutil.rmtree(work, ignore_errors=True)
                if schema is not None:
                    with admin.connect() as conn:
                        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
                    admin.dispose()


if __name__ == "__main__":
    main()
