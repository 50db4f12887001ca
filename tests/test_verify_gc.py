"""verify and gc (issue 6, items 1 and 5): every kind of problem, repair, resume, gc.

``verify(Index.get())`` (machinable.operations.verify) compares the index with the record directories and reports
each problem with its kind and the run or path it concerns; ``repair=True`` fixes
what needs no guessing and a second pass is clean. ``machinable gc`` lists (dry run)
and deletes (``--yes``) what nothing needs, and never a finished run's directory or
the last verified copy of a run. Every test runs on SQLite and PostgreSQL; dead runs
and interrupted passes are real processes killed by SIGKILL.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from machinable import Index, RemoteStore, get
from machinable.cli import cli
from machinable.errors import EvictionRefused
from machinable.identity import compute_uuid, config_key, predicate_key
from machinable.operations import gc as collector
from machinable.operations import verify as verifier
from machinable.operations.verify import verify
from machinable.record import LOCKS_DIR, dump_json, id_header, mark
from machinable.stores.manifest import MANIFEST_NAME

from conftest import run_python, table_rows, write_module

FAILS = '''
from pathlib import Path

from pydantic import BaseModel
from machinable import Interface


class Fails(Interface):
    class Config(BaseModel):
        n: int = 0

    def __call__(self):
        if (self.project.path / "fail.flag").exists():
            raise RuntimeError("asked to fail")
        self.save_file("result.json", {"n": self.config.n})
'''

DIES = '''
import os
import signal

from machinable import Interface


class Dies(Interface):
    def __call__(self):
        self.save_file("partial.json", {"step": 1})
        os.kill(os.getpid(), signal.SIGKILL)
'''

HOLDS = '''
import time

from machinable import Interface


class Holds(Interface):
    def __call__(self):
        (self.project.path / "holding.txt").write_text(self.uuid)
        deadline = time.time() + 60
        while not (self.project.path / "release.txt").exists() and time.time() < deadline:
            time.sleep(0.02)
'''


def invoke(*args: str, code: int = 0):
    result = CliRunner().invoke(cli, ["-q", *args], catch_exceptions=False, prog_name="machinable")
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    return result


def assert_one_line_error(result, *needles: str) -> str:
    assert result.exit_code != 0
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def kinds(report) -> dict[str, list]:
    """{target: sorted kinds} of a verify report."""
    found: dict[str, list] = {}
    for finding in report.findings:
        found.setdefault(finding.target, []).append(finding.kind)
    return {target: sorted(k) for target, k in found.items()}


def finding(report, target: str, kind: str):
    matches = [f for f in report.findings if f.target == target and f.kind == kind]
    assert len(matches) == 1, (target, kind, [str(f) for f in report.findings])
    return matches[0]


def storage(project: Path) -> Path:
    return project / "storage"


def launch(lr: float):
    return get("optimize", {"lr": lr}).launch()


def store_at(tmp_path: Path, name: str = "store") -> RemoteStore:
    return RemoteStore(f"file://{tmp_path / name}")


def copy_record(source: Path, target_root: Path) -> Path:
    target = target_root / source.name
    shutil.copytree(source, target)
    return target


def write_records(root: Path, count: int, project: str = "bulk", start: int = 0) -> list[str]:
    """Small finished record directories with valid headers (what launch() writes)."""
    names = []
    stamp = "2026-01-01T00:00:00+00:00"
    for i in range(start, start + count):
        canonical = {"i": i}
        uuid = compute_uuid(project, "trivial", canonical, {})
        directory = root / uuid
        directory.mkdir(parents=True)
        model = {
            "module": "trivial",
            "project": project,
            "config": canonical,
            "canonical": canonical,
            "version": [],
            "predicate": {},
            "created_at": stamp,
        }
        (directory / "model.json").write_text(dump_json(model))
        (directory / "id.json").write_text(
            dump_json(id_header(uuid, project, "trivial", config_key(canonical), predicate_key({})))
        )
        (directory / ".machinable").write_text("")
        for marker in ("started_at", "finished_at", "updated_at"):
            (directory / marker).write_text(stamp)
        names.append(uuid)
    return names


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every file and directory below ``roots`` with its bytes' hash and mtime."""
    found: dict[str, tuple] = {}
    for root in roots:
        for current, dirs, files in os.walk(root):
            for name in dirs:
                found[os.path.join(current, name)] = ("dir",)
            for name in files:
                path = os.path.join(current, name)
                if ".machinable.sqlite" in name:
                    continue  # the SQLite index is compared by its rows
                info = os.lstat(path)
                with open(path, "rb") as handle:
                    digest = hashlib.sha256(handle.read()).hexdigest()
                found[path] = (digest, info.st_mtime_ns)
    return found


