"""Many writers on one index: parallel processes opening a new index at once."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from machinable import Index
from machinable.catalog.engine import SCHEMA_HEAD, filesystem_type, journal_mode_for

from conftest import write_module

TRIVIAL = """
from pydantic import BaseModel
from machinable import Interface


class Trivial(Interface):
    class Config(BaseModel):
        i: int = 0

    def __call__(self):
        self.save_file("out.txt", str(self.config.i))
"""

WORKER = """
import os, sys, time
from pathlib import Path
go = Path(sys.argv[3])
while not go.exists():
    time.sleep(0.005)
from machinable import get
worker, count = int(sys.argv[1]), int(sys.argv[2])
for i in range(count):
    run = get("trivial", {"i": worker * 100000 + i})
    run.launch()
    assert run.cached()
print("ok", worker)
"""

PROCESSES, LAUNCHES = 8, 500


@pytest.mark.timeout(900)
def test_parallel_writers_on_a_fresh_index(project: Path, index_backend: str, tmp_path: Path):
    write_module(project, "trivial", TRIVIAL)
    if index_backend == "sqlite":
        assert not (project / ".machinable.sqlite").exists()  # nobody created it yet
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    go = tmp_path / "go"
    children = [
        subprocess.Popen(
            [sys.executable, str(script), str(worker), str(LAUNCHES), str(go)],
            cwd=project,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for worker in range(PROCESSES)
    ]
    time.sleep(1.0)  # every child is waiting at the barrier
    go.touch()
    results = [child.communicate(timeout=800) for child in children]
    for child, (out, err) in zip(children, results, strict=True):
        assert child.returncode == 0, err[-3000:]
        assert "ok" in out
        assert "Traceback" not in err and "locked" not in err

    index = Index.get()
    assert index.count() == PROCESSES * LAUNCHES
    assert index.count("status = 'finished'") == PROCESSES * LAUNCHES
    with index.engine.connect() as conn:
        from sqlalchemy import text

        versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
        locations = conn.execute(text("SELECT count(*), count(DISTINCT run_uuid) FROM locations")).one()
    assert versions == [SCHEMA_HEAD]
    assert tuple(locations) == (PROCESSES * LAUNCHES, PROCESSES * LAUNCHES)
    stored = [p for p in (project / "storage").iterdir() if (p / "finished_at").exists()]
    assert len(stored) == PROCESSES * LAUNCHES


def test_wal_on_local_disks_and_a_rollback_journal_on_network_filesystems(tmp_path: Path):
    mounts = "\n".join(
        [
            "/dev/vda1 / ext4 rw,relatime 0 0",
            "server:/export /mnt/lab nfs4 rw,relatime,vers=4.2 0 0",
            "//nas/share /mnt/nas cifs rw 0 0",
            "tmpfs /mnt/lab/scratch tmpfs rw 0 0",
        ]
    )
    assert filesystem_type(Path("/home/me/study"), mounts) == "ext4"
    assert filesystem_type(Path("/mnt/lab/study"), mounts) == "nfs4"
    assert filesystem_type(Path("/mnt/lab/scratch/x"), mounts) == "tmpfs"
    assert filesystem_type(Path("/mnt/nas/x"), mounts) == "cifs"
    assert filesystem_type(Path("/mnt/labx"), mounts) == "ext4"
    assert journal_mode_for(tmp_path / "index.sqlite") == "WAL"


@pytest.mark.parametrize("kind", ["nfs4", "cifs", "fuse.sshfs"])
def test_an_index_on_a_network_filesystem_opens_with_a_rollback_journal(tmp_path: Path, kind: str) -> None:
    """The engine itself decides: the directory holding the index is on ``kind`` per
    the mount table it reads, and the connection it opens uses journal_mode=delete."""
    from machinable.catalog.engine import ensure_schema, make_engine, to_url

    share = tmp_path / "share"
    share.mkdir()
    table = Path("/proc/mounts").read_text() + f"server:/export {share} {kind} rw,relatime 0 0\n"
    url = to_url(share / "index.sqlite")
    with pytest.warns(UserWarning, match=f"network filesystem \\({kind}\\)"):
        engine = make_engine(url, mounts=table)
    try:
        ensure_schema(engine, url)  # a whole migration under the rollback journal
        with engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "delete"
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == SCHEMA_HEAD
    finally:
        engine.dispose()
    assert not (share / "index.sqlite-wal").exists()

    local = make_engine(to_url(tmp_path / "local.sqlite"), mounts=Path("/proc/mounts").read_text())
    try:
        with local.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    finally:
        local.dispose()


def test_sqlite_profile_is_set_on_every_connection(sqlite_project: Path):
    project = sqlite_project
    from sqlalchemy import text

    from machinable import get

    write_module(project, "trivial", TRIVIAL)
    get("trivial").launch()
    with Index.get().engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 1  # NORMAL
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() >= 1000
