"""A reindex into an empty index builds most config leaves inside the database
(``catalog.leaves.leaf_sql``) and the rest in Python: the rows must be exactly the ones
``leaf_tuples`` gives, on SQLite and PostgreSQL, for every shape of config, and
searches over them must answer as before."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from machinable import Index
from machinable.catalog.engine import json_serializer
from machinable.catalog.leaves import leaf_tuples, sql_exact
from machinable.identity import compute_uuid, config_key, predicate_key
from machinable.record import dump_json, id_header

from conftest import table_rows, wipe_index

STAMP = "2026-01-01T00:00:00+00:00"

CONFIGS: list[tuple[dict[str, Any], dict[str, Any]]] = [
    # what sweeps look like: flat, short numbers and strings (built in the database)
    ({"lr": 0.1, "depth": 4, "name": "adam", "on": True, "off": False, "none": None, "decay": 1e-05}, {}),
    # objects at any depth, lists (no rows inside them), an empty object, a predicate
    (
        {
            "opt": {"name": "sgd", "betas": [0.9, 0.99], "inner": {"deep": {"x": -3}, "empty": {}}},
            "grid": [1, {"a": 2}],
            "i": 2,
        },
        {"p": {"q": 1}, "r": "s"},
    ),
    # paths at the limit of 255 characters and one past it (with their subtrees)
    ({"k" * 248: 1, "m" * 249: {"x": 1}, "ok": {"y" * 245: 2, "z" * 246: 3, "w" * 240: {"abcd": 4, "abcde": 5}}}, {}),
    # keys that are no identifiers, at the top and inside objects (read in Python)
    ({"bad-key": {"x": 1}, "1abc": 2, "_ok": 3, "": 4, "a.b": {"c": 1}, "ok": {"with space": 1, "fine": 2}}, {}),
    ({"trailing\n": 1, "fine": 2}, {}),
    # strings: long (cut at 500), non-ASCII, quotes, backslashes, control characters
    ({"long": "x" * 600, "utf": "größe ✓ 😀", "quote": 'say "hi"', "slash": "a\\b", "nl": "a\nb", "empty": ""}, {}),
    # numbers a double cannot hold exactly, long ones, exponents, huge integers
    (
        {
            "a": 0.30000000000000004,
            "b": 2.5e-05,
            "c": 1e-06,
            "d": 1e16,
            "e": 1e300,
            "f": -0.0,
            "g": 123456789012345,
            "h": 1234567890123456,
            "j": 2**53 + 1,
            "k": 2**64,
            "l": 10**400,
            "m": 123456.789,
        },
        {},
    ),
    ({"small": 5e-324, "neg": -1.7976931348623157e308, "x": 0.1 + 0.2, "tiny": 1.5e-05}, {"p": 0.7}),
]


def write_records(storage: Path) -> list[str]:
    uuids = []
    for n, (config, predicate) in enumerate(CONFIGS):
        canonical = {"n": n}
        uuid = compute_uuid("study", "trivial", canonical, predicate)
        directory = storage / uuid
        directory.mkdir(parents=True)
        header = id_header(uuid, "study", "trivial", config_key(canonical), predicate_key(predicate))
        model = {
            "module": "trivial",
            "project": "study",
            "config": config,
            "canonical": canonical,
            "version": [canonical],
            "predicate": predicate,
            "created_at": STAMP,
        }
        (directory / "model.json").write_text(dump_json(model))
        (directory / "id.json").write_text(dump_json(header))
        (directory / ".machinable").write_text("")
        (directory / "finished_at").write_text(STAMP)
        uuids.append(uuid)
    return uuids


def test_a_bulk_reindex_builds_the_leaves_python_would(project: Path) -> None:
    # both ways of building leaves are exercised by these configs
    exact = [sql_exact(json_serializer(config), json_serializer(predicate)) for config, predicate in CONFIGS]
    assert any(exact) and not all(exact)
    uuids = write_records(project / "storage")
    expected = sorted(
        (leaf for uuid, (config, predicate) in zip(uuids, CONFIGS, strict=True)
         for leaf in leaf_tuples(uuid, "study", "trivial", config, predicate)),
        key=repr,
    )
    wipe_index(project)
    report = Index.get().reindex()
    assert report.added == len(CONFIGS) and not report.skipped
    assert table_rows("leaves") == expected

    # and searches read them as before: a number, a string cut at 500, a nested path
    index = Index.get()
    assert [run.uuid for run in index.search("config.lr == 0.1", limit=10)] == [uuids[0]]
    assert index.count("config.opt.inner.deep.x < 0") == 1
    assert index.count("config.a == 0.30000000000000004") == 1
    assert index.count(f"config.long == '{'x' * 600}'") == 1
    assert index.count("predicate.p.q == 1") == 1


def test_a_bulk_reindex_builds_leaves_in_batches(project: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Runs spread over several batches and parts, some built in the database and some
    in Python, give the same leaves as one pass."""
    import machinable.catalog.index as catalog_index

    uuids = write_records(project / "storage")
    monkeypatch.setattr(catalog_index, "SCAN_CHUNK", 3)
    monkeypatch.setattr(catalog_index, "WRITE_BATCH", 4)
    wipe_index(project)
    assert Index.get().reindex().added == len(uuids)
    expected = sorted(
        (leaf for uuid, (config, predicate) in zip(uuids, CONFIGS, strict=True)
         for leaf in leaf_tuples(uuid, "study", "trivial", config, predicate)),
        key=repr,
    )
    assert table_rows("leaves") == expected
    # the leaves index, dropped for the bulk load, is there again after the last batch
    from sqlalchemy import inspect

    with Index.get().engine.connect() as conn:
        assert [ix["name"] for ix in inspect(conn).get_indexes("leaves")] == ["ix_leaves_path_kind_number_text"]
    assert Index.get().count("config.depth == 4") == 1


def test_a_run_indexed_by_another_writer_between_two_batches_is_updated(project: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A bulk reindex commits batch by batch; a run that another process indexed in
    between (a launch, an ingest) is updated in place, not inserted twice."""
    import machinable.catalog.index as catalog_index

    uuids = write_records(project / "storage")
    monkeypatch.setattr(catalog_index, "SCAN_CHUNK", 3)
    monkeypatch.setattr(catalog_index, "WRITE_BATCH", 4)
    late = max(uuids)  # names are read in order: this one is in the last batch
    original = Index._scan
    parts = []

    def scan(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        for part in original(self, *args, **kwargs):
            yield part
            parts.append(part)
            if len(parts) == 2:  # the first batch (6 runs >= 4) is committed now
                assert Index.get().count() == 6
                Index.get().ingest_directory(project / "storage" / late)

    monkeypatch.setattr(Index, "_scan", scan)
    wipe_index(project)
    report = Index.get().reindex()
    assert (report.added, report.updated) == (len(uuids) - 1, 1) and not report.skipped
    assert Index.get().count() == len(uuids)
    expected = sorted(
        (leaf for uuid, (config, predicate) in zip(uuids, CONFIGS, strict=True)
         for leaf in leaf_tuples(uuid, "study", "trivial", config, predicate)),
        key=repr,
    )
    assert table_rows("leaves") == expected
    assert len(table_rows("locations")) == len(uuids)