def index_tables() -> dict[str, list]:
    return {table: table_rows(table) for table in ("runs", "locations", "remotes", "availability")}


def age(path: Path, seconds: float) -> None:
    moment = time.time() - seconds
    os.utime(path, (moment, moment))


# --------------------------------------------------------------------------- verify


def test_a_clean_catalog_verifies_clean(project: Path) -> None:
    runs = [launch(lr) for lr in (0.1, 0.2, 0.3)]
    report = verify(Index.get())
    assert report.findings == [] and report.ok
    assert report.checked == 3
    assert report.resumed_after is None
    result = invoke("verify")
    assert "checked 3 run directories" in result.stdout and "0 problem(s)" in result.stdout
    assert all(run.status() == "finished" for run in runs)


def test_a_directory_the_index_does_not_hold_is_reported_and_ingested(
    project: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    with Index(tmp_path / "other.sqlite"):
        from machinable import Storage

        with Storage(elsewhere):
            foreign = launch(0.7)
    copied = copy_record(elsewhere / foreign.uuid, storage(project))
    launch(0.1)  # the storage exists and holds an indexed run too
    assert Index.get().status(foreign.uuid) is None

    report = verify(Index.get())
    found = finding(report, foreign.uuid, "not indexed")
    assert str(copied) in found.detail and not found.repaired
    assert kinds(report) == {foreign.uuid: ["not indexed"]}
    assert not report.ok
    assert Index.get().status(foreign.uuid) is None  # verify alone changes nothing

    repaired = verify(Index.get(), repair=True)
    assert finding(repaired, foreign.uuid, "not indexed").repaired
    assert repaired.ok
    assert Index.get().status(foreign.uuid) == "finished"
    assert Index.get().find(foreign.uuid).directories == (str(copied),)
    assert verify(Index.get()).findings == []
    assert get("optimize", {"lr": 0.7}).loss() == pytest.approx(1 / (1 + 0.7 * 100))


def test_a_stale_row_is_reported_and_reingested(project: Path) -> None:
    write_module(project, "fails", FAILS)
    (project / "fail.flag").write_text("")
    run = get("fails", {"n": 1})
    with pytest.raises(RuntimeError):
        run.launch()
    assert Index.get().status(run.uuid) == "failed"
    # The directory finished (e.g. a process finished it, but its index commit was lost).
    directory = storage(project) / run.uuid
    (directory / "result.json").write_text('{"n": 1}')
    mark(directory, "finished_at")

    report = verify(Index.get())
    stale = finding(report, run.uuid, "stale row")
    assert "'failed'" in stale.detail and "'finished'" in stale.detail
    assert not stale.repaired and not report.ok
    assert Index.get().status(run.uuid) == "failed"

    result = invoke("verify", "--repair")
    assert f"stale row: {run.uuid}" in result.stdout and "[repaired]" in result.stdout
    assert "1 repaired, 0 left" in result.stdout
    assert Index.get().status(run.uuid) == "finished"
    again = invoke("verify")
    assert "0 problem(s)" in again.stdout


def test_model_json_drift_is_listed_and_never_repaired(project: Path) -> None:
    run = launch(0.5)
    good = launch(0.6)
    path = storage(project) / run.uuid / "model.json"
    model = json.loads(path.read_text())
    model["canonical"]["lr"] = 0.9  # the config no longer hashes to the directory's uuid
    path.write_text(json.dumps(model))
    before = index_tables()

    report = verify(Index.get(), repair=True)
    drift = finding(report, str(storage(project) / run.uuid), "invalid record")
    assert "hashes to" in drift.detail and run.uuid in drift.detail
    assert not drift.repaired and not report.ok
    assert kinds(report) == {str(storage(project) / run.uuid): ["invalid record"]}
    # nothing was "fixed" by guessing: the row, the file and the good run are untouched
    assert index_tables() == before
    assert json.loads(path.read_text())["canonical"]["lr"] == 0.9
    assert Index.get().status(good.uuid) == "finished"
    result = invoke("verify", "--repair", code=1)
    assert "invalid record" in result.stdout and "NOT repaired" in result.stdout
    assert "1 left" in result.stdout


def test_invalid_and_unreadable_headers_are_listed_and_never_abort_the_pass(
    project: Path, tmp_path: Path
) -> None:
    runs = [launch(lr) for lr in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)]
    root = storage(project)
    broken = {}
    # id.json is not JSON
    (root / runs[0].uuid / "id.json").write_text("{not json")
    broken[runs[0].uuid] = "id.json is not valid JSON"
    # model.json is missing
    (root / runs[1].uuid / "model.json").unlink()
    broken[runs[1].uuid] = "model.json is missing"
    # id.json is a directory
    (root / runs[2].uuid / "id.json").unlink()
    (root / runs[2].uuid / "id.json").mkdir()
    broken[runs[2].uuid] = "unreadable header"
    # model.json holds bytes that are not UTF-8
    (root / runs[3].uuid / "model.json").write_bytes(b"\xff\xfe{\x00")
    broken[runs[3].uuid] = "unreadable header"
    # no sentinel: not a record
    (root / runs[4].uuid / ".machinable").unlink()
    broken[runs[4].uuid] = "not a machinable record"
    # a record copied under another run's name
    wrong = "0" * 31 + "1"
    shutil.copytree(root / runs[5].uuid, root / wrong)
    broken[wrong] = "id.json says uuid"
    # a directory that is not named like a run, and a valid run the index lacks,
    # sorted after every broken one: the pass must reach it
    (root / "notes").mkdir()
    late = None
    for lr in [x / 100 for x in range(70, 200)]:
        candidate = get("optimize", {"lr": lr})
        if candidate.uuid > max(broken):
            late = candidate
            break
    assert late is not None
    with Index(tmp_path / "other.sqlite"):
        get("optimize", late.config.model_dump()).launch()
    assert Index.get().status(late.uuid) is None

    report = verify(Index.get(), repair=True)
    for name, needle in broken.items():
        found = finding(report, str(root / name), "invalid record")
        assert needle in found.detail, (name, found.detail)
        assert not found.repaired
    stray = finding(report, str(root / "notes"), "stray directory")
    assert "uuid" in stray.detail
    assert finding(report, late.uuid, "not indexed").repaired
    assert report.checked == 8
    assert Index.get().status(late.uuid) == "finished"
    # rows of runs whose headers broke are kept: the index may hold their only readable config
    assert all(Index.get().status(run.uuid) == "finished" for run in runs)

    result = invoke("verify", code=1)
    assert "7 problem(s), 0 repaired, 7 left" in result.stdout
    for name in broken:
        assert str(root / name) in result.stdout


