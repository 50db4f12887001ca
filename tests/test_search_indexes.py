"""Config filters seek an index with no setup (the leaves table); explicit search indexes
on config paths still work, change no answer and leave the schema check unaffected."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from click.testing import CliRunner
from sqlalchemy import text

from machinable import Index, get
from machinable.catalog.models import Base
from machinable.cli import cli
from machinable.errors import QueryError

from conftest import write_module

SWEEP = """
from pydantic import BaseModel
from machinable import Interface


class Sweep(Interface):
    class Config(BaseModel):
        i: int = 0
        name: str = "a"
"""


def plan(index: Index, where: str) -> str:
    """The database's query plan for a count with this filter."""
    from sqlalchemy import event, func, select

    from machinable.catalog.index import RUNS
    from machinable.catalog.query import compile_expr, parse

    prefix = "EXPLAIN QUERY PLAN " if index.dialect == "sqlite" else "EXPLAIN "

    def explain(conn, cursor, statement, parameters, context, executemany):
        return prefix + statement, parameters

    statement = select(func.count()).select_from(RUNS).where(compile_expr(parse(where), index.dialect))
    with index.engine.connect() as conn:
        if index.dialect == "postgresql":
            conn.exec_driver_sql("SET enable_seqscan = off")  # a tiny table: can the index serve?
        event.listen(conn, "before_cursor_execute", explain, retval=True)
        rows = conn.execute(statement).all()
    return "\n".join(str(row[-1]) if index.dialect == "sqlite" else str(row[0]) for row in rows)


@pytest.mark.filterwarnings("ignore:Skipped unsupported reflection")
def test_a_search_index_serves_config_filters_with_the_same_answers(project: Path):
    write_module(project, "sweep", SWEEP)
    for i in range(30):
        get("sweep", {"i": i, "name": "b" if i % 3 else "a"}).launch()
    index = Index.get()
    queries = ["config.i >= 10 and config.i < 20", "config.i = 7", "config.i > 25 or config.name = 'a'"]
    before = {q: index.count(q) for q in queries}
    assert before == {queries[0]: 10, queries[1]: 1, queries[2]: 13}
    # nothing declared: a range and an equality on a config path seek the leaves index
    for query in queries[:2]:
        assert "ix_leaves_path_kind_" in plan(index, query), plan(index, query)
    assert index.search_indexes() == []

    assert index.add_search_index("config.i") == "ix_search_config_i"
    assert index.add_search_index("config.i") == "ix_search_config_i"  # idempotent
    assert index.search_indexes() == ["ix_search_config_i"]
    assert {q: index.count(q) for q in queries} == before
    assert [r.config["i"] for r in index.search(queries[0], order_by="config.i")] == list(range(10, 20))

    # the schema check ignores search indexes: models and migrations still agree
    with index.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn, opts={"include_object": _include}), Base.metadata) == []

    index.drop_search_index("config.i")
    assert index.search_indexes() == []
    assert {q: index.count(q) for q in queries} == before


def _include(obj, name, type_, reflected, compare_to):
    return not (type_ == "index" and str(name or "").startswith("ix_search_"))


def test_search_index_errors_and_cli(project: Path):
    index = Index.get()
    for bad in ("status", "config", "config.a-b", "lr"):
        try:
            index.add_search_index(bad)
        except QueryError as exc:
            assert repr(bad)[1:-1].split(".")[0] in str(exc) or "search indexes" in str(exc)
        else:
            raise AssertionError(f"{bad} was accepted")
    runner = CliRunner()
    added = runner.invoke(cli, ["index", "add", "config.lr", "predicate.seed"])
    assert added.exit_code == 0, added.output
    listed = runner.invoke(cli, ["index", "list"])
    assert listed.stdout.split() == ["ix_search_config_lr", "ix_search_predicate_seed"]
    bad = runner.invoke(cli, ["index", "add", "nonsense"])
    assert bad.exit_code != 0 and bad.stderr.startswith("Error:")
    with index.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM runs")).scalar() == 0


