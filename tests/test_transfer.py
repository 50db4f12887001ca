"""The transfer layer against file://, memory:// and a real S3 API (SeaweedFS)."""

from __future__ import annotations

import io
import json
import os
import secrets
import subprocess
import sys
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pytest

from machinable.errors import StoreError
from machinable.stores.manifest import MANIFEST_NAME, build_manifest, manifest_checksum
from machinable.stores.transfer import (
    RemoteState,
    TransferError,
    TransferResult,
    delete_remote,
    fetch_run,
    fetch_runs,
    list_remote_headers,
    open_store,
    push_runs,
    store_uri,
    verify_remote,
)

from conftest import kill_when

REPO = Path(__file__).resolve().parents[1]


def make_run(storage: Path, *, extra: dict[str, bytes] | None = None, size: int = 300) -> Path:
    """Create a record directory the way the catalog lays one out."""
    uuid = uuidlib.uuid4().hex
    run = storage / uuid
    (run / "data" / "deep").mkdir(parents=True)
    (run / ".machinable").write_text("")
    (run / "id.json").write_text(json.dumps({"format": 1, "uuid": uuid, "module": "m"}))
    (run / "model.json").write_text(json.dumps({"module": "m", "config": {"a": 1}}))
    (run / "started_at").write_text("2024-01-01T00:00:00+00:00")
    (run / "finished_at").write_text("2024-01-01T00:01:00+00:00")
    (run / "data" / "values.bin").write_bytes(os.urandom(size))
    (run / "data" / "deep" / "notes.txt").write_text(f"run {uuid}\n")
    for name, content in (extra or {}).items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(content)
    return run


def tree(directory: Path) -> dict[str, bytes]:
    """Every regular file under a directory, by posix relpath."""
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@dataclass
class Store:
    kind: str
    url: str
    options: dict
    fs: fsspec.AbstractFileSystem
    root: str

    def path(self, uuid: str, rel: str = "") -> str:
        return f"{self.root}/{uuid}/{rel}".rstrip("/")