def test_rows_whose_directory_is_gone(project: Path, tmp_path: Path) -> None:
    store = store_at(tmp_path)
    only_here = launch(0.1)
    also_stored = launch(0.2)
    kept = launch(0.3)
    also_stored.push(store)
    root = storage(project)
    shutil.rmtree(root / only_here.uuid)
    shutil.rmtree(root / also_stored.uuid)

    report = verify(Index.get())
    for run in (only_here, also_stored):
        found = finding(report, run.uuid, "directory missing")
        assert str(root / run.uuid) in found.detail and not found.repaired
    assert kinds(report) == {only_here.uuid: ["directory missing"], also_stored.uuid: ["directory missing"]}
    assert Index.get().status(only_here.uuid) == "finished"

    result = invoke("verify", "--repair")
    assert result.stdout.count("directory missing") == 2 and "2 repaired, 0 left" in result.stdout
    # gone everywhere: the row is dropped; a present store copy keeps the row
    assert Index.get().status(only_here.uuid) is None
    record = Index.get().find(also_stored.uuid)
    assert record is not None and record.status == "finished" and record.directories == ()
    assert Index.get().find(kept.uuid).directories == (str(root / kept.uuid),)
    invoke("verify")
    # and the stored run comes back from its store
    again = get("optimize", {"lr": 0.2})
    again.fetch()
    assert again.loss() == pytest.approx(1 / (1 + 0.2 * 100))
    assert verify(Index.get()).findings == []


