"""Issue 10: files from elsewhere are data, never code, and never a trap.

Each test here reproduces one finding of the issue (a symlinked lock file, a FIFO
header, a collaborator's pickle, an endless download, a leaked password, a reindex of
a vanished storage, a symlinked run directory, a read-only index) and asserts what a
user sees now: one clear error or a listed skip, and nothing outside the record
changed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from machinable import Index, get
from machinable.errors import LockTimeout, UnsafeFileError
from machinable.locks import FileLock, is_held
from machinable.record import LOCKS_DIR

from conftest import REPO, calls, invoke, one_line_error

VICTIM_TEXT = "precious data that no lock may truncate\n"


def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_text(VICTIM_TEXT)
    return path


# --------------------------------------------------------------------------- finding 3


def test_a_symlinked_launch_lock_is_refused_and_its_target_kept(sqlite_project: Path, tmp_path: Path) -> None:
    target = victim(tmp_path)
    run = get("optimize", {"lr": 0.3})
    locks = sqlite_project / "storage" / LOCKS_DIR
    locks.mkdir(parents=True)
    (locks / f"{run.uuid}.lock").symlink_to(target)
    with pytest.raises(UnsafeFileError, match="symbolic link"):
        run.launch()
    assert target.read_text() == VICTIM_TEXT
    assert calls(sqlite_project) == []
    # status() of a started run looks at the same lock: refused too, nothing truncated
    # (the launch took the lock before writing anything, so the directory is made here)
    run.local_directory().mkdir(parents=True, exist_ok=True)
    (run.local_directory() / "started_at").write_text("2026-01-01T00:00:00+00:00")
    with pytest.raises(UnsafeFileError):
        run.status()
    assert target.read_text() == VICTIM_TEXT


def test_a_symlinked_locks_directory_is_refused(sqlite_project: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (sqlite_project / "storage").mkdir()
    (sqlite_project / "storage" / LOCKS_DIR).symlink_to(elsewhere)
    with pytest.raises(UnsafeFileError, match="not a directory"):
        get("optimize", {"lr": 0.3}).launch()
    assert list(elsewhere.iterdir()) == []
    assert calls(sqlite_project) == []


def test_a_symlinked_migration_lock_beside_the_index_is_refused(tmp_path: Path) -> None:
    target = victim(tmp_path)
    index_file = tmp_path / "fresh.sqlite"
    Path(f"{index_file}.lock").symlink_to(target)
    with pytest.raises(UnsafeFileError):
        Index(index_file).count()
    assert target.read_text() == VICTIM_TEXT


def test_the_lock_opener_refuses_links_fifos_and_devices(tmp_path: Path) -> None:
    target = victim(tmp_path)
    link = tmp_path / "link.lock"
    link.symlink_to(target)
    with pytest.raises(UnsafeFileError, match="symbolic link"):
        FileLock(link).acquire()
    fifo = tmp_path / "fifo.lock"
    os.mkfifo(fifo)
    with pytest.raises(UnsafeFileError, match="FIFO"):  # refused at once, never blocks
        FileLock(fifo, timeout=0).acquire()
    dev = tmp_path / "zero.lock"
    dev.symlink_to("/dev/zero")
    with pytest.raises(UnsafeFileError):
        FileLock(dev).acquire()
    assert target.read_text() == VICTIM_TEXT


def test_the_lock_excludes_other_holders_and_interoperates_with_filelock(tmp_path: Path) -> None:
    """Our lock is the flock that filelock takes too: each sees the other's hold."""
    import filelock

    path = tmp_path / "run.lock"
    with FileLock(path):
        assert is_held(path)
        with pytest.raises(LockTimeout):
            FileLock(path, timeout=0.1).acquire()
        with pytest.raises(filelock.Timeout):
            filelock.FileLock(str(path), timeout=0).acquire()
    assert not is_held(path)
    other = filelock.FileLock(str(path), timeout=0)
    other.acquire()
    try:
        assert is_held(path)
    finally:
        other.release()


