"""Bad input, each answered by a clear error with nothing stored changed (issue 6, item 3),
and a fuzz pass over the header parsers (issue 6, item 4).

"Nothing stored changed" is checked, not assumed: the bytes of every file under the
storage (and any outside directory involved) and the index rows are snapshotted before
the bad input and compared after.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, delete, select, text

from machinable import Index, get
from machinable.catalog.engine import dispose_all
from machinable.catalog.models import Location, Run
from machinable.errors import (
    ConfigError,
    IdentityCollision,
    IndexError_,
    IndexNewerThanCode,
    MachinableError,
    ModuleResolutionError,
    PathEscapeError,
    RecordError,
    RemoteError,
)
from machinable.identity import compute_uuid, config_key, predicate_key
from machinable.record import (
    HEADER_KEYS,
    MODEL_KEYS,
    dump_json,
    id_header,
    is_uuid,
    read_record,
    validate_headers,
)
from machinable.remotes import fetch_all, remote_path

from conftest import index_url, postgres_schema, run_python, wipe_index, write_module

STAMP = "2026-01-01T00:00:00+00:00"

TRIVIAL = '''
from pydantic import BaseModel
from machinable import Interface


class Trivial(Interface):
    class Config(BaseModel):
        i: int = 0
        lr: float = 0.1
'''

ODD = '''
import math
from typing import Any, Optional
from pydantic import BaseModel
from machinable import Interface


class Odd(Interface):
    class Config(BaseModel):
        obj: object = None
        raw: bytes = b""
        x: float = 0.5
        xs: list[float] = []
        payload: Any = None
        text: str = ""
        names: dict[str, str] = {}
        poison_predicate: bool = False

    def on_compute_predicate(self):
        return {"p": math.nan} if self.config.poison_predicate else None

    def __call__(self):
        self.save_file("xs.json", {"n": len(self.config.xs)})
'''


# Helpers.


def headers_for(i: int, project: str = "study") -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The headers launch() writes for trivial run ``i`` (as benchmarks/bench_core.py)."""
    canonical = {"i": i}
    uuid = compute_uuid(project, "trivial", canonical, {})
    header = id_header(uuid, project, "trivial", config_key(canonical), predicate_key({}))
    model = {
        "module": "trivial",
        "project": project,
        "config": {"i": i, "lr": 0.1},
        "canonical": canonical,
        "version": [{"i": i}],
        "predicate": {},
        "created_at": STAMP,
    }
    return uuid, header, model


def make_records(storage: Path, start: int, n: int) -> list[str]:
    """Write finished record directories quickly (the same bytes launch() writes).

    The sentinel and the markers are hard links to two shared files: creating files is
    what is slow on a busy disk, and nothing here rewrites them in place.
    """
    storage.mkdir(parents=True, exist_ok=True)
    shared = storage.parent / f".shared-{start}"
    shared.mkdir()
    (shared / "empty").write_text("")
    (shared / "stamp").write_text(STAMP)
    uuids = []
    for i in range(start, start + n):
        uuid, header, model = headers_for(i)
        directory = storage / uuid
        directory.mkdir()
        (directory / "model.json").write_text(dump_json(model))
        (directory / "id.json").write_text(dump_json(header))
        os.link(shared / "empty", directory / ".machinable")
        for marker in ("started_at", "finished_at", "updated_at"):
            os.link(shared / "stamp", directory / marker)
        uuids.append(uuid)
    return uuids


def tree(root: Path) -> dict[str, Any]:
    """Every entry under ``root``: file bytes, symlink targets, directories."""
    out: dict[str, Any] = {}
    if not root.exists():
        return out
    for base, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in dirs + files:
            if name.startswith(".machinable.sqlite"):  # the index: compared as rows
                continue
            path = Path(base, name)
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", path.read_bytes())
    return out


def rows(index: Index | None = None) -> tuple[list[tuple], list[tuple]]:
    """The index's runs and locations (mtime_ns, a cache hint, left out)."""
    index = index or Index.get()
    runs = Run.__table__
    locations = Location.__table__
    with index.engine.connect() as conn:
        run_rows = [tuple(r) for r in conn.execute(select(runs).order_by(runs.c.uuid))]
        loc_rows = [
            tuple(r)
            for r in conn.execute(
                select(locations.c.run_uuid, locations.c.storage, locations.c.directory).order_by(
                    locations.c.run_uuid, locations.c.directory
                )
            )
        ]
    return run_rows, loc_rows