def test_a_store_copy_that_is_not_present_does_not_keep_a_row(project: Path, tmp_path: Path) -> None:
    store = store_at(tmp_path)
    run = launch(0.4)
    run.push(store)
    shutil.rmtree(tmp_path / "store" / run.uuid)  # the store lost it
    with pytest.raises(EvictionRefused):
        run.evict(max_age=timedelta(0))  # re-verifies: the index now says "missing"
    assert [c.state for c in run.availability()[1:]] == ["missing"]
    shutil.rmtree(storage(project) / run.uuid)
    report = verify(Index.get(), repair=True)
    assert finding(report, run.uuid, "directory missing").repaired
    assert Index.get().status(run.uuid) is None


def _dead_run(project: Path):
    write_module(project, "dies", DIES)
    result = run_python("from machinable import get\nget('dies').launch()\n", project, check=False)
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stderr)
    return get("dies")


def test_a_dead_run_is_recognised_and_a_running_one_is_not(project: Path) -> None:
    dead = _dead_run(project)
    directory = storage(project) / dead.uuid
    assert (directory / "started_at").exists() and not (directory / "finished_at").exists()
    assert dead.status() == "stale"

    write_module(project, "holds", HOLDS)
    holder = subprocess.Popen(
        [sys.executable, "-c", "from machinable import get\nget('holds').launch()\n"],
        cwd=project,
        env=dict(os.environ),
    )
    try:
        deadline = time.time() + 60
        while not (project / "holding.txt").exists():
            assert holder.poll() is None and time.time() < deadline
            time.sleep(0.02)
        running = get("holds")
        report = verify(Index.get())
        found = finding(report, dead.uuid, "dead run")
        assert "relaunch" in found.detail and not found.repaired
        assert "dead run" not in kinds(report).get(running.uuid, [])
    finally:
        (project / "release.txt").write_text("")
        assert holder.wait(timeout=60) == 0

    # repair indexes the dead run (status "started") but cannot make it finished
    repaired = verify(Index.get(), repair=True)
    assert not finding(repaired, dead.uuid, "dead run").repaired
    assert Index.get().status(dead.uuid) == "started"
    result = invoke("verify", "--repair", code=1)
    assert f"dead run: {dead.uuid}" in result.stdout and "NOT repaired" in result.stdout
    # relaunching is the fix
    write_module(project, "dies", "from machinable import Interface\n\nclass Dies(Interface):\n    pass\n")
    run_python("from machinable import get\nget('dies').launch()\n", project)
    invoke("verify")


def test_checksums_against_the_store_manifest(project: Path, tmp_path: Path) -> None:
    store = store_at(tmp_path)
    changed, lost, intact, unpushed = (launch(lr) for lr in (0.1, 0.2, 0.3, 0.4))
    for run in (changed, lost, intact):
        run.push(store)
    root = storage(project)
    (root / changed.uuid / "result.json").write_text('{"loss": 0.0}')
    (root / lost.uuid / "result.json").unlink()

    assert verify(Index.get()).findings == []  # without checksums no file is read
    report = verify(Index.get(), checksums=True)
    content = finding(report, changed.uuid, "content changed")
    assert "result.json" in content.detail and store.uri in content.detail
    missing = finding(report, lost.uuid, "file missing")
    assert "result.json" in missing.detail
    assert kinds(report) == {changed.uuid: ["content changed"], lost.uuid: ["file missing"]}
    assert report.unchecked == [unpushed.uuid]  # nothing to compare with: not a problem
    assert not report.ok

    result = invoke("verify", "--checksums", "--repair", code=1)
    assert "content changed" in result.stdout and "file missing" in result.stdout
    assert "2 left" in result.stdout and "1 run(s) have no verified store copy" in result.stdout

    # restore the files from the verified copy: clean again, and the unpushed run only counted
    shutil.copy(tmp_path / "store" / changed.uuid / "result.json", root / changed.uuid / "result.json")
    shutil.copy(tmp_path / "store" / lost.uuid / "result.json", root / lost.uuid / "result.json")
    result = invoke("verify", "--checksums")
    assert "0 problem(s)" in result.stdout and "1 run(s) have no verified store copy" in result.stdout


