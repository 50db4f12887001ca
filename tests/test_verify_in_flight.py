"""verify under load (issue 14, finding 7): runs in flight, being launched or evicted by
another process with the run's lock held, are reported as in flight, never as problems;
real problems beside them still make verify exit 1. Every state is made by real
processes holding the real lock, not by a window of time."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from machinable import Index, RemoteStore, get
from machinable.operations.verify import verify
from machinable.record import launch_lock

from conftest import invoke, write_module

HOLDS = """
import time
from machinable import Interface


class Holds(Interface):
    def __call__(self):
        (self.project.path / "holding.txt").write_text(self.uuid)
        while not (self.project.path / "release.txt").exists():
            time.sleep(0.02)
"""

# Another process in the middle of an eviction: it holds the run's launch lock (as
# evict() does while it deletes the directory and drops the location) until released.
HOLDER = """
import sys, time
from pathlib import Path
import filelock

lock = filelock.FileLock(sys.argv[1])
lock.acquire()
Path(sys.argv[2]).touch()
while not Path(sys.argv[3]).exists():
    time.sleep(0.02)
"""


# An eviction that says when it has found the run's lock held (machinable.locks logs
# "lock ... not acquired" at DEBUG before it waits).
EVICT = """
import logging, os
from pathlib import Path


class Waiting(logging.Handler):
    def emit(self, record):
        if "not acquired" in record.getMessage():
            Path(f"waiting-{os.getpid()}").touch()


logging.getLogger("machinable.locks").addHandler(Waiting())
logging.getLogger("machinable.locks").setLevel(logging.DEBUG)
from machinable import get
get("optimize", {"lr": 0.5}).evict()
"""


def wait_for(path: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not path.exists():
        assert process.poll() is None, "the holder ended early"
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)


def test_a_run_being_launched_is_in_flight_not_a_problem(project: Path) -> None:
    write_module(project, "holds", HOLDS)
    get("optimize", {"lr": 0.5}).launch()
    holder = subprocess.Popen([sys.executable, "-c", "from machinable import get\nget('holds').launch()\n"], cwd=project)
    try:
        wait_for(project / "holding.txt", holder)
        running = get("holds").uuid  # started, no index row yet, lock held
        report = verify(Index.get())
        assert report.findings == [] and report.ok, [str(f) for f in report.findings]
        assert report.in_flight == [running]
        result = invoke("verify")  # exit 0
        assert "1 run(s) in flight" in result.stdout and running in result.stdout

        # A real problem beside it still fails the pass.
        broken = project / "storage" / ("b" * 32)
        shutil.copytree(get("optimize", {"lr": 0.5}).local_directory(), broken)
        (broken / "id.json").write_text("{not json")
        result = invoke("verify", ok=False)
        assert result.exit_code == 1
        assert f"invalid record: {broken}" in result.stdout and "1 run(s) in flight" in result.stdout
        shutil.rmtree(broken)
    finally:
        (project / "release.txt").write_text("")
        assert holder.wait(timeout=120) == 0
    after = verify(Index.get())
    assert after.ok and after.in_flight == [] and after.findings == []


def test_a_run_being_evicted_is_in_flight_until_its_lock_is_free(project: Path, tmp_path: Path) -> None:
    half = get("optimize", {"lr": 0.5}).launch()  # files partly deleted
    gone = get("optimize", {"lr": 0.7}).launch()  # directory deleted, location not yet dropped
    (half.local_directory() / "id.json").unlink()
    (half.local_directory() / "result.json").unlink()
    shutil.rmtree(gone.local_directory())
    holders = []
    try:
        for run in (half, gone):
            lock = launch_lock(run._default_directory())
            ready, release = tmp_path / f"{run.uuid}.ready", tmp_path / f"{run.uuid}.release"
            holder = subprocess.Popen([sys.executable, "-c", HOLDER, lock, str(ready), str(release)])
            holders.append((holder, release))
            wait_for(ready, holder)
        report = verify(Index.get())
        assert report.findings == [] and report.ok, [str(f) for f in report.findings]
        assert sorted(report.in_flight) == sorted([half.uuid, gone.uuid])
        repaired = verify(Index.get(), repair=True)  # nothing in flight is touched
        assert repaired.findings == [] and Index.get().find(gone.uuid) is not None
    finally:
        for holder, release in holders:
            release.touch()
            assert holder.wait(timeout=60) == 0
    # The holders let go without finishing: now these are problems, and exit 1.
    report = verify(Index.get())
    assert report.in_flight == []
    kinds = sorted((f.target.rsplit("/", 1)[-1], f.kind) for f in report.findings)
    assert kinds == sorted([(half.uuid, "invalid record"), (gone.uuid, "directory missing")])
    assert invoke("verify", ok=False).exit_code == 1


def test_an_eviction_holds_the_run_lock(project: Path, tmp_path: Path) -> None:
    run = get("optimize", {"lr": 0.5}).launch()
    store = RemoteStore(f"file://{tmp_path / 'store'}")
    run.push(store)
    lock = launch_lock(run._default_directory())
    ready, release = tmp_path / "ready", tmp_path / "release"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, lock, str(ready), str(release)])
    try:
        wait_for(ready, holder)
        evicting = subprocess.Popen([sys.executable, "-c", EVICT], cwd=project, env=dict(os.environ))
        waiting = project / f"waiting-{evicting.pid}"
        deadline = time.monotonic() + 120
        while not waiting.exists():  # it found the run's lock held and waits for it
            assert evicting.poll() is None, "the eviction did not wait for the run's lock"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert run.is_mounted()  # nothing deleted while the lock is held elsewhere
    finally:
        release.touch()
        assert holder.wait(timeout=60) == 0
    assert evicting.wait(timeout=120) == 0
    assert not run.is_mounted() and run.cached()