class Unchanged:
    """Snapshot storage trees and index rows; ``check()`` asserts nothing changed."""

    def __init__(self, *roots: Path, index: bool = True):
        self.roots = roots
        self.index = index
        self.before = self._take()

    def _take(self) -> Any:
        return [tree(root) for root in self.roots], rows() if self.index else None

    def check(self) -> None:
        after = self._take()
        assert after[0] == self.before[0], "a stored file changed"
        assert after[1] == self.before[1], "an index row changed"


def launch_odd(project: Path) -> Any:
    write_module(project, "odd", ODD)
    return get("odd", {"x": 1.5}).launch()


# 1. Corrupt headers among thousands of good records.

BAD_HEADERS: dict[str, tuple[str, Any]] = {
    # name: (file, bytes or action) -> what reindex must name
    "truncated model.json": ("model.json", "truncate"),
    "truncated id.json": ("id.json", "truncate"),
    "empty id.json": ("id.json", b""),
    "binary model.json": ("model.json", bytes(range(256))),
    "id.json is an array": ("id.json", b"[1, 2, 3]"),
    "model.json lacks keys": ("model.json", b'{"module": "trivial"}'),
    "model.json edited": ("model.json", "edit"),
    "model.json missing": ("model.json", None),
    "id.json is a directory": ("id.json", "dir"),
    "model.json nested 100000 deep": ("model.json", b"[" * 100_000 + b"]" * 100_000),
    "id.json not UTF-8": ("id.json", b'{"uuid": "\xff\xfe"}'),
    "id.json module is a list": ("id.json", "module-list"),
}


def corrupt(directory: Path, file: str, action: Any) -> None:
    path = directory / file
    if action == "truncate":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    elif action == "edit":
        model = json.loads(path.read_text())
        model["canonical"] = {"i": -1}
        path.write_text(json.dumps(model))
    elif action == "dir":
        path.unlink()
        path.mkdir()
    elif action == "module-list":
        header = json.loads(path.read_text())
        header["module"] = [header["module"]]
        path.write_text(json.dumps(header))
    elif action is None:
        path.unlink()
    else:
        path.write_bytes(action)


def test_corrupt_headers_among_2000_good_records(project: Path) -> None:
    write_module(project, "trivial", TRIVIAL)
    storage = project / "storage"
    good = make_records(storage, 0, 2000)
    launched = get("optimize", {"lr": 0.5}).launch()
    report = Index.get().reindex()
    assert report.indexed == 2001 and not report.skipped

    # Bad directories appear beside the good ones, and three indexed ones rot in place.
    bad = dict(zip(BAD_HEADERS, make_records(storage, 5000, len(BAD_HEADERS)), strict=True))
    for name, uuid in bad.items():
        corrupt(storage / uuid, *BAD_HEADERS[name])
    rotten = good[:3]
    for uuid in rotten:
        corrupt(storage / uuid, "model.json", "truncate")
    (storage / "backup").mkdir()
    before = Unchanged(storage)

    report = Index.get().reindex(full=True)
    before.check()  # every good row as it was, the rotten ones kept, nothing written
    skipped = dict(report.skipped)
    assert len(report.skipped) == len(bad) + len(rotten) + 1
    for name, uuid in bad.items():
        assert BAD_HEADERS[name][0] in skipped[str(storage / uuid)], name  # names the file
    for uuid in rotten:
        assert "model.json is not valid JSON" in skipped[str(storage / uuid)]
    assert "not named like a run uuid" in skipped[str(storage / "backup")]
    assert report.removed == 0
    for path, reason in report.skipped:
        assert f"skipped {path}: {reason}" in str(report)

    # Rebuilt from scratch: every good record is back, every bad one is reported.
    wipe_index(project)  # the SQLite file and its companions, or the PostgreSQL schema
    fresh = Index.get().reindex()
    assert fresh.added == 2001 - len(rotten)
    assert dict(fresh.skipped) == skipped
    assert Index.get().count() == 2001 - len(rotten)
    assert get("trivial", {"i": 1999}).cached() and get("optimize", {"lr": 0.5}).cached()
    assert launched.loss() == pytest.approx(1 / 51)
    assert tree(storage) == before.before[0][0]  # the rebuild wrote nothing there either