def test_repair_says_what_it_changed_and_a_second_pass_is_clean(project: Path, tmp_path: Path) -> None:
    store = store_at(tmp_path)
    gone, stored, stale_run = launch(0.1), launch(0.2), launch(0.3)
    stored.push(store)
    root = storage(project)
    shutil.rmtree(root / gone.uuid)
    shutil.rmtree(root / stored.uuid)
    Index.get().drop_location(stale_run.uuid, root / stale_run.uuid)  # location row lost
    with Index(tmp_path / "other.sqlite"):
        from machinable import Storage

        with Storage(tmp_path / "elsewhere"):
            foreign = launch(0.9)
    copy_record(tmp_path / "elsewhere" / foreign.uuid, root)

    first = invoke("verify", code=1)
    assert "4 problem(s), 0 repaired, 4 left" in first.stdout
    result = invoke("verify", "--repair")
    lines = result.stdout.splitlines()
    for text in (
        f"directory missing: {gone.uuid}",
        f"directory missing: {stored.uuid}",
        f"location missing: {stale_run.uuid}",
        f"not indexed: {foreign.uuid}",
    ):
        assert any(line.startswith(text) and line.endswith("[repaired]") for line in lines), (text, lines)
    assert "4 problem(s), 4 repaired, 0 left" in result.stdout
    second = invoke("verify")
    assert "0 problem(s)" in second.stdout
    assert Index.get().find(stale_run.uuid).directories == (str(root / stale_run.uuid),)


def test_an_interrupted_pass_resumes_after_its_checkpoint(project: Path) -> None:
    root = storage(project)
    names = sorted(write_records(root, 300))
    Index.get().reindex()
    # Problems the pass must find: a gone directory (reported only after the walk) and,
    # after the checkpoint, a directory the index does not hold.
    gone = names[10]
    shutil.rmtree(root / gone)
    corrupt = names[5]  # found by the killed pass, before its checkpoint
    (root / corrupt / "id.json").write_text("{")
    start = next(i for i in range(300, 400) if compute_uuid("bulk", "trivial", {"i": i}, {}) > names[200])
    [extra] = write_records(root, 1, start=start)
    killed = run_python(
        """
        import os, signal
        import machinable.operations.verify as v
        from machinable import Index

        v.CHECKPOINT_EVERY = 25
        original_batch, original_write = v._check_batch, v.atomic_write
        log = open("checked.log", "w")
        writes = []

        def batch(index, root, names, *args):
            result = original_batch(index, root, names, *args)
            log.write("".join(n + "\\n" for n in names))
            log.flush()
            return result

        def write(path, data):
            original_write(path, data)
            if path.name == v.CHECKPOINT:
                writes.append(data)
                if len(writes) == 3:
                    os.kill(os.getpid(), signal.SIGKILL)

        v._check_batch, v.atomic_write = batch, write
        v.verify(Index.get())
        """,
        project,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)
    checkpoint = root / verifier.CHECKPOINT
    assert checkpoint.is_file()
    last = json.loads(checkpoint.read_text())["last"]
    walk = sorted([*names, extra])
    walk.remove(gone)
    assert last in walk and names[40] < last < names[200]
    checked_before = set((project / "checked.log").read_text().split())
    # the checkpoint never claims a directory the killed pass had not checked
    assert {n for n in walk if n <= last} <= checked_before

    report = verify(Index.get(), resume=True)
    assert report.resumed_after == last
    assert report.checked == len(walk)  # the killed pass's count is carried over
    assert kinds(report) == {
        str(root / corrupt): ["invalid record"],
        extra: ["not indexed"],
        gone: ["directory missing"],
    }
    assert not checkpoint.exists()  # a finished pass removes it

    # the CLI says it resumed; without a checkpoint --resume is a whole pass
    checkpoint.write_text(json.dumps({"last": last}))
    result = invoke("verify", "--resume", code=1)
    assert f"resumed after {last}" in result.stdout
    whole = verify(Index.get(), resume=True)
    assert whole.resumed_after is None and whole.checked == len(walk)