def test_launches_and_status_never_go_through_filelock(sqlite_project: Path, tmp_path: Path) -> None:
    """filelock 3.12.0 (the lowest our pin allows) truncates a linked lock file: machinable
    must not rely on any version of it. With filelock unimportable, launch, status and
    a fresh index still work, and a linked lock is refused."""
    target = victim(tmp_path)
    code = f"""
        import sys
        sys.modules["filelock"] = None  # any import of it fails
        from pathlib import Path
        from machinable import get
        from machinable.errors import UnsafeFileError
        run = get("optimize", {{"lr": 0.2}}).launch()
        assert run.status() == "finished"
        other = get("optimize", {{"lr": 0.4}})
        lock = Path("storage/.locks") / (other.uuid + ".lock")
        lock.symlink_to({str(target)!r})
        try:
            other.launch()
        except UnsafeFileError as exc:
            print("refused:", exc)
        else:
            raise SystemExit("a linked lock was followed")
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=sqlite_project,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    assert "refused:" in result.stdout
    assert target.read_text() == VICTIM_TEXT


# --------------------------------------------------------------------------- finding 6


def _launched(project: Path, lr: float = 0.3):  # type: ignore[no-untyped-def]
    run = get("optimize", {"lr": lr}).launch()
    return run, run.local_directory()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["id.json", "model.json", "finished_at"])
def test_a_fifo_header_or_marker_never_hangs_reindex_or_ingest(sqlite_project: Path, name: str) -> None:
    from machinable.errors import RecordError

    run, directory = _launched(sqlite_project)
    (directory / name).unlink()
    os.mkfifo(directory / name)
    report = Index.get().reindex(full=True)
    if name == "finished_at":  # a FIFO is no marker: the run reads as started, not hung
        assert report.skipped == []
        assert Index.get().status(run.uuid) == "started"
    else:
        assert [path for path, _ in report.skipped] == [str(directory)]
        assert "FIFO" in report.skipped[0][1]
        with pytest.raises(RecordError, match="FIFO"):
            Index.get().ingest_directory(directory)


@pytest.mark.timeout(60)
def test_a_header_linked_to_dev_zero_or_oversized_is_skipped_not_read(sqlite_project: Path) -> None:
    from machinable.record import MAX_HEADER_BYTES

    first, linked = _launched(sqlite_project, 0.3)
    second, huge = _launched(sqlite_project, 0.4)
    (linked / "model.json").unlink()
    (linked / "model.json").symlink_to("/dev/zero")
    with open(huge / "model.json", "ab") as handle:
        handle.write(b" " * (MAX_HEADER_BYTES + 1))
    report = Index.get().reindex(full=True)
    reasons = dict(report.skipped)
    assert "symbolic link" in reasons[str(linked)]
    assert "larger than" in reasons[str(huge)]


@pytest.mark.timeout(60)
def test_load_file_of_a_fifo_is_an_error_not_a_hang(sqlite_project: Path) -> None:
    run, directory = _launched(sqlite_project)
    (directory / "result.json").unlink()
    os.mkfifo(directory / "result.json")
    with pytest.raises(UnsafeFileError, match="FIFO"):
        run.load_file("result.json")
    assert run.load_file("missing.json", "fallback") == "fallback"


# --------------------------------------------------------------------------- finding 5



def _evil_pickle(marker: Path) -> bytes:
    """A pickle that runs ``touch marker`` when loaded (built without importing it)."""
    import pickle

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, (f"touch {marker}",))

    return pickle.dumps(Evil())


def test_a_collaborators_pickle_is_not_unpickled_without_opt_in(sqlite_project: Path, tmp_path: Path) -> None:
    from machinable.errors import PickleRefused

    run, directory = _launched(sqlite_project)
    marker = tmp_path / "code-ran"
    (directory / "obj.p").write_bytes(_evil_pickle(marker))
    with pytest.raises(PickleRefused, match="allow_pickle=True"):
        run.load_file("obj.p")
    assert not marker.exists()
    run.load_file("obj.p", allow_pickle=True)  # the caller trusts it: their call
    assert marker.exists()


def test_own_pickles_load_and_someone_elses_key_does_not_count(
    sqlite_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pickle

    from machinable.errors import PickleRefused
    from machinable.settings import key_file

    run, directory = _launched(sqlite_project)
    run.save_file("state.p", {"weights": [1, 2, 3]})
    assert run.load_file("state.p") == {"weights": [1, 2, 3]}
    assert pickle.loads((directory / "state.p").read_bytes()) == {"weights": [1, 2, 3]}
    key = key_file()
    assert key.stat().st_mode & 0o777 == 0o600
    assert sqlite_project not in key.parents
    # A collaborator signs with their own key: not this user's, so refused here.
    monkeypatch.setenv("MACHINABLE_KEY_FILE", str(tmp_path / "collaborator.key"))
    run.save_file("theirs.p", {"x": 1})
    monkeypatch.setenv("MACHINABLE_KEY_FILE", str(key))
    with pytest.raises(PickleRefused):
        run.load_file("theirs.p")
    # Tampering with a signed pickle breaks the signature.
    raw = bytearray((directory / "state.p").read_bytes())
    raw[raw.index(b"weights")] = ord("W")
    (directory / "state.p").write_bytes(bytes(raw))
    with pytest.raises(PickleRefused):
        run.load_file("state.p")


# --------------------------------------------------------------------------- finding 7

MODULE = b'"""A shareable module."""\nVALUE = 42\n'


def test_a_remote_body_over_the_size_limit_is_refused(tmp_path: Path, http_server, monkeypatch) -> None:
    from machinable.errors import RemoteError
    from machinable.remotes import fetch_remote, remote_path

    monkeypatch.setenv("MACHINABLE_REMOTE_MAX_BYTES", "4096")
    declared = http_server.add("/big.py", b"#" * 100_000)
    undeclared = http_server.add("/stream.py", b"#" * 100_000, length=False)
    for name, url in (("big", declared), ("stream", undeclared)):
        with pytest.raises(RemoteError, match="at most 4096 bytes"):
            fetch_remote(tmp_path, name, f"url+{url}")
        assert not remote_path(tmp_path, name).exists()
    # the limit is a setting and a keyword: a larger one lets the module through
    assert fetch_remote(tmp_path, "big", f"url+{declared}", max_bytes=200_000).fetched


@pytest.mark.timeout(60)
def test_a_dripping_remote_body_ends_at_the_total_deadline(tmp_path: Path, http_server, monkeypatch) -> None:
    import time

    from machinable.errors import RemoteError
    from machinable.remotes import fetch_remote, remote_path

    url = http_server.add("/drip.py", MODULE, drip=0.2)  # every read comes well within the timeout
    monkeypatch.setenv("MACHINABLE_REMOTE_DEADLINE", "1.5")
    started = time.monotonic()
    with pytest.raises(RemoteError, match="did not finish within 1.5s"):
        fetch_remote(tmp_path, "drip", f"url+{url}", timeout=5)
    assert time.monotonic() - started < 5
    assert not remote_path(tmp_path, "drip").exists()


def test_the_remote_limits_are_documented() -> None:
    readme = (REPO / "README.md").read_text()
    for setting in ("MACHINABLE_REMOTE_MAX_BYTES", "MACHINABLE_REMOTE_DEADLINE", "MACHINABLE_REMOTE_TIMEOUT"):
        assert setting in readme


# --------------------------------------------------------------------------- finding 8

SECRET = "hunter2secret"


def _with_credentials(url: str) -> str:
    return url.replace("http://", f"http://alice:{SECRET}@", 1)


def _provider(project: Path, remotes: dict[str, str]) -> None:
    from conftest import write_module

    write_module(
        project,
        "interface.project",
        f"""
        from machinable import Project


        class Study(Project):
            def on_resolve_remotes(self):
                return {remotes!r}
        """,
    )


def test_credentials_never_reach_the_lock_file_or_fetch_output(sqlite_project: Path, http_server) -> None:
    from machinable.remotes import lock_path

    from conftest import invoke

    url = _with_credentials(http_server.add("/mod.py", MODULE))
    _provider(sqlite_project, {"shared": f"url+{url}"})
    result = invoke("fetch")
    assert "fetched shared" in result.stdout
    assert SECRET not in result.stdout + result.stderr
    assert "alice:***@" in result.stdout
    assert SECRET not in lock_path(sqlite_project).read_text()
    checked = invoke("fetch", "--check")  # the redacted lock still matches the declaration
    assert SECRET not in checked.stdout + checked.stderr
    # importing through get() uses the cached module and leaks nothing either
    assert SECRET not in lock_path(sqlite_project).read_text()


def test_an_old_lock_file_holding_a_credential_is_cleaned(sqlite_project: Path, http_server) -> None:
    import json

    from machinable.remotes import lock_path

    from conftest import invoke

    url = _with_credentials(http_server.add("/mod.py", MODULE))
    other = http_server.add("/other.py", MODULE)
    lock = lock_path(sqlite_project)
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"old": {"source": f"url+{url}", "sha256": "0" * 64}}))
    _provider(sqlite_project, {"old": f"url+{url}", "other": f"url+{other}"})
    checked = invoke("fetch", "--check", ok=False)
    assert SECRET not in checked.stdout + checked.stderr
    invoke("fetch", "other")
    assert SECRET not in lock.read_text()


def test_http_401_and_connection_errors_do_not_show_credentials(sqlite_project: Path, http_server) -> None:
    from machinable.errors import RemoteError
    from machinable.remotes import fetch_remote

    from conftest import invoke, one_line_error

    denied = _with_credentials(http_server.add("/private.py", b"denied", status=401))
    with pytest.raises(RemoteError) as info:
        fetch_remote(sqlite_project, "private", f"url+{denied}?token=abc{SECRET}")
    assert "HTTP 401" in str(info.value)
    assert SECRET not in str(info.value) and SECRET not in str(info.value.source)
    gone = _with_credentials(http_server.url("/gone.py"))
    http_server.stop()
    _provider(sqlite_project, {"gone": f"url+{gone}"})
    line = one_line_error(invoke("fetch", "--timeout", "2", ok=False), "failed")
    assert SECRET not in line


def test_an_index_url_password_is_never_shown(sqlite_project: Path) -> None:
    from conftest import invoke, one_line_error

    url = f"postgresql+psycopg://alice:{SECRET}@127.0.0.1:1/nowhere"
    assert SECRET not in repr(Index(url))
    assert "alice:***@" in repr(Index(url))
    line = one_line_error(invoke("--index", url, "ls", ok=False))
    assert SECRET not in line
    bad = one_line_error(invoke("--index", f"postgresql+psycopg://alice:{SECRET}@host:notaport/x", "ls", ok=False))
    assert SECRET not in bad


# --------------------------------------------------------------------------- finding 9


@pytest.mark.parametrize("how", ["moved", "emptied"])
def test_reindex_of_a_vanished_storage_is_refused_unless_allowed(project: Path, tmp_path: Path, how: str) -> None:
    import shutil

    from machinable.errors import ReindexRefused

    runs = [get("optimize", {"lr": lr}).launch() for lr in (0.1, 0.2)]
    storage = project / "storage"
    if how == "moved":
        storage.rename(tmp_path / "moved-away")
    else:
        for run in runs:
            shutil.rmtree(storage / run.uuid)
    with pytest.raises(ReindexRefused, match="2 run directories there; nothing was changed"):
        Index.get().reindex()
    assert Index.get().count() == 2
    line = one_line_error(invoke("reindex", ok=False), "allow-empty")
    assert str(storage) in line
    assert Index.get().count() == 2
    if how == "moved":  # back in place: nothing was lost
        (tmp_path / "moved-away").rename(storage)
        assert Index.get().reindex().indexed == 2
        storage.rename(tmp_path / "moved-away")
    report = invoke("reindex", "--allow-empty")
    assert "2 removed" in report.stdout
    assert Index.get().count() == 0


def test_reindex_of_an_empty_storage_with_an_empty_index_is_fine(project: Path) -> None:
    assert Index.get().reindex().indexed == 0
    assert invoke("reindex").exit_code == 0


# --------------------------------------------------------------------------- finding 10


def test_a_symlinked_run_directory_is_listed_as_skipped_by_reindex(sqlite_project: Path, tmp_path: Path) -> None:
    run, directory = _launched(sqlite_project)
    elsewhere = tmp_path / "elsewhere" / run.uuid
    elsewhere.parent.mkdir()
    directory.rename(elsewhere)
    directory.symlink_to(elsewhere)
    report = Index.get().reindex(full=True)
    assert [path for path, _ in report.skipped] == [str(directory)]
    assert "symbolic link" in report.skipped[0][1]
    assert "symbolic link" in invoke("reindex", "--full").stdout
    assert elsewhere.is_dir() and (elsewhere / "result.json").is_file()


# --------------------------------------------------------------------------- finding 12


@pytest.fixture
def read_only_index(project: Path, index_backend: str, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Make the project's index read-only the way a user meets one: an immutable SQLite
    file (chattr +i, since root ignores permission bits; chmod otherwise), or a
    PostgreSQL connection whose transactions are read-only."""
    from machinable.catalog.engine import dispose_all

    get("optimize", {"lr": 0.1}).launch()  # the index exists and holds a run
    dispose_all()
    if index_backend == "postgresql":
        url = os.environ["MACHINABLE_INDEX"]
        monkeypatch.setenv("MACHINABLE_INDEX", url + "%20-cdefault_transaction_read_only%3Don")
        yield
        return
    path = project / ".machinable.sqlite"
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(path)], check=True)
        try:
            yield
        finally:
            dispose_all()
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0o444)
        yield