# 2. A record copied under a wrong name; two runs claiming one uuid.


def test_a_record_copied_under_a_wrong_uuid_is_refused(project: Path, tmp_path: Path) -> None:
    run = get("optimize", {"lr": 0.5}).launch()
    storage = project / "storage"
    wrong = storage / ("0" * 32)
    shutil.copytree(run.local_directory(), wrong)
    elsewhere = tmp_path / "copies" / ("f" * 32)
    shutil.copytree(run.local_directory(), elsewhere)
    before = Unchanged(storage, tmp_path / "copies")

    with pytest.raises(RecordError) as caught:
        Index.get().ingest_directory(elsewhere)
    assert "f" * 32 in str(caught.value) and run.uuid in str(caught.value)
    report = Index.get().reindex()
    reason = dict(report.skipped)[str(wrong)]
    assert "0" * 32 in reason and run.uuid in reason
    before.check()
    assert Index.get().local_directory(run.uuid) == run.local_directory()


def _tampered_copy(run: Any, target: Path) -> Path:
    """Same uuid, valid hash, but another identity in id.json (its config key)."""
    shutil.copytree(run.local_directory(), target)
    header = json.loads((target / "id.json").read_text())
    header["config_key"] = "e" * 32
    (target / "id.json").write_text(json.dumps(header))
    return target


def test_two_runs_claiming_one_uuid_change_nothing(project: Path, tmp_path: Path) -> None:
    run = get("optimize", {"lr": 0.5}).launch()
    other = _tampered_copy(run, tmp_path / "other" / run.uuid)
    before = Unchanged(project / "storage", tmp_path / "other")

    with pytest.raises(IdentityCollision) as caught:
        Index.get().ingest_directory(other)
    message = str(caught.value)
    assert run.uuid in message and "config_key" in message and "nothing was changed" in message
    report = Index.get().reindex(tmp_path / "other")
    assert "already indexed with a different config_key" in dict(report.skipped)[str(other)]
    before.check()

    # The claim made in place: the run's own id.json replaced by the other one's.
    shutil.copy(other / "id.json", run.local_directory() / "id.json")
    before = Unchanged(project / "storage")
    report = Index.get().reindex(full=True)
    assert "already indexed" in dict(report.skipped)[str(run.local_directory())]
    before.check()  # the indexed row (the only consistent copy) is kept
    assert Index.get().find(run.uuid) is not None


# 3. Config values: not JSON, NaN/inf, enormous, deeply nested.

NOT_JSON = {
    "object()": {"obj": object()},
    "a lambda": {"obj": lambda: 1},
    "a module object": {"obj": sys},
    "bytes that are not UTF-8": {"raw": b"\xff\xfe\x00"},
    "a lock": {"obj": threading.Lock()},
    "an exception inside a list": {"payload": [ConfigError("x")]},
}


@pytest.mark.parametrize("case", list(NOT_JSON))
def test_config_values_that_are_not_json_are_refused(project: Path, case: str) -> None:
    launch_odd(project)
    before = Unchanged(project / "storage")
    with pytest.raises(ConfigError) as caught:
        get("odd", NOT_JSON[case]).launch()
    assert "'odd'" in str(caught.value)
    assert "JSON" in str(caught.value) or "invalid config" in str(caught.value)
    before.check()


NOT_FINITE = {
    "nan": {"x": math.nan},
    "inf": {"x": math.inf},
    "-inf as a string": {"x": "-inf"},
    "nan as a string": {"x": "NaN"},
    "inf in a list": {"xs": [1.0, 2.0, math.inf]},
    "nan in an Any payload": {"payload": {"deep": [{"v": math.nan}]}},
    "nan in the predicate": {"poison_predicate": True},
}


@pytest.mark.parametrize("case", list(NOT_FINITE))
def test_nan_and_infinity_are_refused_and_nothing_is_written(project: Path, case: str) -> None:
    launch_odd(project)
    before = Unchanged(project / "storage")
    with pytest.raises(ConfigError) as caught:
        get("odd", NOT_FINITE[case]).launch()
    message = str(caught.value)
    assert "nan" in message.lower() or "inf" in message.lower()
    assert "NaN and infinities" in message
    before.check()