def test_verify_cli_bad_input(project: Path, tmp_path: Path) -> None:
    launch(0.1)
    missing = tmp_path / "no-such-storage"
    assert_one_line_error(invoke("verify", str(missing), code=1), str(missing))
    assert not missing.exists()
    afile = tmp_path / "a-file"
    afile.write_text("x")
    assert_one_line_error(invoke("verify", str(afile), code=1), str(afile))
    usage = invoke("verify", "--bogus", code=2)
    assert "Error: No such option '--bogus'" in usage.stderr and "Traceback" not in usage.stderr
    assert_one_line_error(invoke("gc", str(missing), code=1), str(missing))
    # an explicit storage that does hold runs works
    assert "checked 1 run directories" in invoke("verify", str(storage(project))).stdout


# --------------------------------------------------------------------------- gc


def test_gc_dry_run_lists_and_yes_deletes_only_what_nothing_needs(project: Path, tmp_path: Path) -> None:
    write_module(project, "fails", FAILS)
    store = store_at(tmp_path)
    store_root = tmp_path / "store"
    root = storage(project)
    index = Index.get()

    kept = launch(0.1)  # finished, only here
    stored = launch(0.2)  # finished, here and in the store
    stored.push(store)
    evicted = launch(0.3)  # finished, its only (last verified) copy is in the store
    evicted.push(store)
    evicted.evict()
    lost_copy = launch(0.4)  # the store lost its copy: its availability row says "missing"
    lost_copy.push(store)
    shutil.rmtree(store_root / lost_copy.uuid)
    with pytest.raises(EvictionRefused):
        lost_copy.evict(max_age=timedelta(0))
    orphan = launch(0.5)  # a row with no copy anywhere
    shutil.rmtree(root / orphan.uuid)
    index.drop_location(orphan.uuid, root / orphan.uuid)
    (project / "fail.flag").write_text("")
    failed = get("fails", {"n": 1})
    with pytest.raises(RuntimeError):
        failed.launch()
    (project / "fail.flag").unlink()

    old_temp = root / kept.uuid / f".result.json.{os.getpid()}.0123abcd.tmp"
    young_temp = root / kept.uuid / f".result.json.{os.getpid()}.89abcdef.tmp"
    not_temp = root / kept.uuid / ".notes.tmp"
    for path in (old_temp, young_temp, not_temp):
        path.write_text("half")
    age(old_temp, collector.MIN_AGE_SECONDS + 60)
    age(not_temp, collector.MIN_AGE_SECONDS + 60)
    old_partial = root / f".{evicted.uuid}.partial-0a1b2c3d4e5f"
    young_partial = root / f".{orphan.uuid}.partial-ffeeddccbbaa"
    for path in (old_partial, young_partial):
        path.mkdir()
        (path / "id.json").write_text("{}")
    age(old_partial, collector.MIN_AGE_SECONDS + 60)
    stale_lock = root / LOCKS_DIR / f"{orphan.uuid}.lock"
    live_lock = root / LOCKS_DIR / f"{kept.uuid}.lock"
    assert stale_lock.exists() and live_lock.exists()
    incomplete = store_root / kept.uuid  # an interrupted push: files, no manifest
    shutil.copytree(root / kept.uuid, incomplete, ignore=shutil.ignore_patterns(".*.tmp"))
    assert not (incomplete / MANIFEST_NAME).exists()

    # the dry run lists every kind and changes nothing
    files_before, rows_before = snapshot(tmp_path), index_tables()
    dry = invoke("gc", "--stores", "--failed")
    expected = {
        ("orphan row", orphan.uuid),
        ("missing copy", lost_copy.uuid),
        ("temporary file", str(old_temp)),
        ("half-fetched directory", str(old_partial)),
        ("stale lock", str(stale_lock)),
        ("stale lock", str(root / LOCKS_DIR / f"{evicted.uuid}.lock")),
        ("incomplete store copy", f"{store.uri}/{kept.uuid}"),
        ("failed run", failed.uuid),
    }
    for kind, target in expected:
        assert f"would delete {kind}: {target}" in dry.stdout, (kind, target, dry.stdout)
    assert f"{len(expected)} item(s) would delete" in dry.stdout
    for never in (kept, stored, evicted):
        assert never.uuid not in {i.target for i in collector.collect(index, stores=True, failed=True)}
    for spared in (young_temp, not_temp, young_partial, live_lock, stale_lock.parent / f"{stored.uuid}.lock"):
        assert str(spared) not in dry.stdout
    assert snapshot(tmp_path) == files_before
    assert index_tables() == rows_before
    # without --stores and --failed those kinds are not even listed
    plain = {item.kind for item in collector.collect(index)}
    assert plain == {"orphan row", "missing copy", "temporary file", "half-fetched directory", "stale lock"}

    result = invoke("gc", "--yes", "--stores", "--failed")
    for kind, target in expected:
        assert f"deleted {kind}: {target}" in result.stdout, (kind, target, result.stdout)
    assert f"{len(expected)} item(s) deleted" in result.stdout
    assert index.status(orphan.uuid) is None
    assert [c.state for c in lost_copy.availability()[1:]] == []
    assert not old_temp.exists() and not old_partial.exists() and not stale_lock.exists()
    assert young_temp.exists() and not_temp.exists() and young_partial.exists() and live_lock.exists()
    assert not incomplete.exists()
    assert index.status(failed.uuid) is None and not (root / failed.uuid).exists()

    # every finished run is still loadable, and every present store copy still verifies
    finished = list(index.runs(where={"status": "finished"}))
    assert {r.uuid for r in finished} == {kept.uuid, stored.uuid, evicted.uuid, lost_copy.uuid}
    for record in finished:
        run = get(record.module, record.config)
        assert run.uuid == record.uuid
        if not run.is_mounted():
            run.fetch()
        assert run.loss() == pytest.approx(1 / (1 + record.config["lr"] * 100))
    for uuid in (stored.uuid, evicted.uuid):
        assert store.verify(uuid).state == "present"
    assert collector.collect(index, stores=True, failed=True) == []
    assert invoke("gc", "--yes", "--stores", "--failed").stdout.strip() == "0 item(s) deleted"
    assert verify(Index.get(), checksums=True).ok