@pytest.fixture(params=["file", "memory", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    """One store of each kind, fresh for every test."""
    if request.param == "file":
        url, options = (tmp_path / "store").as_uri(), {}
    elif request.param == "memory":
        url, options = f"memory://t-{secrets.token_hex(6)}/runs", {}
    else:
        url, options = request.getfixturevalue("s3_store_url")
    fs, root = open_store(url, **options)
    yield Store(request.param, url, options, fs, root)
    if request.param == "memory":
        fs.rm(root.rsplit("/", 1)[0], recursive=True)


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    path = tmp_path / "storage"
    path.mkdir()
    return path


def push(store: Store, *runs: Path, **kwargs) -> dict[str, TransferResult]:
    return push_runs([(run.name, run) for run in runs], store.fs, store.root, **kwargs)


# -- manifests (no store) ------------------------------------------------------------------


def test_manifest_lists_every_file_with_checksums(storage: Path) -> None:
    run = make_run(storage)
    manifest = build_manifest(run)
    assert list(manifest["files"]) == sorted(manifest["files"])
    assert set(manifest["files"]) == set(tree(run))
    entry = manifest["files"]["data/values.bin"]
    assert entry["size"] == 300 and len(entry["sha256"]) == 64 and len(entry["md5"]) == 32
    assert manifest["checksum"] == manifest_checksum(manifest)
    assert manifest_checksum(manifest) == manifest_checksum(manifest["files"])
    assert manifest["skipped"] == []
    assert build_manifest(run)["checksum"] == manifest["checksum"]
    (run / "updated_at").write_text("later")
    assert build_manifest(run)["checksum"] != manifest["checksum"]


def test_manifest_of_missing_directory_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        build_manifest(tmp_path / "nope")


def test_open_store_and_uri(tmp_path: Path) -> None:
    fs, root = open_store((tmp_path / "s").as_uri() + "/")
    assert root == (tmp_path / "s").as_posix()
    assert store_uri(fs, root) == f"file://{tmp_path.as_posix()}/s"
    fs, root = open_store("memory://bucket/prefix/")
    assert (root, store_uri(fs, root)) == ("/bucket/prefix", "memory:///bucket/prefix")


# -- every store ---------------------------------------------------------------------------


def test_push_then_present_with_matching_checksum(store: Store, storage: Path) -> None:
    runs = [make_run(storage) for _ in range(3)]
    results = push(store, *runs)
    assert set(results) == {run.name for run in runs}
    for run in runs:
        manifest = build_manifest(run)
        result = results[run.name]
        assert result.state == "present" and result.checksum == manifest["digest"]
        assert result.size == sum(e["size"] for e in manifest["files"].values())
        assert result.verified_at is not None and result.verified_at.tzinfo is not None
        state = verify_remote(store.fs, store.root, run.name)
        assert isinstance(state, RemoteState)
        assert (state.state, state.checksum, state.size) == (
            "present",
            result.checksum,
            result.size,
        )
        assert state.problems == [] and state.verified_at is not None
        assert verify_remote(store.fs, store.root, run.name, manifest).state == "present"
        remote = json.loads(store.fs.cat_file(store.path(run.name, MANIFEST_NAME)))
        assert remote["checksum"] == manifest["checksum"] and remote["uuid"] == run.name
    headers = list(list_remote_headers(store.fs, store.root))
    assert [h[0] for h in headers] == sorted(run.name for run in runs)
    assert all(has_manifest and header["uuid"] == uuid for uuid, header, has_manifest in headers)


def test_fetch_back_byte_for_byte(store: Store, storage: Path, tmp_path: Path) -> None:
    extra = {"a/b/c/d.npy": os.urandom(5000), "empty": b"", "odd [1]*?.txt": b"glob chars"}
    runs = [make_run(storage, extra=extra) for _ in range(3)]
    push(store, *runs)
    elsewhere = tmp_path / "elsewhere"
    results = fetch_runs(
        [(run.name, elsewhere / run.name) for run in runs[:2]], store.fs, store.root
    )
    single = fetch_run(store.fs, store.root, runs[2].name, elsewhere / runs[2].name)
    assert single.state == "present" and single.checksum == build_manifest(runs[2])["digest"]
    for run in runs:
        assert tree(elsewhere / run.name) == tree(run)
        assert not (elsewhere / run.name / MANIFEST_NAME).exists()
        assert build_manifest(elsewhere / run.name)["checksum"] == build_manifest(run)["checksum"]
    assert results[runs[0].name].checksum == build_manifest(runs[0])["digest"]
    assert not [p for p in elsewhere.iterdir() if ".partial-" in p.name]
    with pytest.raises(FileExistsError):
        fetch_run(store.fs, store.root, runs[0].name, elsewhere / runs[0].name)
    with pytest.raises(StoreError, match="no complete copy"):
        fetch_run(store.fs, store.root, "0" * 32, elsewhere / ("0" * 32))


def test_symlink_outside_the_run_is_not_followed(
    store: Store, storage: Path, tmp_path: Path
) -> None:
    secret = os.urandom(64).hex().encode()
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "secret.txt").write_bytes(secret)
    (outside / "dir" / "also-secret").write_bytes(secret)
    run = make_run(storage)
    (run / "leak.txt").symlink_to(outside / "secret.txt")
    (run / "data" / "leakdir").symlink_to(outside / "dir", target_is_directory=True)
    (run / "dangling").symlink_to(tmp_path / "does-not-exist")
    (run / "alias.txt").symlink_to(run / "data" / "deep" / "notes.txt")

    manifest = build_manifest(run)
    assert manifest["skipped"] == ["dangling", "data/leakdir", "leak.txt"]
    assert "alias.txt" in manifest["files"]  # a link inside the run is stored as a copy
    push(store, run)
    listed = store.fs.find(store.path(run.name))
    names = {p.rsplit(f"{run.name}/", 1)[1] for p in listed}
    assert "leak.txt" not in names and not any("leakdir" in n for n in names)
    assert all(secret not in store.fs.cat_file(p) for p in listed)
    assert verify_remote(store.fs, store.root, run.name).state == "present"
    dest = tmp_path / "back" / run.name
    fetch_run(store.fs, store.root, run.name, dest)
    assert (dest / "alias.txt").read_bytes() == (run / "data" / "deep" / "notes.txt").read_bytes()
    assert not (dest / "leak.txt").exists()


@pytest.mark.parametrize("damage", ["same-size", "truncated", "deleted", "extra-file"])
def test_remote_damage_after_push_is_partial(store: Store, storage: Path, damage: str) -> None:
    run = make_run(storage)
    push(store, run)
    target = store.path(run.name, "data/values.bin")
    original = (run / "data" / "values.bin").read_bytes()
    if damage == "same-size":
        store.fs.pipe_file(target, bytes([original[0] ^ 0xFF]) + original[1:])
    elif damage == "truncated":
        store.fs.pipe_file(target, original[:100])
    elif damage == "deleted":
        store.fs.rm_file(target)
    else:
        store.fs.pipe_file(store.path(run.name, "data/intruder"), b"x")
    store.fs.invalidate_cache()
    state = verify_remote(store.fs, store.root, run.name)
    assert state.state == "partial" and state.verified_at is None
    assert state.problems and any(("values.bin" in p or "intruder" in p) for p in state.problems)
    # pushing again repairs the copy, even though its manifest claims the right content
    push(store, run)
    assert verify_remote(store.fs, store.root, run.name).state == "present"


def test_fetch_refuses_corrupted_copy_and_leaves_nothing(
    store: Store, storage: Path, tmp_path: Path
) -> None:
    run = make_run(storage)
    push(store, run)
    target = store.path(run.name, "data/deep/notes.txt")
    content = (run / "data" / "deep" / "notes.txt").read_bytes()
    store.fs.pipe_file(target, content.upper())  # same size, different bytes
    dest_parent = tmp_path / "back"
    with pytest.raises(StoreError, match="checksum mismatch"):
        fetch_run(store.fs, store.root, run.name, dest_parent / run.name)
    assert not (dest_parent / run.name).exists()
    assert not [p for p in dest_parent.iterdir() if ".partial-" in p.name]


def test_copy_without_manifest_is_partial_and_push_completes_it(
    store: Store, storage: Path, tmp_path: Path
) -> None:
    run = make_run(storage)
    push(store, run)
    store.fs.rm_file(store.path(run.name, MANIFEST_NAME))
    store.fs.invalidate_cache()
    state = verify_remote(store.fs, store.root, run.name)
    assert state.state == "partial" and "no manifest" in state.problems[0]
    assert verify_remote(store.fs, store.root, run.name, build_manifest(run)).state == "partial"
    assert [h[2] for h in list_remote_headers(store.fs, store.root)] == [False]
    with pytest.raises(StoreError, match="no complete copy"):
        fetch_run(store.fs, store.root, run.name, tmp_path / "back" / run.name)
    assert not (tmp_path / "back" / run.name).exists()
    push(store, run)
    assert verify_remote(store.fs, store.root, run.name).state == "present"


def test_repush_skips_unchanged_runs_and_updates_changed_ones(
    store: Store, storage: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = [make_run(storage, extra={"glob[0]*.txt": b"g"}) for _ in range(3)]
    first = push(store, *runs)
    calls: list[list[str]] = []
    real_put = store.fs.put

    def spy(lpath, rpath, *args, **kwargs):
        calls.append(list(rpath))
        return real_put(lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(store.fs, "put", spy)
    again = push(store, *runs)
    assert calls == []
    assert {u: r.checksum for u, r in again.items()} == {u: r.checksum for u, r in first.items()}

    # a status marker is no part of the digest: the complete copy is kept as it is
    touched = runs[0]
    (touched / "updated_at").write_text("now")
    kept = push(store, touched)
    assert calls == [] and kept[touched.name].checksum == first[touched.name].checksum

    # other content under the same uuid: refused as a conflict, the store unchanged
    changed = runs[1]
    before = {p: store.fs.cat_file(p) for p in store.fs.find(store.path(changed.name))}
    (changed / "data" / "deep" / "notes.txt").unlink()
    (changed / "glob[0]*.txt").unlink()
    with pytest.raises(TransferError) as refused:
        push(store, *runs)
    assert set(refused.value.conflicts) == {changed.name}
    theirs, ours = refused.value.conflicts[changed.name]
    assert theirs == first[changed.name].checksum and ours == build_manifest(changed)["digest"]
    assert set(refused.value.results) == {runs[0].name, runs[2].name}
    assert calls == []
    store.fs.invalidate_cache()
    assert {p: store.fs.cat_file(p) for p in store.fs.find(store.path(changed.name))} == before
    state = verify_remote(store.fs, store.root, changed.name, build_manifest(changed))
    assert state.state == "conflict" and state.checksum == theirs


def test_missing_and_delete(store: Store, storage: Path) -> None:
    run = make_run(storage)
    assert verify_remote(store.fs, store.root, run.name).state == "missing"
    push(store, run)
    delete_remote(store.fs, store.root, run.name)
    assert verify_remote(store.fs, store.root, run.name).state == "missing"
    assert list(list_remote_headers(store.fs, store.root)) == []
    with pytest.raises(FileNotFoundError):
        delete_remote(store.fs, store.root, run.name)
    with pytest.raises(StoreError):
        verify_remote(store.fs, store.root, "../escape")


def test_list_remote_headers_tolerates_junk(store: Store, storage: Path) -> None:
    runs = [make_run(storage) for _ in range(2)]
    push(store, *runs)
    fs, root = store.fs, store.root
    if store.kind == "file":
        fs.makedirs(f"{root}/junkdir/sub", exist_ok=True)
        fs.makedirs(f"{root}/badjson", exist_ok=True)
        fs.makedirs(f"{root}/{'f' * 32}", exist_ok=True)
    fs.pipe_file(f"{root}/junkdir/sub/file", b"x")
    fs.pipe_file(f"{root}/README", b"not a run")
    fs.pipe_file(f"{root}/badjson/id.json", b"{nope")
    fs.pipe_file(f"{root}/{'f' * 32}/id.json", json.dumps({"uuid": "someone-else"}).encode())
    fs.invalidate_cache()
    headers = list(list_remote_headers(fs, root))
    assert [h[0] for h in headers] == sorted(run.name for run in runs)


def test_progress_is_quiet_without_a_terminal(
    store: Store, storage: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    run = make_run(storage)
    push(store, run, progress=True)
    fetch_run(store.fs, store.root, run.name, tmp_path / "back" / run.name, progress=True)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


def test_progress_bar_in_a_terminal(
    storage: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    fs, root = open_store((tmp_path / "store").as_uri())
    run = make_run(storage)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    push_runs([(run.name, run)], fs, root, progress=True)
    fetch_run(fs, root, run.name, tmp_path / "back" / run.name, progress=True)
    assert "push 1 run(s)" in terminal.getvalue() and "fetch 1 run(s)" in terminal.getvalue()


def test_push_without_verify_still_writes_manifest(store: Store, storage: Path) -> None:
    run = make_run(storage)
    result = push(store, run, verify=False)[run.name]
    assert result.verified_at is None and result.state == "present"
    assert verify_remote(store.fs, store.root, run.name).state == "present"


# -- S3 specifics --------------------------------------------------------------------------


def test_s3_verification_compares_etags_without_reading_back(
    s3_store_url: tuple[str, dict],  # noqa: F811
    storage: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fs, root = open_store(s3_store_url[0], **s3_store_url[1])
    run = make_run(storage)
    push_runs([(run.name, run)], fs, root)
    info = fs.info(f"{root}/{run.name}/data/values.bin")
    assert info["ETag"].strip('"') == build_manifest(run)["files"]["data/values.bin"]["md5"]

    def no_reading(*args, **kwargs):
        raise AssertionError("verification should use the ETag, not read the object back")

    monkeypatch.setattr(fs, "open", no_reading)
    assert verify_remote(fs, root, run.name).state == "present"


CHILD = """
import json, sys
from pathlib import Path
from machinable.stores.transfer import fetch_runs, open_store, push_runs
mode, url, options, storage, dest = json.loads(sys.argv[1])
fs, root = open_store(url, **options)
uuids = sorted(p.name for p in Path(storage).iterdir())
if mode == "push":
    push_runs([(u, Path(storage) / u) for u in uuids], fs, root)
else:
    fetch_runs([(u, Path(dest) / u) for u in uuids], fs, root)
print("finished", flush=True)
"""


def spawn(mode: str, url: str, options: dict, storage: Path, dest: Path) -> subprocess.Popen:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    argument = json.dumps([mode, url, options, str(storage), str(dest)])
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, argument],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )



def many_runs(storage: Path, count: int = 150) -> list[Path]:
    """Enough runs (1,050 files) that a bulk transfer takes a while even on a fast machine."""
    return [make_run(storage, size=4096) for _ in range(count)]


def test_interrupted_push_is_never_present_and_a_retry_completes_it(
    s3_server,  # noqa: F811
    s3_store_url,  # noqa: F811
    storage: Path,
    tmp_path: Path,
) -> None:
    url, options = s3_store_url
    runs = many_runs(storage)
    fs, root = open_store(url, **options)
    observer = s3_server.filesystem()
    seen: list[str] = []

    def underway() -> bool:
        observer.invalidate_cache()
        seen[:] = observer.find(root)
        return len(seen) >= 80

    process = spawn("push", url, options, storage, tmp_path)
    kill_when(process, underway, "push")
    assert not any(p.endswith(MANIFEST_NAME) for p in seen)

    fs.invalidate_cache()
    states = {run.name: verify_remote(fs, root, run.name) for run in runs}
    counts = {
        s: sum(1 for st in states.values() if st.state == s)
        for s in ("present", "partial", "missing")
    }
    assert counts["present"] == 0, counts
    assert counts["partial"] > 0, counts
    assert not any(has_manifest for _, _, has_manifest in list_remote_headers(fs, root))
    with pytest.raises(StoreError, match="no complete copy"):
        fetch_run(fs, root, runs[0].name, tmp_path / "back" / runs[0].name)

    uploaded: list[str] = []
    real_put = fs.put

    def spy(lpath, rpath, *args, **kwargs):
        uploaded.extend(rpath)
        return real_put(lpath, rpath, *args, **kwargs)

    fs.put = spy
    try:
        results = push_runs([(run.name, run) for run in runs], fs, root)
    finally:
        del fs.put
    assert len(results) == len(runs) and all(r.state == "present" for r in results.values())
    # what the killed push had landed intact (by ETag) was not sent again
    assert 0 < len(uploaded) < sum(len(build_manifest(run)["files"]) for run in runs)
    headers = list(list_remote_headers(fs, root))
    assert len(headers) == len(runs) and all(has for _, _, has in headers)
    for run in runs[:: len(runs) // 10]:
        state = verify_remote(fs, root, run.name)
        assert state.state == "present" and state.checksum == build_manifest(run)["digest"]


def test_interrupted_fetch_leaves_nothing_and_a_retry_completes_it(
    s3_store_url,  # noqa: F811
    storage: Path,
    tmp_path: Path,
) -> None:
    url, options = s3_store_url
    runs = many_runs(storage)
    fs, root = open_store(url, **options)
    push_runs([(run.name, run) for run in runs], fs, root)
    dest = tmp_path / "dest"
    dest.mkdir()

    def underway() -> bool:
        staged = sum(
            len(files) for partial in dest.glob(".*.partial-*") for _, _, files in os.walk(partial)
        )
        return staged >= 80

    process = spawn("fetch", url, options, storage, dest)
    kill_when(process, underway, "fetch")
    assert [
        p
        for p in dest.iterdir()
        if ".partial-" not in p.name and not p.name.startswith(".machinable")
    ] == []
    assert any(".partial-" in p.name for p in dest.iterdir())

    results = fetch_runs([(run.name, dest / run.name) for run in runs], fs, root)
    assert len(results) == len(runs)
    assert not [p for p in dest.iterdir() if ".partial-" in p.name]
    for run in runs[:: len(runs) // 10]:
        assert tree(dest / run.name) == tree(run)