def test_an_enormous_config_works(sqlite_project: Path) -> None:
    project = sqlite_project
    xs = [i / 7 for i in range(200_000)]
    write_module(project, "odd", ODD)
    run = get("odd", {"xs": xs})
    run.launch()
    assert run.load_file("xs.json") == {"n": 200_000}
    assert get("odd", {"xs": xs[:-1] + [1.0]}).uuid != run.uuid
    model = json.loads((run.local_directory() / "model.json").read_text())
    assert model["config"]["xs"] == xs and model["canonical"]["xs"] == xs
    assert Index.get().find(run.uuid).config["xs"] == xs
    assert get("odd", {"xs": list(xs)}).cached()  # the same run, named again


def test_a_config_nested_too_deeply_is_refused_clearly(project: Path) -> None:
    write_module(project, "odd", ODD)

    def nested(depth: int) -> Any:
        value: Any = 1
        for _ in range(depth):
            value = {"a": value}
        return value

    run = get("odd", {"payload": nested(40)}).launch()  # deep but sane: fine
    before = Unchanged(project / "storage")
    deep_list: Any = []
    for _ in range(5000):
        deep_list = [deep_list]
    for version in (
        {"payload": nested(5000)},
        {"payload": deep_list},
        [{"x": 1.0}, {"payload": [1, nested(200)]}],
        {"payload." + ".".join(["a"] * 3000): 1},  # dotted keys nest too
    ):
        with pytest.raises(ConfigError, match="nested more than 100 levels"):
            get("odd", version)
    before.check()
    assert run.cached()


# 4. Unicode, astral-plane and odd characters in configs and file names.

STRANGE = "résumé 😀 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u2028 \u202e ∑ \t \\ \" ' 中文 \U0010fffd"


def test_unicode_and_astral_strings_round_trip(project: Path) -> None:
    write_module(project, "odd", ODD)
    version = {"text": STRANGE, "names": {"ключ😀": "𝄞", "e\u0301": "é"}}
    run = get("odd", version).launch()
    files = {
        "résumé/😀.txt": "naïve 😀 𝄞",
        "données/😀.json": {"😀": ["𝔘", STRANGE]},
        "e\u0301/é.txt": "two spellings of é are two names",
    }
    for name, data in files.items():
        run.save_file(name, data)
    for name, data in files.items():
        assert run.load_file(name) == data
    assert (run.local_directory() / "résumé" / "😀.txt").read_text() == "naïve 😀 𝄞"
    assert run.config.text == STRANGE and run.config.names["ключ😀"] == "𝄞"

    # A fresh process names the same run and reads the same files.
    code = f"""
        from machinable import get
        run = get("odd", {version!r})
        assert run.cached()
        print(run.uuid)
        print(run.load_file("résumé/😀.txt") == "naïve 😀 𝄞", run.load_file("données/😀.json")["😀"][1] == {STRANGE!r})
    """
    out = run_python(code, project).stdout.split()
    assert out == [run.uuid, "True", "True"]

    # The index, rebuilt from the directories, holds the same config.
    record = Index.get().find(run.uuid)
    with Index.get().engine.begin() as conn:
        conn.execute(delete(Location.__table__))
        conn.execute(delete(Run.__table__))
    Index.get().reindex()
    assert Index.get().find(run.uuid).config == record.config
    assert Index.get().find(run.uuid).config["text"] == STRANGE


def test_lone_surrogates_in_a_config_are_refused(project: Path) -> None:
    run = launch_odd(project)
    before = Unchanged(project / "storage")
    for version in ({"text": "a\udc80b"}, {"names": {"\ud800": "x"}}, {"payload": ["ok", "\udfff"]}):
        with pytest.raises(ConfigError, match="surrogate"):
            get("odd", version).launch()
    before.check()  # no half-made directory is left behind
    assert run.cached()