def test_gc_never_deletes_the_last_verified_copy(project: Path, tmp_path: Path) -> None:
    store = store_at(tmp_path)
    store_root = tmp_path / "store"
    only_in_store = launch(0.1)
    only_in_store.push(store)
    only_in_store.evict()
    # its manifest vanished: the index still calls it present, so it is not "incomplete"
    unsure = launch(0.2)
    unsure.push(store)
    unsure.evict()
    (store_root / unsure.uuid / MANIFEST_NAME).unlink()
    here = launch(0.3)
    # a complete copy another machine pushed: this index has no availability row for it
    with Index(tmp_path / "other.sqlite"):
        from machinable import Storage

        with Storage(tmp_path / "elsewhere"):
            foreign = launch(0.4)
            foreign.push(store_at(tmp_path))
    assert Index.get().status(foreign.uuid) is None

    found = collector.collect(Index.get(), stores=True, failed=True)
    # (the launch locks of evicted runs are garbage: their directories are gone)
    targets = {item.target for item in found if item.kind != "stale lock"}
    for run in (only_in_store, unsure, here, foreign):
        assert not any(run.uuid in target for target in targets), (run.uuid, [str(i) for i in found])
    collector.run(found)
    assert (store_root / only_in_store.uuid / MANIFEST_NAME).exists()
    assert (store_root / unsure.uuid / "result.json").exists()
    assert store.verify(only_in_store.uuid).state == "present"
    assert store.verify(foreign.uuid).state == "present"
    assert all(Index.get().status(r.uuid) == "finished" for r in (only_in_store, unsure, here))
    assert get("optimize", {"lr": 0.1}).fetch().is_dir()


