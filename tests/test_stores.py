"""Remote stores as a user meets them (issue 3): mirror-on-commit, push, evict, fetch,
availability and whereis, store reindex, the CLI, user-defined stores, many small runs and
transfers killed with SIGKILL.

One abstract set of tests runs against every kind of store (the ``store`` fixture):
``file://`` (a directory in tmp_path), ``memory://`` (a unique root, removed afterwards)
and a real S3 API (SeaweedFS, a fresh bucket each test); and, through ``project``, against
the SQLite and the PostgreSQL index. Tests that need a second process use
``shared_store`` (file:// and S3: a memory store lives in one process only). No mocks: a
few tests wrap a real filesystem's method to count calls.
"""

from __future__ import annotations

import json
import os
import pty
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import inspect, update

from machinable import Index, RemoteStore, Storage, get
from machinable import stores as store_api
from machinable.catalog.engine import sqlite_path
from machinable.catalog.models import Availability
from machinable.errors import EvictionRefused, NotMountedError, StoreError
from machinable.operations.reindex import reindex_stores
from machinable.stores.manifest import (
    MANIFEST_NAME,
    build_manifest,
    manifest_checksum,
    manifest_digest,
)
from machinable.stores.transfer import RemoteState, TransferResult

from conftest import (
    REPO,
    index_backend_name,
    index_url,
    invoke,
    one_line_error,
    table_rows,
    wipe_index,
    write_module,
)

LOSS = {0.2: 1 / (1 + 0.2 * 100), 0.5: 1 / (1 + 0.5 * 100)}

BLOB = '''
import os
from pydantic import BaseModel
from machinable import Interface


class Blob(Interface):
    """A run with a few files of random bytes: enough objects for a transfer to take time."""

    class Config(BaseModel):
        seed: int = 0
        files: int = 4
        size: int = 4096

    def __call__(self):
        for i in range(self.config.files):
            self.save_file(f"data/part{i}.bin", os.urandom(self.config.size))
'''


# --------------------------------------------------------------------------- stores