def bulk_rows(count: int, config, status=lambda k: "finished", uuid=lambda k: f"{k:032x}") -> list[dict]:
    """``count`` runs rows (what ``Index.add_rows`` takes), one second apart."""
    from datetime import datetime, timedelta, timezone

    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    rows = []
    for k in range(count):
        moment = start + timedelta(seconds=k)
        rows.append(dict(
            uuid=uuid(k), project="p", module="m", config_key=f"{k:032x}", predicate_key="p",
            config=config(k), canonical={}, predicate={}, version=[], status=status(k),
            created_at=moment, started_at=moment, finished_at=moment, failed_at=None, updated_at=moment,
        ))
    return rows


@contextmanager
def statements_of(index: Index) -> Iterator[list[tuple[str, Any]]]:
    """Every statement (and its parameters) the index runs inside the block."""
    from sqlalchemy import event

    seen: list[tuple[str, Any]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        seen.append((statement, parameters))

    event.listen(index.engine, "before_cursor_execute", capture)
    try:
        yield seen
    finally:
        event.remove(index.engine, "before_cursor_execute", capture)


def pages_of(seen: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [(s, p) for s, p in seen if "ORDER BY" in s and "LIMIT" in s]


def sqlite_plan(index: Index, statement: str, parameters: Any) -> list[str]:
    """SQLite's plan of the page: the steps inside the page subquery (which picks the
    page's runs) when there is one; outside it, the page's rows are joined and its 100
    sort keys sorted."""
    with index.engine.connect() as conn:
        rows = [tuple(row) for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)]
    inner = {node for node, _, _, detail in rows if detail == "MATERIALIZE page"}
    if not inner:
        return [row[-1] for row in rows]
    for node, parent, _, _ in rows:
        if parent in inner:
            inner.add(node)
    return [detail for node, parent, _, detail in rows if parent in inner]


def test_after_a_bulk_write_a_page_ordered_by_time_walks_its_index(tmp_path: Path):
    """Without statistics SQLite takes ``status = 'finished'`` as selective and sorts
    every finished run to find the newest 100; a bulk write refreshes them, so the page
    walks the created_at index and stops at the limit."""
    index = Index(tmp_path / "bulk.sqlite")
    index.add_rows(bulk_rows(3000, lambda k: {"i": k}, status=lambda k: ("finished", "failed")[k % 2]))
    with statements_of(index) as seen:
        page = index.search("status = 'finished'", order_by="-created_at", limit=100)
    assert [r.config["i"] for r in page] == list(range(2998, 2798, -2))
    ((statement, parameters),) = pages_of(seen)
    steps = sqlite_plan(index, statement, parameters)
    # (ties on the time are put in uuid order a few rows at a time, not by one sort of all)
    assert "USE TEMP B-TREE FOR ORDER BY" not in steps, steps
    assert any("USING INDEX ix_runs_created_at" in step for step in steps), steps


def test_a_page_ordered_by_a_config_path_probes_a_common_filter_run_by_run(tmp_path: Path):
    """Ordered by one config path and filtered on another that most runs pass: the page
    walks the order's leaves and checks the filter per run (stopping at the limit),
    rather than first collecting every run that passes it."""
    index = Index(tmp_path / "walk.sqlite")
    index.add_rows(bulk_rows(5000, lambda k: {"i": k, "lr": (k % 10) / 10}))
    with statements_of(index) as seen:
        page = index.search("config.lr >= 0.5", order_by="-config.i", limit=10)
        ascending = index.search("config.lr >= 0.5", order_by="config.i", limit=10)
    assert [r.config["i"] for r in page] == [4999, 4998, 4997, 4996, 4995, 4989, 4988, 4987, 4986, 4985]
    assert [r.config["i"] for r in ascending] == [5, 6, 7, 8, 9, 15, 16, 17, 18, 19]
    statement, parameters = pages_of(seen)[-1]  # the ascending page comes off the index
    steps = sqlite_plan(index, statement, parameters)
    assert not any("LIST SUBQUERY" in step for step in steps), steps
    assert "USE TEMP B-TREE FOR ORDER BY" not in steps, steps


def test_a_page_in_uuid_order_on_one_selective_path_sorts_the_passing_leaves(tmp_path: Path):
    """A page in uuid order whose filter few runs pass is read off the leaves (the
    passing uuids, sorted), not by probing every run in uuid order until 100 pass; the
    page is the same either way, at any offset."""
    import machinable.catalog.index as catalog_index

    index = Index(tmp_path / "sorted.sqlite")
    index.add_rows(bulk_rows(6000, lambda k: {"i": k, "name": f"n{k % 2}"}, uuid=lambda k: f"{(k * 7919) % 6000:032x}"))
    # 3,000 of 6,000 pass each: enough that probing run by run would be chosen before
    wheres = ["config.name = 'n1'", "config.i >= 1000 and config.i < 4000"]
    with statements_of(index) as seen:
        pages = {(w, o): [r.uuid for r in index.search(w, limit=40, offset=o)] for w in wheres for o in (0, 30, 100)}
        inside = [r.uuid for r in index.search(wheres[0], project="p", module="m", limit=40)]
    statements = [s for s, _ in seen]
    # no statement walked runs probing each one's leaf (a correlated EXISTS)
    assert not any("EXISTS" in s for s in statements), [s for s in statements if "EXISTS" in s]
    for (where, offset), uuids in pages.items():
        expected = sorted(r.uuid for r in index.search(where))[offset : offset + 40]
        assert uuids == expected, (where, offset)
    assert inside == pages[(wheres[0], 0)]
    # and the probing plan, forced, agrees
    catalog_index.SORT_PASSING = 0
    try:
        assert [r.uuid for r in index.search(wheres[0], limit=40, offset=30)] == pages[(wheres[0], 30)]
    finally:
        catalog_index.SORT_PASSING = 10_000


def test_a_page_ordered_by_a_filtered_path_with_many_ties_needs_no_sort(tmp_path: Path):
    """A grid value shared by 1,000 runs: the page walks the index in its own order
    (ties by module, then uuid, in the order's direction) and stops at the limit."""
    index = Index(tmp_path / "ties.sqlite")
    index.add_rows(bulk_rows(3000, lambda k: {"lr": (k % 3) / 10}, status=lambda k: ("finished", "failed")[k % 5 == 0]))
    for order in ("-config.lr", "config.lr"):
        with statements_of(index) as seen:
            page = index.search("config.lr >= 0.1 and status = 'finished'", order_by=order, limit=50)
        assert len(page) == 50 and len({r.config["lr"] for r in page}) == 1
        statement, parameters = pages_of(seen)[-1]
        steps = sqlite_plan(index, statement, parameters)
        assert not any("TEMP B-TREE" in step for step in steps), (order, steps)


def test_rows_added_to_an_empty_index_keep_the_last_of_a_repeated_run(fresh_index):
    """Into an empty index every run is new, so no old leaves are deleted first; a run
    given twice in one call still ends as one run, with the later row's config (and
    only its leaves)."""
    index = fresh_index("empty")
    rows = bulk_rows(3, lambda k: {"i": k})
    later = {**rows[1], "config": {"i": 41}}
    index.add_rows([*rows, later])
    assert index.count() == 3
    assert [r.config["i"] for r in index.search("config.i >= 0", order_by="config.i")] == [0, 2, 41]
    assert index.count("config.i = 1") == 0
    # into a filled index, a repeated run replaces its leaves as before
    index.add_rows([{**rows[0], "config": {"i": 7}}])
    assert [r.config["i"] for r in index.search("config.i >= 0", order_by="config.i")] == [2, 7, 41]


def test_a_dense_probe_is_asked_once_for_a_while(fresh_index, monkeypatch: pytest.MonkeyPatch):
    """Whether many runs pass a filter only picks the plan, so the answer is reused for
    DENSE_TTL seconds per database and test: a second page runs one statement fewer,
    and the pages are the same. Another database asks its own."""
    from machinable.catalog import query

    index = fresh_index("dense")
    index.add_rows(bulk_rows(3000, lambda k: {"i": k, "lr": (k % 10) / 10}))
    other = fresh_index("sparse")
    other.add_rows(bulk_rows(50, lambda k: {"i": k, "lr": (k % 10) / 10}))
    query._DENSE_SEEN.clear()

    def page(on: Index) -> tuple[list[int], int]:
        with statements_of(on) as seen:
            found = [r.config["i"] for r in on.search("config.lr >= 0.5", limit=5)]
        return found, len(seen)

    first, asked = page(index)
    again, reused = page(index)
    assert again == first and reused == asked - 1
    assert page(other)[1] == asked  # its own probe
    monkeypatch.setattr(query, "DENSE_TTL", 0.0)
    assert page(index) == (first, asked)  # expired: asked again