def test_a_read_only_index_is_refused_before_computing(project: Path, read_only_index: None) -> None:
    from machinable.errors import IndexError_

    assert Index.get().count() == 1  # reading works
    run = get("optimize", {"lr": 0.7})
    with pytest.raises(IndexError_, match="does not accept writes"):
        run.launch()
    assert calls(project) == [get("optimize", {"lr": 0.1}).uuid]  # nothing was computed
    assert not run.local_directory().exists()
    line = one_line_error(invoke("get", "optimize", "lr=0.9", "--launch", ok=False), "does not accept writes")
    assert "Traceback" not in line
    assert len(calls(project)) == 1


def test_verify_reports_a_symlinked_run_directory(sqlite_project: Path, tmp_path: Path) -> None:
    run, directory = _launched(sqlite_project)
    elsewhere = tmp_path / "elsewhere" / run.uuid
    elsewhere.parent.mkdir()
    directory.rename(elsewhere)
    directory.symlink_to(elsewhere)
    result = invoke("verify", ok=False)
    assert f"symlinked run directory: {directory}" in result.stdout
    assert result.exit_code == 1


def test_verify_and_gc_never_truncate_through_a_linked_lock(sqlite_project: Path, tmp_path: Path) -> None:
    target = victim(tmp_path)
    started, directory = _launched(sqlite_project, 0.3)
    (directory / "finished_at").unlink()  # looks like a run still computing
    Index.get().reindex(full=True)
    lock = sqlite_project / "storage" / LOCKS_DIR / f"{started.uuid}.lock"
    lock.unlink(missing_ok=True)
    lock.symlink_to(target)
    result = invoke("verify", ok=False)
    assert "unsafe lock" in result.stdout
    assert target.read_text() == VICTIM_TEXT
    # a stale lock (its run is gone) that is a link: gc removes the link, not the target
    gone = get("optimize", {"lr": 0.8})
    stale = sqlite_project / "storage" / LOCKS_DIR / f"{gone.uuid}.lock"
    stale.symlink_to(target)
    invoke("gc", "--yes")
    assert not os.path.lexists(stale)
    assert target.read_text() == VICTIM_TEXT