def test_nul_characters_in_a_config_are_refused(project: Path) -> None:
    """SQLite would store them, PostgreSQL cannot: refused everywhere, before computing."""
    run = launch_odd(project)
    before = Unchanged(project / "storage")
    for version in ({"text": "a\x00b"}, {"names": {"k\x00": "x"}}, {"payload": {"deep": ["\x00"]}}):
        with pytest.raises(ConfigError, match="NUL character"):
            get("odd", version).launch()
    before.check()
    assert run.cached()


# 5. Path traversal: file names, module names, remote names; symlinks out of a record.

ESCAPING_FILE_NAMES = [
    "../escape.txt",
    "../../escape.txt",
    "a/../../escape.txt",
    "sub/../../../escape.txt",
    "..",
    ".",
    "./",
    "",
    "/tmp/escape.txt",
    "//escape.txt",
    "\\escape.txt",
    "nul\x00.txt",
    "id.json",
    "./model.json",
    ".machinable",
    "finished_at",
    "failed_at/x",
]


def test_path_traversal_in_file_names_is_refused(project: Path, tmp_path: Path) -> None:
    run = get("optimize", {"lr": 0.5}).launch()
    before = Unchanged(tmp_path)  # the project, its storage and everything beside them
    for name in ESCAPING_FILE_NAMES:
        with pytest.raises(PathEscapeError) as caught:
            run.save_file(name, "escaped")
        assert isinstance(caught.value, MachinableError)
        assert repr(name) in str(caught.value), name
        with pytest.raises(PathEscapeError):
            run.load_file(name)
    before.check()
    assert not list(tmp_path.rglob("escape.txt"))
    assert run.loss() == pytest.approx(1 / 51)


def test_symlinks_inside_a_record_that_point_outside_are_not_followed(project: Path, tmp_path: Path) -> None:
    run = get("optimize", {"lr": 0.5}).launch()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    directory = run.local_directory()
    (directory / "leak.txt").symlink_to(outside / "secret.txt")
    (directory / "leakdir").symlink_to(outside)
    (directory / "relative.txt").symlink_to(Path("..") / ".." / ".." / "outside" / "secret.txt")
    before = Unchanged(outside, project / "storage")
    for name in ("leak.txt", "leakdir/secret.txt", "leakdir/new.txt", "relative.txt"):
        with pytest.raises(PathEscapeError, match="outside the run directory"):
            run.load_file(name)
        with pytest.raises(PathEscapeError):
            run.save_file(name, "overwritten")
    before.check()
    assert (outside / "secret.txt").read_text() == "secret"


EVIL = """
from pathlib import Path
Path(__file__).with_name("IMPORTED").write_text("evil ran")
from machinable import Interface


class Evil(Interface):
    pass
"""

ESCAPING_MODULE_NAMES = ["../evil", "a/b", "/tmp/evil", "..evil", "evil/", "", " evil", "os.path", "sys", "json", "evil.py", "1evil"]


def test_module_names_that_escape_the_project_are_refused(project: Path, tmp_path: Path) -> None:
    get("optimize", {"lr": 0.5}).launch()
    write_module(tmp_path, "evil", EVIL)  # beside the project, never inside it
    modules_before = set(sys.modules)
    before = Unchanged(tmp_path)
    for name in ESCAPING_MODULE_NAMES:
        with pytest.raises(ModuleResolutionError) as caught:
            get(name)
        assert repr(name) in str(caught.value), name
    before.check()
    assert not (tmp_path / "IMPORTED").exists()
    assert not any("evil" in m for m in set(sys.modules) - modules_before)


PROVIDER = """
from machinable import Project


class Study(Project):
    def on_resolve_remotes(self):
        return {{{name!r}: "file+{source}"}}
"""


@pytest.mark.parametrize("name", ["../evil", "a/b", "os.path", "..", "evil.py", "import", ""])
def test_remote_names_that_escape_are_refused(project: Path, tmp_path: Path, name: str) -> None:
    from machinable.project import forget_imports

    get("optimize", {"lr": 0.5}).launch()
    write_module(tmp_path, "evil", EVIL)
    (project / "interface").mkdir()
    (project / "interface" / "project.py").write_text(PROVIDER.format(name=name, source=tmp_path / "evil.py"))
    forget_imports()
    before = Unchanged(tmp_path)
    try:
        with pytest.raises(RemoteError) as caught:
            fetch_all(project, {name: f"file+{tmp_path / 'evil.py'}"})
        assert repr(name) in str(caught.value)
        with pytest.raises(RemoteError):
            remote_path(project, name)
        with pytest.raises((ModuleResolutionError, RemoteError)):
            get(name)
    finally:
        forget_imports()
    before.check()
    assert not (tmp_path / "IMPORTED").exists()


