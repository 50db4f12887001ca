"""Issue 10: copies bound to their content, and nothing deletes what is not a run.

A run's digest (sha256 of its manifest: every file but the status markers, as sorted
(path, size, sha256)) is recorded in the index and in each store copy's manifest. A
store never has a complete copy replaced by another digest, evict needs a store copy
with the local digest, fetch accepts only the recorded digest, and no command deletes
a directory outside a storage root, without the sentinel, or naming another uuid.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlalchemy import text

from machinable import Index, get

from conftest import invoke, write_module

FAILS = '''
from pydantic import BaseModel
from machinable import Interface


class Fails(Interface):
    class Config(BaseModel):
        n: int = 0

    def __call__(self):
        raise RuntimeError("asked to fail")
'''


def _point_location(uuid: str, directory: Path) -> None:
    with Index.get().engine.begin() as conn:
        conn.execute(
            text("UPDATE locations SET directory = :d WHERE run_uuid = :u"),
            {"d": str(directory), "u": uuid},
        )


def _victim(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    return path


def _failed_run(project: Path):  # type: ignore[no-untyped-def]
    write_module(project, "fails", FAILS)
    run = get("fails", {"n": 1})
    with pytest.raises(RuntimeError):
        run.launch()
    return run


# --------------------------------------------------------------------------- finding 2


@pytest.mark.parametrize("where", ["outside", "no-sentinel", "other-uuid", "symlink"])
def test_gc_never_deletes_what_a_lying_row_points_at(project: Path, tmp_path: Path, where: str) -> None:
    run = _failed_run(project)
    storage = project / "storage"
    real = storage / run.uuid
    if where == "outside":
        victim = _victim(tmp_path / "home" / "thesis")
    elif where == "no-sentinel":
        shutil.rmtree(real)
        victim = _victim(real)
    elif where == "other-uuid":
        other = get("optimize", {"lr": 0.9}).launch()
        shutil.rmtree(real)
        shutil.copytree(storage / other.uuid, real)  # a record, but of another run
        victim = real
    else:
        shutil.rmtree(real)
        target = _victim(tmp_path / "elsewhere")
        real.symlink_to(target)
        victim = target
    if where == "outside":
        _point_location(run.uuid, victim)
    before = sorted(p.name for p in victim.iterdir())
    result = invoke("gc", "--failed", "--yes")
    assert victim.is_dir() and sorted(p.name for p in victim.iterdir()) == before
    if where in ("outside", "no-sentinel"):
        assert "not deleted: refusing" in result.stdout


def test_gc_still_deletes_a_real_failed_run(project: Path) -> None:
    run = _failed_run(project)
    directory = project / "storage" / run.uuid
    assert directory.is_dir()
    invoke("gc", "--failed", "--yes")
    assert not directory.exists()
    assert not [p for p in (project / "storage").iterdir() if p.name.startswith(".trash-")]
    assert Index.get().status(run.uuid) is None


def test_evict_refuses_a_directory_outside_the_storage_root(project: Path, tmp_path: Path) -> None:
    from machinable.errors import MachinableError

    run = get("optimize", {"lr": 0.4}).launch()
    run.push(f"file://{tmp_path / 'store'}")
    backup = tmp_path / "backup" / run.uuid
    shutil.copytree(run.local_directory(), backup)
    shutil.rmtree(run.local_directory())
    Index.get().drop_location(run.uuid, project / "storage" / run.uuid)
    Index.get().ingest_directory(backup)
    assert run.local_directory() == backup
    with pytest.raises(MachinableError, match="storage root"):
        run.evict()
    assert (backup / "result.json").is_file()


# --------------------------------------------------------------------------- finding 1

RANDOM = '''
import os

from pydantic import BaseModel
from machinable import Interface


class Train(Interface):
    class Config(BaseModel):
        lr: float = 0.1

    def __call__(self):
        self.save_file("weights.bin", os.urandom(64).hex())  # non-deterministic training
'''


def _checkout(root: Path) -> Path:
    project = root / "study"
    project.mkdir(parents=True)
    write_module(project, "train", RANDOM)
    return project


def _in(project: Path, *args: str, ok: bool = True):  # type: ignore[no-untyped-def]
    return invoke("--project", str(project), *args, ok=ok)


def _weights(project: Path, uuid: str) -> str:
    return (project / "storage" / uuid / "weights.bin").read_text()


@pytest.fixture
def two_checkouts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, index_backend: str):  # type: ignore[no-untyped-def]
    """m1/study and m2/study: one project, two machines, each with its own index."""
    if index_backend == "postgresql":
        pytest.fail("two checkouts each keep their project's own SQLite index")
    a, b = _checkout(tmp_path / "m1"), _checkout(tmp_path / "m2")
    uuid = _in(a, "get", "train", "lr=0.5", "--launch").stdout.split()[0]
    assert _in(b, "get", "train", "lr=0.5", "--launch").stdout.split()[0] == uuid
    assert _weights(a, uuid) != _weights(b, uuid)
    return a, b, uuid


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A store URL; S3's credentials come from the environment, as DESIGN.md says they do."""
    if request.param == "file":
        return (tmp_path / "store").as_uri()
    server = request.getfixturevalue("s3_server")
    url, options = request.getfixturevalue("s3_store_url")
    for name, value in {
        "AWS_ACCESS_KEY_ID": options["key"],
        "AWS_SECRET_ACCESS_KEY": options["secret"],
        "AWS_ENDPOINT_URL_S3": server.endpoint_url,
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    return url


@pytest.mark.parametrize("index_backend", ["sqlite"], indirect=True)
def test_a_second_checkout_cannot_replace_a_pushed_copy(two_checkouts, store: str) -> None:  # type: ignore[no-untyped-def]
    a, b, uuid = two_checkouts
    url = store
    mine = _weights(a, uuid)
    _in(a, "push", uuid, "--to", url)
    _in(a, "evict", uuid)
    refused = _in(b, "push", uuid, "--to", url, ok=False)
    assert refused.exit_code != 0 and "Traceback" not in refused.stderr
    line = refused.stderr.strip()
    assert "conflict" in line and uuid in line
    digests = [word for word in line.replace(",", " ").replace(";", " ").split() if len(word) >= 12]
    assert len(set(digests)) >= 2  # both digests are named
    _in(a, "pull", uuid)
    assert _weights(a, uuid) == mine


@pytest.mark.parametrize("index_backend", ["sqlite"], indirect=True)
def test_push_push_evict_keeps_the_first_copy(two_checkouts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a, b, uuid = two_checkouts
    url = (tmp_path / "store").as_uri()
    mine = _weights(a, uuid)
    _in(a, "push", uuid, "--to", url)
    before = {p.name: p.read_bytes() for p in (tmp_path / "store" / uuid).rglob("*") if p.is_file()}
    _in(b, "push", uuid, "--to", url, ok=False)
    after = {p.name: p.read_bytes() for p in (tmp_path / "store" / uuid).rglob("*") if p.is_file()}
    assert after == before  # nothing in the store changed
    _in(a, "evict", uuid)
    _in(a, "pull", uuid)
    assert _weights(a, uuid) == mine
    # B's copy is refused for eviction: no store holds its digest
    refused = _in(b, "evict", uuid, ok=False)
    assert "digest" in refused.stderr
    assert (b / "storage" / uuid / "weights.bin").is_file()
    # whereis and verify on B name the conflicting copy
    shown = _in(b, "whereis", uuid).stdout
    assert "conflict" in shown
    checked = _in(b, "verify", ok=False)
    assert "conflicting copy" in checked.stdout


# --------------------------------------------------------------------------- finding 4


def test_fetch_refuses_a_copy_rewritten_with_its_manifest(project: Path, tmp_path: Path) -> None:
    import hashlib
    import json

    from machinable.errors import NotMountedError

    store_root = tmp_path / "store"
    run = get("optimize", {"lr": 0.6}).launch()
    run.push(store_root.as_uri())
    original = run.load_file("result.json")
    run.evict()
    # rewrite a file of the store copy, and its manifest entry and checksum to match
    forged = b'{"loss": 0.0}'
    (store_root / run.uuid / "result.json").write_bytes(forged)
    manifest_path = store_root / run.uuid / ".manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entry = manifest["files"]["result.json"]
    entry.update(size=len(forged), sha256=hashlib.sha256(forged).hexdigest(), md5=hashlib.md5(forged).hexdigest())
    canonical = json.dumps(manifest["files"], sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    manifest["checksum"] = hashlib.sha256(canonical.encode()).hexdigest()
    manifest.pop("digest", None)
    manifest_path.write_text(json.dumps(manifest))
    recorded = Index.get().find(run.uuid).digest
    assert recorded
    with pytest.raises(NotMountedError, match="digest"):
        run.fetch()
    assert not run.is_mounted()
    assert Index.get().find(run.uuid).digest == recorded  # the recorded digest stands
    assert original == {"loss": 1 / (1 + 0.6 * 100)}


# --------------------------------------------------------------------------- finding 11


def test_push_refuses_a_run_whose_headers_are_links_outside_it(project: Path, tmp_path: Path) -> None:
    run = get("optimize", {"lr": 0.7}).launch()
    directory = run.local_directory()
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("id.json", "model.json"):
        (directory / name).rename(outside / name)
        (directory / name).symlink_to(outside / name)
    result = invoke("push", run.uuid, "--to", (tmp_path / "store").as_uri(), ok=False)
    assert "verified" not in result.stdout
    assert "id.json" in result.stderr


# --------------------------------------------------------------------------- finding 13 (push --all)


def test_push_all_skips_a_run_evicted_meanwhile(project: Path, tmp_path: Path) -> None:
    from machinable import RemoteStore
    from machinable.stores import push

    url = (tmp_path / "store").as_uri()
    runs = [get("optimize", {"lr": lr}).launch() for lr in (0.1, 0.2, 0.3)]
    runs[0].push(url)
    pairs = [(run.uuid, run.local_directory()) for run in runs]
    runs[0].evict()  # between listing and pushing, another process evicted it
    results = push(Index.get(), RemoteStore(url), pairs)
    assert set(results) == {runs[1].uuid, runs[2].uuid}