def test_gc_rechecks_before_deleting(project: Path, tmp_path: Path) -> None:
    """What changed between the listing and the deletion is kept."""
    write_module(project, "fails", FAILS)
    (project / "fail.flag").write_text("")
    failed = get("fails", {"n": 2})
    with pytest.raises(RuntimeError):
        failed.launch()
    orphan = launch(0.5)
    directory = storage(project) / orphan.uuid
    shutil.copytree(directory, tmp_path / "backup")
    shutil.rmtree(directory)
    Index.get().drop_location(orphan.uuid, directory)
    found = collector.collect(Index.get(), failed=True)
    assert {(i.kind, i.target) for i in found} >= {
        ("failed run", failed.uuid),
        ("orphan row", orphan.uuid),
        ("stale lock", str(storage(project) / LOCKS_DIR / f"{orphan.uuid}.lock")),
    }

    # meanwhile the failed run is relaunched and finishes, and the orphan's directory
    # is restored from a backup and indexed again
    (project / "fail.flag").unlink()
    get("fails", {"n": 2}).launch()
    shutil.copytree(tmp_path / "backup", directory)
    Index.get().ingest_directory(directory)
    collector.run(found)
    # each item says it was kept, and why; none claims a deletion
    outcome = {(i.kind, i.target): i for i in found}
    for key in (("failed run", failed.uuid), ("orphan row", orphan.uuid)):
        assert not outcome[key].deleted and str(outcome[key]).startswith(f"kept {key[0]}: "), str(outcome[key])
    assert "relaunched since the listing" in str(outcome[("failed run", failed.uuid)])
    assert (storage(project) / LOCKS_DIR / f"{orphan.uuid}.lock").exists()
    assert Index.get().status(failed.uuid) == "finished"
    assert get("fails", {"n": 2}).load_file("result.json") == {"n": 2}
    assert Index.get().status(orphan.uuid) == "finished"
    assert get("optimize", {"lr": 0.5}).loss() == pytest.approx(1 / (1 + 0.5 * 100))
    assert verify(Index.get()).ok


def test_cli_exit_codes(project: Path) -> None:
    launch(0.1)
    assert invoke("verify").exit_code == 0
    shutil.rmtree(storage(project) / get("optimize", {"lr": 0.1}).uuid)
    invoke("verify", code=1)
    invoke("verify", "--repair", code=0)
    invoke("verify", code=0)
    assert invoke("gc").exit_code == 0
    help_text = invoke("gc", "--help").stdout
    assert "--yes" in help_text and "--stores" in help_text and "--failed" in help_text


def test_a_reindex_killed_between_batches_is_reported_and_completed(project: Path) -> None:
    """A reindex into an empty index loads the leaves without their search index (and,
    on PostgreSQL, the foreign keys unchecked) and finishes both after its last batch.
    Killed between two batches, verify says so, and --repair finishes the job."""
    for lr in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7):
        launch(lr)
    index = Index.get()
    with index.engine.begin() as conn:
        for table in ("locations", "leaves", "runs"):
            conn.exec_driver_sql(f"DELETE FROM {table}")
    killed = run_python(
        """
        import machinable.catalog.index as catalog_index
        from machinable import Index
        catalog_index.WRITE_BATCH = 3
        Index.get().reindex()
        """,
        project,
        env={"MACHINABLE_TEST_KILL_AT": "reindex-batch:1"},
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    undone = index.unfinished_bulk_load()
    assert any("ix_leaves_path_kind_number_text is missing" in item for item in undone), undone
    if index.dialect == "postgresql":  # put back NOT VALID after the batch, checked after the last
        assert any("foreign key" in item and "not validated" in item for item in undone), undone
    report = verify(index)
    unfinished = [f for f in report.findings if f.kind == "unfinished reindex"]
    assert unfinished and not report.ok and not any(f.repaired for f in unfinished)
    assert "unfinished reindex" in invoke("verify", code=1).stdout
    repaired = verify(index, repair=True)
    assert all(f.repaired for f in repaired.findings if f.kind == "unfinished reindex")
    assert index.unfinished_bulk_load() == []
    assert verify(index).ok
    assert [r.config["lr"] for r in index.search("config.lr > 0.25", order_by="config.lr")] == [0.3, 0.4, 0.5, 0.6, 0.7]