@dataclass
class StoreSpec:
    """One store under test: its URL, the storage options that reach it, and how a
    process that only knows the URL (from the index) gets credentials and endpoint."""

    kind: str
    url: str
    options: dict = field(default_factory=dict)
    cli_options: list[str] = field(default_factory=list)
    local_env: dict[str, str] = field(default_factory=dict)  # honoured in this process
    process_env: dict[str, str] = field(default_factory=dict)  # for a fresh process

    def connect(self, **kwargs) -> RemoteStore:
        return RemoteStore(self.url, **self.options, **kwargs)

    def _fs(self):
        fs, root = self.connect()._fs()
        fs.invalidate_cache()
        return fs, root

    def path(self, *parts: str) -> str:
        _, root = self._fs()
        return "/".join([root.rstrip("/"), *parts])

    def objects(self) -> dict[str, bytes]:
        """Everything in the store, by path relative to its root."""
        fs, root = self._fs()
        try:
            found = fs.find(root)
        except FileNotFoundError:
            return {}
        prefix = root.rstrip("/") + "/"
        out = {}
        for name in found:
            name = fs._strip_protocol(name)
            out[name[len(prefix) :]] = fs.cat_file(name)
        return out

    def run_files(self, uuid: str) -> dict[str, bytes]:
        return {
            path.split("/", 1)[1]: data
            for path, data in self.objects().items()
            if path.split("/", 1)[0] == uuid and not path.endswith("/" + MANIFEST_NAME)
        }

    def overwrite(self, uuid: str, name: str, data: bytes) -> None:
        fs, _ = self._fs()
        fs.pipe_file(self.path(uuid, name), data)
        fs.invalidate_cache()

    def reachable_by_url(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Let RemoteStore(url) with no options reach the store, through the environment."""
        for name, value in self.local_env.items():
            monkeypatch.setenv(name, value)


def _make_store(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreSpec]:
    if kind == "file":
        yield StoreSpec("file", (tmp_path / "store").as_uri())  # not created beforehand
        return
    if kind == "memory":
        top = f"machinable-test-{secrets.token_hex(6)}"
        spec = StoreSpec("memory", f"memory://{top}/runs")
        try:
            yield spec
        finally:
            fs, _ = spec._fs()
            if fs.exists(f"/{top}"):
                fs.rm(f"/{top}", recursive=True)
            assert not fs.exists(f"/{top}")
        return
    server = request.getfixturevalue("s3_server")
    url, options = request.getfixturevalue("s3_store_url")
    key, secret, endpoint = options["key"], options["secret"], server.endpoint_url
    spec = StoreSpec(
        "s3",
        url,
        options,
        cli_options=[
            "-o",
            f"key={key}",
            "-o",
            f"secret={secret}",
            "-o",
            f"endpoint_url={endpoint}",
        ],
        # botocore reads these whenever a client is made
        local_env={
            "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_ENDPOINT_URL_S3": endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        },
        # fsspec reads FSSPEC_<PROTOCOL>_<OPTION> when it is imported
        process_env={
            "FSSPEC_S3_KEY": key,
            "FSSPEC_S3_SECRET": secret,
            "FSSPEC_S3_ENDPOINT_URL": endpoint,
        },
    )
    # evict reads the store's manifest again at the moment of eviction (DESIGN.md,
    # "Copies and their content"), also for a store known only by its URL in the
    # index: its credentials come from the environment, as they do for a user.
    spec.reachable_by_url(request.getfixturevalue("monkeypatch"))
    yield spec


@pytest.fixture(params=["file", "memory", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreSpec]:
    yield from _make_store(request.param, request, tmp_path)


@pytest.fixture(params=["file", "s3"])
def shared_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreSpec]:
    """A store another process can reach too."""
    yield from _make_store(request.param, request, tmp_path)


@pytest.fixture
def s3(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreSpec]:
    yield from _make_store("s3", request, tmp_path)


# --------------------------------------------------------------------------- helpers


def reindex_with_stores():
    """What `machinable reindex --remotes` does: the directories, then every store."""
    index = Index.get()
    report = index.reindex()
    reindex_stores(index, report)
    return report


def tree(directory: Path) -> dict[str, bytes]:
    """Every regular file under a directory, by posix relpath."""
    return {
        path.relative_to(directory).as_posix(): path.read_bytes()
        for path in sorted(Path(directory).rglob("*"))
        if path.is_file() and not path.is_symlink()
    }


def launch(lr: float):
    return get("optimize", {"lr": lr}).launch()


def store_copy(run, store: RemoteStore):
    (copy,) = [c for c in run.availability() if c.url == store.uri]
    return copy


def recent(moment: datetime | None) -> bool:
    return moment is not None and abs(datetime.now(timezone.utc) - moment) < timedelta(minutes=5)




def child_env(spec: StoreSpec | None = None, **extra: str) -> dict[str, str]:
    """The environment of a real `machinable` process: the store is reached through
    FSSPEC_* variables alone (no AWS_* credentials leak in from this process)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env.update(spec.process_env if spec is not None else {})
    env.update(extra)
    return env


def machinable_process(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "machinable", *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )



# --------------------------------------------------------------------------- mirror, push


def test_mirror_on_commit_leaves_a_verified_copy(project: Path, store: StoreSpec) -> None:
    outside = launch(0.9)
    with store.connect() as connected:
        run = launch(0.2)
        assert RemoteStore.connected() == [connected]
    assert RemoteStore.connected() == []

    manifest = build_manifest(run.local_directory())
    state = connected.verify(run.uuid, manifest)
    assert (state.state, state.checksum, state.size) == (
        "present",
        manifest["digest"],
        manifest["size"],
    )
    assert store.run_files(run.uuid) == tree(run.local_directory())

    local, copy = run.availability()
    assert (local.store, local.state, local.url) == ("local", "present", str(run.local_directory()))
    assert local.size == manifest["size"]
    assert (copy.store, copy.url, copy.state) == (connected.uri, connected.uri, "present")
    assert (copy.size, copy.checksum) == (manifest["size"], manifest["digest"])
    assert recent(copy.verified_at)
    assert run.loss() == LOSS[0.2]

    # a run committed outside the context was not mirrored
    assert [c.store for c in outside.availability()] == ["local"]
    assert connected.verify(outside.uuid).state == "missing"
    assert {path.split("/")[0] for path in store.objects()} == {run.uuid}

    # launching a cached run inside the context again computes and pushes nothing
    with CountingStore(store.url, **store.options) as counting:
        launch(0.2)
    assert counting.calls == Counter()


def test_push_then_evict_then_fetch_round_trip(project: Path, store: StoreSpec) -> None:
    runs = {lr: launch(lr) for lr in (0.05, 0.2, 0.5)}
    evicted = runs[0.2]
    directory = evicted.local_directory()
    before = tree(directory)

    # no copy anywhere: refused, and nothing is deleted
    with pytest.raises(EvictionRefused, match="machinable push") as refused:
        evicted.evict()
    assert evicted.uuid in str(refused.value)
    assert tree(directory) == before and evicted.is_mounted()
    # a connected store that does not hold it is no copy either
    with store.connect(), pytest.raises(EvictionRefused, match="machinable push"):
        evicted.evict()
    assert tree(directory) == before

    connected = store.connect()
    assert evicted.push(connected) is evicted
    assert store.run_files(evicted.uuid) == before
    assert store_copy(evicted, connected).state == "present"

    assert evicted.evict() == directory
    assert not directory.exists()
    assert not evicted.is_mounted() and evicted.cached() and evicted.status() == "finished"
    local, copy = evicted.availability()
    assert (local.store, local.state) == ("local", "evicted")
    assert (copy.state, copy.checksum) == ("present", build_manifest_of(before)["digest"])

    # indexed metadata stays usable
    everything = get("optimize").all()
    assert sorted(r.uuid for r in everything) == sorted(r.uuid for r in runs.values())
    assert {r.uuid: r.config.lr for r in everything}[evicted.uuid] == 0.2
    record = Index.get().find(evicted.uuid)
    assert record is not None and record.config["lr"] == 0.2 and record.status == "finished"
    assert record.directories == ()
    found = Index.get().search("config.lr > 0.1")
    assert sorted(r.uuid for r in found) == sorted([runs[0.2].uuid, runs[0.5].uuid])
    assert [r.uuid for r in get("optimize").all("config.lr == 0.2")] == [evicted.uuid]
    # a reindex of the storage does not forget a run that lives only in a store
    Index.get().reindex(full=True)
    assert Index.get().find(evicted.uuid) is not None
    assert store_copy(evicted, connected).state == "present"

    with pytest.raises(NotMountedError) as error:
        evicted.load_file("result.json")
    assert f"machinable pull {evicted.uuid}" in str(error.value) and "fetch()" in str(error.value)
    with pytest.raises(NotMountedError):
        evicted.loss()
    # nothing to evict twice
    with pytest.raises(NotMountedError):
        evicted.evict()

    # a connected store is enough to fetch (S3 needs the options it was given)
    with connected:
        assert evicted.fetch() == directory
    assert tree(directory) == before
    assert evicted.is_mounted() and evicted.loss() == LOSS[0.2]
    assert [c.state for c in evicted.availability()] == ["present", "present"]
    assert evicted.fetch() == directory  # mounted: nothing to do
    assert get("optimize", {"lr": 0.2}).loss() == LOSS[0.2]


def build_manifest_of(files: dict[str, bytes]) -> dict:
    import hashlib

    listed = {
        name: {
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "md5": hashlib.md5(data, usedforsecurity=False).hexdigest(),
        }
        for name, data in sorted(files.items())
    }
    return {"files": listed, "checksum": manifest_checksum(listed), "digest": manifest_digest(listed)}


def test_fetch_from_a_store_known_only_through_the_index(
    project: Path, store: StoreSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = launch(0.5)
    before = tree(run.local_directory())
    run.push(store.connect(name="lab"))
    run.evict()
    assert [tuple(row) for row in store_api.known_stores(Index.get())] == [
        ("lab", store.connect().uri)
    ]

    # nothing connected: the index's remotes table names the store, the environment
    # holds whatever else reaching it takes
    store.reachable_by_url(monkeypatch)
    assert RemoteStore.connected() == []
    again = get("optimize", {"lr": 0.5})
    assert not again.is_mounted()
    again.fetch()
    assert tree(again.local_directory()) == before and again.loss() == LOSS[0.5]
    # by name, too
    again.evict()
    assert again.fetch("lab") == again.local_directory() and again.is_mounted()


@pytest.mark.parametrize("index_backend", ["sqlite"], indirect=True)
def test_pull_in_a_fresh_process_reaches_the_store_through_the_environment(
    project: Path, shared_store: StoreSpec
) -> None:
    run = launch(0.5)
    before = tree(run.local_directory())
    run.push(shared_store.connect())
    run.evict()
    process = subprocess.run(
        [sys.executable, "-m", "machinable", "pull", run.uuid],
        cwd=project,
        env=child_env(shared_store),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert process.returncode == 0, process.stderr
    assert process.stderr == ""  # not a terminal: no progress output
    assert f"{run.uuid} -> {run.local_directory()}" in process.stdout
    assert "fetched 1 run(s)" in process.stdout
    assert run.is_mounted() and tree(run.local_directory()) == before and run.loss() == LOSS[0.5]


# --------------------------------------------------------------------------- credentials


def test_credentials_never_reach_the_index_records_or_store(project: Path, s3: StoreSpec) -> None:
    key, secret = s3.options["key"], s3.options["secret"]
    endpoint = s3.options["client_kwargs"]["endpoint_url"]
    with s3.connect(name="bucket") as connected:
        mirrored = launch(0.2)
    pushed = launch(0.5).push(RemoteStore(s3.url, **s3.options))
    pushed.evict()
    invoke("push", mirrored.uuid, "--to", s3.url, *s3.cli_options)
    invoke("pull", pushed.uuid, "--from", s3.url, *s3.cli_options)

    assert [row[1:3] for row in table_rows("remotes")] == [("bucket", connected.uri)]
    assert connected.uri == s3.url and "@" not in connected.uri
    assert repr(connected) == f"RemoteStore({s3.url!r})"

    index = Index.get()
    with index.engine.connect() as conn:
        tables = inspect(conn).get_table_names()
    assert {"remotes", "availability"} <= set(tables)
    for table in tables:
        text = repr(table_rows(table, index))
        for needle in (key, secret, endpoint):
            assert needle not in text, (table, needle)
    if index_backend_name() == "sqlite":
        path = sqlite_path(index_url())
        raw = b"".join(
            Path(f"{path}{suffix}").read_bytes()
            for suffix in ("", "-wal")
            if Path(f"{path}{suffix}").exists()
        )
        assert raw and secret.encode() not in raw and key.encode() not in raw

    stored = {**tree(mirrored.local_directory()), **tree(pushed.local_directory())}
    stored.update(s3.objects())
    for name, data in stored.items():
        assert secret.encode() not in data and key.encode() not in data, name
    listing = invoke("stores")
    assert "bucket" in listing.stdout and secret not in listing.stdout + listing.stderr
    shown = invoke("whereis", pushed.uuid)
    assert secret not in shown.stdout and key not in shown.stdout


# --------------------------------------------------------------------------- verification


def age_verification(run, store: RemoteStore, by: timedelta) -> datetime:
    """Pretend the store's copy was last verified ``by`` ago; return that moment."""
    copy = store_copy(run, store)
    moment = copy.verified_at - by
    table = Availability.__table__
    index = Index.get()
    with index.engine.begin() as conn:
        remote_id = store_api.register(index, store)
        conn.execute(
            update(table)
            .where(table.c.run_uuid == run.uuid, table.c.remote_id == remote_id)
            .values(verified_at=moment)
        )
    assert store_copy(run, store).verified_at == moment
    return moment


def test_a_copy_corrupted_in_the_store_is_reverified_and_refused(
    project: Path, store: StoreSpec
) -> None:
    run = launch(0.2)
    connected = store.connect()
    run.push(connected)
    before = tree(run.local_directory())
    original = before["result.json"]
    corrupt = bytes([original[0] ^ 0x01]) + original[1:]  # same size, other content
    store.overwrite(run.uuid, "result.json", corrupt)
    assert store_copy(run, connected).state == "present"  # the index cannot know yet

    with connected, pytest.raises(EvictionRefused, match="machinable push"):
        run.evict(max_age=timedelta(0))
    assert run.is_mounted() and tree(run.local_directory()) == before
    copy = store_copy(run, connected)
    assert copy.state == "partial"  # what the re-verification found is recorded
    # and now that the index knows, even the default window refuses
    with connected, pytest.raises(EvictionRefused):
        run.evict()
    assert tree(run.local_directory()) == before

    # a stale verification of a corrupt copy is re-checked too
    other = launch(0.5)
    other.push(connected)
    store.overwrite(
        other.uuid,
        "result.json",
        b"{}" + b" " * (len(tree(other.local_directory())["result.json"]) - 2),
    )
    age_verification(other, connected, timedelta(days=3))
    with connected, pytest.raises(EvictionRefused):
        other.evict()
    assert other.is_mounted() and other.loss() == LOSS[0.5]

    # pushing again repairs the copy; then eviction goes through (re-verifying needs the
    # store reachable: connected, with its options)
    run.push(connected)
    assert connected.verify(run.uuid, build_manifest(run.local_directory())).state == "present"
    with connected:
        run.evict(max_age=timedelta(0))
    assert not run.is_mounted()


def test_a_stale_verification_is_redone_before_evicting(project: Path, store: StoreSpec) -> None:
    connected = store.connect()
    stale, fresh = launch(0.2), launch(0.5)
    for run in (stale, fresh):
        run.push(connected)
    moment = age_verification(stale, connected, timedelta(days=2))

    with connected:
        stale.evict()  # default window: 24 h; the copy is checked again now
    copy = store_copy(stale, connected)
    assert copy.state == "present" and copy.verified_at > moment and recent(copy.verified_at)
    assert not stale.is_mounted()

    before = store_copy(fresh, connected).verified_at
    time.sleep(0.01)
    with connected:
        fresh.evict(max_age=timedelta(0))  # nothing is recent enough: verified now
    assert store_copy(fresh, connected).verified_at > before
    assert not fresh.is_mounted()

    # a copy deleted from the store since its last verification: refused, and recorded
    kept = launch(0.05)
    kept.push(connected)
    age_verification(kept, connected, timedelta(days=2))
    connected.delete(kept.uuid)
    assert store.run_files(kept.uuid) == {}
    with connected, pytest.raises(EvictionRefused, match=f"machinable push {kept.uuid}"):
        kept.evict()
    assert kept.is_mounted() and store_copy(kept, connected).state == "missing"


# --------------------------------------------------------------------------- reindex


def test_reindex_remotes_rebuilds_availability_after_the_index_is_lost(
    project: Path, store: StoreSpec, tmp_path: Path
) -> None:
    connected = store.connect()
    kept, gone = launch(0.05), launch(0.2)
    elsewhere = tmp_path / "other-machine"
    with Storage(elsewhere):
        foreign = get("optimize", {"lr": 0.5}).launch()
        foreign.push(connected)
    kept.push(connected)
    gone.push(connected)
    files = {run.uuid: tree(run.local_directory()) for run in (kept, gone, foreign)}
    gone.evict()
    shutil.rmtree(elsewhere)

    wipe_index(project)
    with connected:
        report = reindex_with_stores()
    assert report.added == 1  # kept: the only run directory here
    assert report.stores == {connected.uri: {"listed": 3, "added": 2, "present": 3}}
    assert [row[2] for row in table_rows("remotes")] == [connected.uri]

    for run in (kept, gone, foreign):
        again = get("optimize", {"lr": run.config.lr})
        assert again.cached() and again.status() == "finished"
        copy = store_copy(again, connected)
        assert copy.state == "present"
    assert get("optimize", {"lr": 0.05}).is_mounted()
    assert sorted(r.uuid for r in get("optimize").all()) == sorted(files)
    assert sorted(r.uuid for r in Index.get().search("config.lr > 0.1")) == sorted(
        [gone.uuid, foreign.uuid]
    )
    for uuid in (gone.uuid, foreign.uuid):
        record = Index.get().find(uuid)
        assert record is not None and record.directories == () and record.status == "finished"

    # runs known only from the store come back as evicted rows that fetch() restores
    for lr in (0.2, 0.5):
        again = get("optimize", {"lr": lr})
        local = again.availability()[0]
        assert (local.store, local.state) == ("local", "evicted")
        with pytest.raises(NotMountedError, match="machinable pull"):
            again.loss()
        with connected:
            again.fetch()
        assert tree(again.local_directory()) == files[again.uuid]
        assert again.loss() == LOSS[lr]
    # a second pass with the store known only through the index changes nothing
    with connected:
        second = reindex_with_stores()
    assert second.stores[connected.uri] == {"listed": 3, "added": 0, "present": 3}


# --------------------------------------------------------------------------- CLI


def test_cli_push_evict_whereis_pull(project: Path, store: StoreSpec) -> None:
    run, other = launch(0.2), launch(0.5)
    before = tree(run.local_directory())
    uri = store.connect().uri

    refused = invoke("evict", run.uuid, ok=False)
    one_line_error(refused, "refusing to evict", run.uuid, f"machinable push {run.uuid}")
    assert refused.stdout == "" and tree(run.local_directory()) == before

    unknown = invoke("push", run.uuid, "--to", "no-such-store", ok=False)
    one_line_error(unknown, "unknown store 'no-such-store'")
    missing = invoke("push", "0" * 32, "--to", store.url, *store.cli_options, ok=False)
    one_line_error(missing, "no run")

    pushed = invoke("push", run.uuid, other.uuid, "--to", store.url, *store.cli_options)
    size = sum(len(d) for d in before.values()) + sum(
        len(d) for d in tree(other.local_directory()).values()
    )
    assert pushed.stdout.strip() == f"pushed 2 run(s), {size} bytes, to {uri} (verified)"
    assert pushed.stderr == ""  # not a terminal: no progress bar
    assert store.run_files(run.uuid) == before
    assert "".join(invoke("stores").stdout.split()) == uri.replace(" ", "")

    evicted = invoke("evict", run.uuid)
    assert evicted.stdout.strip() == "evicted 1 run(s)" and evicted.stderr == ""
    assert not run.is_mounted()

    where = invoke("whereis", run.uuid)
    lines = [line.split() for line in where.stdout.strip().splitlines()]
    assert lines[0] == ["store", "where", "state", "size", "digest", "verified"]
    local, remote = lines[1:]
    assert local[:3] == ["local", str(run.local_directory()), "evicted"]
    checksum = build_manifest_of(before)["digest"]
    assert remote[:5] == [uri, uri, "present", str(len(b"".join(before.values()))), checksum]
    assert remote[5].startswith(datetime.now(timezone.utc).strftime("%Y-"))
    where_other = invoke("whereis", other.uuid).stdout
    assert "present" in where_other and str(other.local_directory()) in where_other
    one_line_error(invoke("whereis", "f" * 32, ok=False), "no run")

    pulled = invoke("--quiet", "pull", run.uuid, "--from", store.url, *store.cli_options)
    assert pulled.stdout.splitlines() == [
        f"{run.uuid} -> {run.local_directory()}",
        "fetched 1 run(s)",
    ]
    assert pulled.stderr == ""
    assert tree(run.local_directory()) == before and run.loss() == LOSS[0.2]
    again = invoke("pull", run.uuid, "--from", store.url, *store.cli_options)
    assert again.stdout.strip() == "fetched 0 run(s)"

    # --where and --all select runs; they evict the runs with a verified copy and keep
    # (and count) the others, where a named run without one is an error
    invoke("evict", "--where", "config.lr > 0.3")
    assert not other.is_mounted() and run.is_mounted()
    third = launch(0.05)
    evicted_all = invoke("evict", "--all")
    assert evicted_all.stdout.splitlines() == [
        "evicted 1 run(s)",
        "kept 1 run(s) that no store holds with the same digest (push them first)",
    ]
    assert third.is_mounted() and not run.is_mounted()
    one_line_error(invoke("evict", third.uuid, ok=False), "refusing to evict")


def run_in_terminal(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str, bytes]:
    """Run `machinable ARGS` with stderr on a pseudo-terminal; return (code, stdout, stderr)."""
    master, slave = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "machinable", *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: every end of the terminal is closed
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    out = process.stdout.read().decode()
    process.stdout.close()
    return process.wait(timeout=60), out, b"".join(chunks)


@pytest.mark.parametrize("index_backend", ["sqlite"], indirect=True)
def test_progress_shows_on_a_terminal_and_never_with_quiet(project: Path, tmp_path: Path) -> None:
    runs = [launch(lr) for lr in (0.05, 0.2, 0.5)]
    url = (tmp_path / "terminal-store").as_uri()
    env = child_env(TERM="xterm-256color", COLUMNS="100")
    env.pop("MACHINABLE_QUIET", None)

    code, out, err = run_in_terminal(["--quiet", "push", runs[0].uuid, "--to", url], project, env)
    assert code == 0 and "pushed 1 run(s)" in out
    assert err == b""

    code, out, err = run_in_terminal(
        ["push", runs[1].uuid, runs[2].uuid, "--to", url], project, env
    )
    assert code == 0 and "pushed 2 run(s)" in out
    assert b"push 2 run(s)" in err  # the progress bar, drawn on the terminal

    code, out, err = run_in_terminal(["--quiet", "evict", "--all"], project, env)
    assert code == 0 and "evicted 3 run(s)" in out and err == b""
    code, out, err = run_in_terminal(["--quiet", "pull", "--all"], project, env)
    assert code == 0 and "fetched 3 run(s)" in out and err == b""
    assert all(run.is_mounted() for run in runs)


# --------------------------------------------------------------------------- user stores


class CountingStore(RemoteStore):
    """The default store, counting how often each protocol method is used."""

    def __init__(self, url: str, **options):
        super().__init__(url, **options)
        self.calls: Counter = Counter()

    def push(self, items, *, progress=False):
        self.calls["push"] += 1
        return super().push(items, progress=progress)

    def fetch(self, items, *, progress=False):
        self.calls["fetch"] += 1
        return super().fetch(items, progress=progress)

    def verify(self, uuid, expected_manifest=None):
        self.calls["verify"] += 1
        return super().verify(uuid, expected_manifest)


class DirectoryStore(RemoteStore):
    """A backend fsspec knows nothing of: a plain directory written with shutil.

    ``<root>/<uuid>/`` holds the run's files and ``<root>/<uuid>.manifest.json`` its
    manifest, written last.
    """

    def __init__(self, root: Path, *, name: str | None = None):
        super().__init__(f"dirstore://{root}", name=name)
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.calls: Counter = Counter()

    @property
    def uri(self) -> str:
        return f"dirstore://{self.root}"

    def _manifest(self, uuid: str) -> Path:
        return self.root / f"{uuid}.manifest.json"

    def push(self, items, *, progress=False):
        self.calls["push"] += 1
        results = {}
        for uuid, source in items:
            manifest = build_manifest(source)
            staging = self.root / f".{uuid}.incoming"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(source, staging, symlinks=True)
            if build_manifest(staging)["checksum"] != manifest["checksum"]:
                raise StoreError(f"copy of {uuid} changed while pushing", uuid=uuid, store=self.uri)
            self._manifest(uuid).unlink(missing_ok=True)
            shutil.rmtree(self.root / uuid, ignore_errors=True)
            staging.rename(self.root / uuid)
            self._manifest(uuid).write_text(json.dumps(manifest))
            results[uuid] = TransferResult(
                uuid, "present", manifest["size"], manifest["digest"], datetime.now(timezone.utc)
            )
        return results

    def fetch(self, items, *, progress=False):
        self.calls["fetch"] += 1
        results = {}
        for uuid, dest in items:
            state = self.verify(uuid)
            if state.state != "present":
                raise StoreError(
                    f"no complete copy of {uuid}: {state.problems}", uuid=uuid, store=self.uri
                )
            staging = Path(dest).parent / f".{uuid}.incoming"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(self.root / uuid, staging, symlinks=True)
            staging.rename(dest)
            results[uuid] = TransferResult(
                uuid, "present", state.size, state.checksum, state.verified_at
            )
        return results

    def verify(self, uuid, expected_manifest=None):
        self.calls["verify"] += 1
        if not (self.root / uuid).is_dir():
            return RemoteState("missing", problems=["no copy"])
        try:
            recorded = json.loads(self._manifest(uuid).read_text())
        except FileNotFoundError:
            return RemoteState("partial", problems=["no manifest"])
        reference = expected_manifest if expected_manifest is not None else recorded
        actual = build_manifest(self.root / uuid)
        if manifest_checksum(actual) != manifest_checksum(reference) or manifest_checksum(
            recorded
        ) != manifest_checksum(reference):
            return RemoteState("partial", problems=["content differs"])
        # the protocol: a verified copy reports its content digest as its checksum
        return RemoteState(
            "present", actual["size"], manifest_digest(actual), datetime.now(timezone.utc)
        )

    def delete(self, uuid):
        self._manifest(uuid).unlink(missing_ok=True)
        shutil.rmtree(self.root / uuid)

    def headers(self):
        for path in sorted(self.root.iterdir()):
            if path.is_dir() and not path.name.startswith("."):
                yield (
                    path.name,
                    json.loads((path / "id.json").read_text()),
                    self._manifest(path.name).exists(),
                )

    def read(self, uuid, names):
        out = {}
        for name in names:
            path = self.root / uuid / name
            out[name] = path.read_bytes() if path.is_file() else None
        return out


def test_a_store_that_wraps_the_default_is_used_for_every_transfer(
    project: Path, store: StoreSpec
) -> None:
    with CountingStore(store.url, **store.options) as counting:
        run = launch(0.2)
        assert counting.calls == Counter(push=1)
        before = tree(run.local_directory())
        run.evict(max_age=timedelta(0))
        assert counting.calls == Counter(push=1, verify=1)
        assert run.fetch() == run.local_directory()
        assert counting.calls == Counter(push=1, verify=1, fetch=1)
    assert tree(run.local_directory()) == before and run.loss() == LOSS[0.2]
    assert store_copy(run, counting).state == "present"


def test_a_backend_fsspec_lacks_is_a_remote_store_subclass(project: Path, tmp_path: Path) -> None:
    mirror = DirectoryStore(tmp_path / "mirror", name="mirror")
    with mirror:
        run = launch(0.2)
    before = tree(run.local_directory())
    assert mirror.calls == Counter(push=1)
    assert tree(tmp_path / "mirror" / run.uuid) == before
    (copy,) = [c for c in run.availability() if c.store == "mirror"]
    assert (copy.url, copy.state, copy.checksum) == (
        mirror.uri,
        "present",
        build_manifest_of(before)["digest"],
    )

    with mirror:
        run.evict(max_age=timedelta(0))
    assert mirror.calls["verify"] == 1 and not run.is_mounted()

    # not connected, and no fsspec filesystem has that protocol: a clear error
    with pytest.raises(NotMountedError, match="cannot fetch run"):
        run.fetch()
    with mirror:
        run.fetch()
    assert mirror.calls["fetch"] == 1 and tree(run.local_directory()) == before
    assert run.loss() == LOSS[0.2]

    # a push of an existing run, and a corrupted copy refused
    other = launch(0.5)
    other.push(mirror)
    (tmp_path / "mirror" / other.uuid / "result.json").write_text('{"loss": 0}')
    with mirror, pytest.raises(EvictionRefused):
        other.evict(max_age=timedelta(0))
    assert other.is_mounted()

    # its listing rebuilds availability after the index is lost (evict reads the
    # store's manifest at that moment: a custom backend must be connected to be read)
    with mirror:
        run.evict()
    wipe_index(project)
    with mirror:
        report = reindex_with_stores()
        assert report.stores["mirror"]["listed"] == 2
        again = get("optimize", {"lr": 0.2})
        assert not again.is_mounted() and again.cached()
        again.fetch()
    assert tree(again.local_directory()) == before
    mirror.delete(other.uuid)
    assert not (tmp_path / "mirror" / other.uuid).exists()

    # a known store that cannot be opened here does not stop one that can
    third = launch(0.05)
    plain = RemoteStore((tmp_path / "plain").as_uri())
    third.push(plain)
    third.push(mirror)  # verified last: tried first
    with plain:
        third.evict(max_age=timedelta(0))
        assert not third.is_mounted()
        third.fetch()
    assert third.is_mounted() and third.loss() == 1 / (1 + 0.05 * 100)


def test_a_store_class_in_a_project_module_is_a_context(project: Path, store: StoreSpec) -> None:
    write_module(
        project,
        "stores.lab",
        """
        from machinable import RemoteStore


        class LabStore(RemoteStore):
            '''The lab's store, configured like any module.'''

            def __init__(self, url, **options):
                super().__init__(url, name="lab", **options)
                self.pushed = []

            def push(self, items, *, progress=False):
                self.pushed += [uuid for uuid, _ in items]
                return super().push(items, progress=progress)
        """,
    )
    with get("stores.lab", {"url": store.url, **store.options}) as lab:
        assert type(lab).__name__ == "LabStore" and isinstance(lab, RemoteStore)
        run = launch(0.2)
    assert lab.pushed == [run.uuid]
    (copy,) = [c for c in run.availability() if c.store == "lab"]
    assert copy.state == "present" and copy.url == lab.uri
    run.evict()
    with get("stores.lab", {"url": store.url, **store.options}):
        run.fetch()
    assert run.loss() == LOSS[0.2]


# --------------------------------------------------------------------------- S3 at scale


def blob_runs(project: Path, count: int, **config) -> list:
    write_module(project, "blob", BLOB)
    return [get("blob", {"seed": seed, **config}).launch() for seed in range(count)]


def test_many_small_runs_go_in_one_bulk_put(project: Path, s3: StoreSpec) -> None:
    runs = blob_runs(project, 50, files=2, size=64)
    connected = s3.connect()
    fs = connected._fs()[0]
    puts: list[int] = []
    real_put = fs.put

    def counting_put(lpath, rpath, *args, **kwargs):
        puts.append(len(lpath))
        return real_put(lpath, rpath, *args, **kwargs)

    fs.put = counting_put
    try:
        results = store_api.push(
            Index.get(), connected, [(r.uuid, r.local_directory()) for r in runs]
        )
    finally:
        del fs.put
    files = sum(len(tree(r.local_directory())) for r in runs)
    assert puts == [files]
    assert sorted(results) == sorted(r.uuid for r in runs)
    assert all(store_copy(r, connected).state == "present" for r in runs)
    for run in runs[::10]:
        assert connected.verify(run.uuid, build_manifest(run.local_directory())).state == "present"


@pytest.mark.parametrize("index_backend", ["sqlite"], indirect=True)
def test_an_interrupted_push_is_never_reported_present_and_a_retry_completes(
    project: Path,
    s3: StoreSpec,
    s3_server,  # noqa: F811
) -> None:
    runs = blob_runs(project, 120)
    connected = s3.connect()
    _, root = connected._fs()
    observer = s3_server.filesystem()

    # The push kills itself once 60 files have landed (a named point, not a polled window).
    process = machinable_process(
        ["push", "--all", "--to", s3.url], project, child_env(s3, MACHINABLE_TEST_KILL_AT="push-file:60")
    )
    out, err = process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL, (process.returncode, out, err[-3000:])
    assert len(observer.find(root)) >= 60

    index = Index.get()
    present = []
    for run in runs:
        for copy in store_api.copies(index, run.uuid):
            assert copy.state != "present" or copy.url == connected.uri
            if copy.state == "present":
                present.append(run)
    for run in present:  # whatever the index calls present is complete in the store
        assert connected.verify(run.uuid, build_manifest(run.local_directory())).state == "present"
    complete = {uuid for uuid, _, has_manifest in connected.headers() if has_manifest}
    assert {r.uuid for r in present} <= complete
    assert len(complete) < len(runs)  # it was killed mid-transfer
    incomplete = [run for run in runs if run.uuid not in complete]
    for run in incomplete[:: max(1, len(incomplete) // 8)]:  # no manifest: not a copy
        assert connected.verify(run.uuid).state in ("missing", "partial")
        with connected, pytest.raises(EvictionRefused):
            run.evict(max_age=timedelta(0))
        assert run.is_mounted()

    retried = invoke("push", "--all", "--to", s3.url, *s3.cli_options)
    assert retried.stdout.startswith(f"pushed {len(runs)} run(s)")
    for run in runs:
        copy = store_copy(run, connected)
        assert (copy.state, copy.checksum) == (
            "present",
            build_manifest(run.local_directory())["digest"],
        )
    assert {uuid for uuid, _, has in connected.headers() if has} == {r.uuid for r in runs}
    for run in runs[::10]:
        manifest = build_manifest(run.local_directory())
        state = connected.verify(run.uuid, manifest)
        assert (state.state, state.checksum) == ("present", manifest["digest"])


@pytest.mark.parametrize("index_backend", ["postgresql"], indirect=True)
@pytest.mark.parametrize(
    ("kill_at", "landed"),
    [
        ("fetch-file:70", 0),  # half way through the download: nothing has landed
        ("fetch-run:5", 5),  # five runs landed, the others downloaded but not yet renamed
    ],
)
def test_an_interrupted_pull_leaves_no_half_record_and_a_retry_completes(
    project: Path, s3: StoreSpec, kill_at: str, landed: int
) -> None:
    runs = blob_runs(project, 40, size=256 * 1024)  # a pull fetches run after run
    files = {run.uuid: tree(run.local_directory()) for run in runs}
    invoke("push", "--all", "--to", s3.url, *s3.cli_options)
    evicted = invoke("evict", "--all")
    assert evicted.stdout.strip() == f"evicted {len(runs)} run(s)"
    storage = Storage.get().directory()
    assert [p.name for p in storage.iterdir() if not p.name.startswith(".")] == []

    # The pull kills itself at a named point (not in a polled window): after a number of
    # files downloaded, or once a number of runs have landed.
    process = machinable_process(["pull", "--all"], project, child_env(s3, MACHINABLE_TEST_KILL_AT=kill_at))
    out, err = process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL, (process.returncode, out, err[-3000:])

    back = [p for p in storage.iterdir() if not p.name.startswith(".")]
    assert len(back) == landed
    # the runs not landed are only dot-named leftovers, some of them half downloaded
    leftovers = [p.name for p in storage.iterdir() if ".partial-" in p.name]
    assert len(leftovers) == len(runs) - landed
    staged = {name[1:].split(".partial-")[0]: tree(storage / name) for name in leftovers}
    if landed == 0:  # killed mid-download: some staged runs are not whole
        assert any(staged[uuid] != files[uuid] for uuid in staged)
    for name in leftovers:
        uuid = name[1:].split(".partial-")[0]
        assert uuid in files and uuid not in {p.name for p in back}
    for directory in back:  # anything that looks like a record is the whole record
        assert tree(directory) == files[directory.name]
    report = Index.get().reindex(full=True)
    assert report.skipped == []
    mounted = {run.uuid for run in runs if run.is_mounted()}
    assert mounted == {p.name for p in back}

    retried = invoke("pull", "--all", "--from", s3.url, *s3.cli_options)
    assert retried.stdout.strip().endswith(f"fetched {len(runs) - len(back)} run(s)")
    assert not [p.name for p in storage.iterdir() if ".partial-" in p.name]
    for run in runs:
        assert run.is_mounted() and tree(run.local_directory()) == files[run.uuid]