# 6. The index file itself: not SQLite, or newer than the code.


def test_an_index_that_is_not_sqlite_is_refused_and_left_alone(sqlite_project: Path) -> None:
    project = sqlite_project
    get("optimize", {"lr": 0.5}).launch()
    index_file = project / ".machinable.sqlite"
    dispose_all()
    real = index_file.read_bytes()
    for garbage in (b"PK\x03\x04 a zip, not a database" + bytes(range(256)) * 64, real[:2048] + b"\x00" * 100):
        for suffix in ("-wal", "-shm"):
            Path(f"{index_file}{suffix}").unlink(missing_ok=True)
        index_file.write_bytes(garbage)
        before = Unchanged(project / "storage", index=False)
        for action in (
            lambda: get("optimize", {"lr": 0.7}).launch(),
            lambda: Index.get().reindex(),
            lambda: Index.get().ingest_directory(project / "storage" / os.listdir(project / "storage")[0]),
            lambda: Index.get().count(),
        ):
            with pytest.raises(IndexError_) as caught:
                action()
            assert str(index_file) in str(caught.value)
            dispose_all()
        assert index_file.read_bytes() == garbage
        before.check()


def _raw_rows(url: str) -> list[tuple]:
    """Runs, locations and the revision, read with a plain engine (no migration check)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [
                tuple(row)
                for table in ("runs", "locations", "alembic_version")
                for row in sorted(conn.execute(text(f"SELECT * FROM {table}")).all(), key=repr)
            ]
    finally:
        engine.dispose()


def test_an_index_newer_than_the_code_is_refused_and_left_alone(project: Path) -> None:
    run = get("optimize", {"lr": 0.5}).launch()
    url = index_url(project)
    index_file = project / ".machinable.sqlite"
    dispose_all()
    if postgres_schema(url) is None:  # the SQLite file, stamped with plain sqlite3
        with sqlite3.connect(index_file) as conn:
            conn.execute("UPDATE alembic_version SET version_num = 'ffff9999'")
        conn.close()
    else:  # a PostgreSQL schema, stamped through SQLAlchemy
        engine = create_engine(url)
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = 'ffff9999'"))
        engine.dispose()
    stored_rows = _raw_rows(url)
    assert ("ffff9999",) in stored_rows
    digest = index_file.read_bytes() if postgres_schema(url) is None else None
    before = Unchanged(project / "storage", index=False)
    for action in (
        lambda: get("optimize", {"lr": 0.7}).launch(),
        lambda: Index.get().reindex(),
        lambda: Index.get().ingest_directory(run.local_directory()),
        lambda: Index.get().find(run.uuid),
    ):
        with pytest.raises(IndexNewerThanCode, match="ffff9999"):
            action()
        dispose_all()
    if digest is not None:
        assert index_file.read_bytes() == digest
    assert _raw_rows(url) == stored_rows
    before.check()


# 7. Fuzzing the header parsers.

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)
DELETE = object()
mutations = st.lists(
    st.tuples(
        st.sampled_from(["id", "model"]),
        st.sampled_from(sorted({*HEADER_KEYS, *MODEL_KEYS, "junk"})),
        st.just(DELETE) | json_values,
    ),
    min_size=1,
    max_size=3,
)


def mutate(header: dict, model: dict, changes: list, reseal: bool) -> tuple[dict, dict]:
    header, model = dict(header), dict(model)
    for which, key, value in changes:
        target = header if which == "id" else model
        if value is DELETE:
            target.pop(key, None)
        else:
            target[key] = value
    if reseal:  # recompute the uuid so the record passes the hash check
        try:
            header["uuid"] = compute_uuid(
                str(header.get("project")), str(header.get("module")), model.get("canonical"), model.get("predicate")
            )
        except Exception:
            pass
    return header, model


@settings(max_examples=400, deadline=None)
@given(header=json_values, model=json_values, changes=mutations, reseal=st.booleans(), name=st.text(max_size=40))
def test_validate_headers_never_raises(header, model, changes, reseal, name) -> None:
    for h, m in ((header, model), mutate(*headers_for(7)[1:], changes, reseal)):
        for directory_name in (None, name, h.get("uuid") if isinstance(h, dict) else None):
            problem = validate_headers(h, m, directory_name if isinstance(directory_name, str) else None)
            assert problem is None or (isinstance(problem, str) and problem)
            if problem is None:
                assert all(isinstance(h[k], str) for k in ("uuid", "project", "module", "config_key"))
                assert isinstance(m["config"], dict) and isinstance(m["canonical"], dict)


SPECIAL = [
    b"",
    b"null",
    b"[" * 50_000,
    b"{" * 50_000,
    b'{"a": ' * 3000,
    b"\xef\xbb\xbf{}",
    b'{"uuid": "\\ud800"}',
    b"1e999999",
    b"NaN",
    json.dumps({"x": 1}).encode("utf-16"),
    b"\x00" * 64,
]


def encodings(value: Any) -> st.SearchStrategy[bytes]:
    text = json.dumps(value, allow_nan=True)
    return st.one_of(
        st.just(text.encode()),
        st.just(json.dumps(value, allow_nan=True, ensure_ascii=False).encode("utf-8", "surrogatepass")),
        st.integers(0, max(len(text) - 1, 0)).map(lambda k: text.encode()[:k]),
        st.tuples(st.integers(0, max(len(text) - 1, 0)), st.binary(min_size=1, max_size=3)).map(
            lambda t: text.encode()[: t[0]] + t[1] + text.encode()[t[0] + 1 :]
        ),
        st.binary(max_size=120),
        st.sampled_from(SPECIAL),
    )


@st.composite
def record_dirs(draw: st.DrawFn) -> dict[str, Any]:
    uuid, header, model = headers_for(draw(st.integers(0, 3)))
    header, model = mutate(header, model, draw(mutations), draw(st.booleans())) if draw(st.booleans()) else (header, model)
    name = header.get("uuid") if isinstance(header.get("uuid"), str) and is_uuid(header["uuid"]) else uuid
    if draw(st.integers(0, 9)) == 0:  # a directory named after another uuid
        name = draw(st.sampled_from(["f" * 32, "0" * 32]))
    files: dict[str, Any] = {}
    files["id.json"] = draw(encodings(header) | st.just(None))
    files["model.json"] = draw(encodings(model) | st.just(None))
    files[".machinable"] = draw(st.sampled_from([b"", None, b"junk"]))
    for marker in ("started_at", "finished_at", "failed_at", "updated_at"):
        files[marker] = draw(st.sampled_from([None, None, STAMP.encode(), b"yesterday", b"\xff\xfe", b"9999-99-99", "dir"]))
    return {"name": name, "files": files}


@pytest.fixture
def fuzz_index(sqlite_project: Path):
    index = Index(sqlite_project / "fuzz.sqlite")
    index.count()
    return index, sqlite_project / "fuzz-storage"


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(record=record_dirs())
def test_fuzzed_record_directories_never_crash_the_parsers(fuzz_index, record) -> None:
    index, storage = fuzz_index
    shutil.rmtree(storage, ignore_errors=True)
    directory = storage / record["name"]
    directory.mkdir(parents=True)
    for file, content in record["files"].items():
        if content == "dir":
            (directory / file).mkdir()
        elif content is not None:
            (directory / file).write_bytes(content)

    def clear() -> None:
        with index.engine.begin() as conn:
            conn.execute(delete(Location.__table__))
            conn.execute(delete(Run.__table__))

    clear()
    try:
        header, _, _ = read_record(directory)
        valid = True
    except RecordError as exc:
        valid = False
        assert str(exc)
    if valid:
        found = index.ingest_directory(directory)
        assert found.uuid == header["uuid"] == record["name"]
    else:
        with pytest.raises(RecordError):
            index.ingest_directory(directory)
    clear()
    report = index.reindex(storage, full=True)
    skipped = dict(report.skipped)
    if valid:
        assert report.added == 1 and not skipped
        assert index.find(record["name"]) is not None
    else:
        assert skipped[str(directory)].strip()
        assert report.added == 0 and index.count() == 0
