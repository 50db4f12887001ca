"""Search over the index: the same answers on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from click.testing import CliRunner
from sqlalchemy import event

from machinable import Field, Index, Scope, get
from machinable.cli import cli
from machinable.errors import QueryError

from conftest import write_module


@contextlib.contextmanager
def executed(index: Index) -> Iterator[list[str]]:
    """The SQL statements ``index`` runs inside the block, lower case, one space apart."""
    statements: list[str] = []

    def capture(conn, cursor, statement, *args):
        statements.append(" ".join(statement.lower().split()))

    event.listen(index.engine, "before_cursor_execute", capture)
    try:
        yield statements
    finally:
        event.remove(index.engine, "before_cursor_execute", capture)


TRAIN = """
from pydantic import BaseModel
from machinable import Interface


class Optimizer(BaseModel):
    name: str = "adam"
    momentum: float = 0.9


class Train(Interface):
    class Config(BaseModel):
        lr: float = 0.1
        layers: int = 2
        tags: list[str] = []
        shuffle: bool = True
        note: str | None = None
        optimizer: Optimizer = Optimizer()

    def __call__(self):
        if self.config.note == "boom":
            raise RuntimeError("boom")
"""

CONFIGS = [
    {"lr": 0.01, "layers": 1, "tags": ["small"], "optimizer": {"name": "sgd"}},
    {"lr": 0.1, "layers": 2},
    {"lr": 0.5, "layers": 4, "tags": ["big", "fast"], "shuffle": False},
    {"lr": 1, "layers": 8, "optimizer": {"name": "sgd", "momentum": 0.5}, "note": "zebra"},
    {"lr": 2.5, "layers": 16, "note": "apple"},
    {"lr": 0.05, "note": "boom"},
]


@pytest.fixture
def runs(project, index_backend):
    write_module(project, "train", TRAIN)
    made = {}
    for config in CONFIGS:
        run = get("train", config)
        try:
            run.launch()
        except RuntimeError:
            pass
        made[config["lr"]] = run
    return made


def lrs(records) -> list[float]:
    return sorted(record.config["lr"] for record in records)


CASES = [
    ("config.lr > 0.1", [0.5, 1, 2.5]),
    ("config.lr >= 0.1", [0.1, 0.5, 1, 2.5]),
    ("config.lr < 0.1", [0.01, 0.05]),
    ("config.lr <= 0.1", [0.01, 0.05, 0.1]),
    ("config.lr == 1", [1]),
    ("config.lr = 1.0", [1]),
    ("config.lr != 1", [0.01, 0.05, 0.1, 0.5, 2.5]),
    ("config.layers in (1, 4, 99)", [0.01, 0.5]),
    ("config.optimizer.name = 'sgd'", [0.01, 1]),
    ("config.optimizer.momentum < 0.9", [1]),
    ("config.tags contains 'big'", [0.5]),
    ("config.note contains 'pp'", [2.5]),
    ("config.note > 'b'", [0.05, 1]),
    ("config.note = null", [0.01, 0.1, 0.5]),
    ("config.note != null", [0.05, 1, 2.5]),
    ("config.shuffle = false", [0.5]),
    ("config.shuffle = true", [0.01, 0.05, 0.1, 1, 2.5]),
    ("status = 'failed'", [0.05]),
    ("status = 'finished' and config.lr > 0.01", [0.1, 0.5, 1, 2.5]),
    ("config.lr < 0.05 or config.lr > 2", [0.01, 2.5]),
    ("not (config.lr < 0.05 or config.lr > 2)", [0.05, 0.1, 0.5, 1]),
    ("config.layers > 2 and (config.optimizer.name = 'sgd' or config.shuffle = false)", [0.5, 1]),
    ("module = 'train' and config.lr > 100", []),
    ("config.lr > 'a'", []),  # a number never compares with a string
    ("config.nosuchkey = 1", []),
]


@pytest.mark.parametrize("where, expected", CASES, ids=[c[0] for c in CASES])
def test_string_filters_agree_on_both_backends(runs, where, expected):
    index = Index.get()
    assert lrs(index.search(where)) == sorted(expected)
    assert index.count(where) == len(expected)


def test_field_expressions_match_the_string_form(runs):
    index = Index.get()
    lr, name = Field("config.lr"), Field("config.optimizer.name")
    assert lrs(index.search((lr > 0.1) & (name == "sgd"))) == [1]
    assert lrs(index.search((lr < 0.02) | ~(Field("config.layers") < 16))) == [0.01, 2.5]
    assert lrs(index.search(Field("config.layers").isin([2, 4]))) == [0.05, 0.1, 0.5]
    assert lrs(index.search({"config.layers": 2, "status": "finished"})) == [0.1]


def test_order_limit_offset_and_all(runs):
    index = Index.get()
    ordered = index.search("status = 'finished'", order_by="config.lr desc")
    assert [r.config["lr"] for r in ordered] == [2.5, 1, 0.5, 0.1, 0.01]
    page = index.search(order_by="-config.layers", limit=2, offset=1)
    assert [r.config["layers"] for r in page] == [8, 4]
    assert [r.config.lr for r in get("train").all("config.lr >= 0.5", order_by="config.lr")] == [0.5, 1, 2.5]
    assert len(get("train").all(limit=3)) == 3
    assert all(isinstance(run.config.lr, float) for run in get("train").all())


def test_a_page_of_records_is_what_find_reads(runs):
    """A page (read as one JSON array on PostgreSQL) holds each run's full record: every
    column, the times as aware datetimes, the directories, exactly as ``find`` gives them."""
    index = Index.get()
    for where, order in [(None, "-config.lr"), ("config.lr >= 0.05", "created_at"), ("config.layers < 8", None)]:
        page = index.search(where, order_by=order, limit=4)
        assert page and all(record == index.find(record.uuid) for record in page)
    records = index.search(order_by="config.lr", limit=10)
    assert [record.status for record in records] == ["finished", "failed", "finished", "finished", "finished", "finished"]
    assert all(record.created_at.tzinfo is not None and record.directories for record in records)
    assert all(record.finished_at is None for record in records if record.status == "failed")


def test_created_time_filters(runs):
    index = Index.get()
    records = index.search(order_by="created_at")
    middle = records[2].created_at.isoformat()
    assert index.count(f"created_at >= '{middle}'") == len(records) - 2
    assert index.count("created_at < '2000-01-01'") == 0


def test_predicate_filters_and_scopes(project, index_backend):
    write_module(project, "train", TRAIN)
    for seed in (1, 2, 3):
        with Scope({"seed": seed}):
            get("train", {"lr": 0.3}).launch()
    index = Index.get()
    assert index.count("predicate.seed >= 2") == 2
    with Scope({"seed": 3}):
        (only,) = get("train").all()
        assert only.predicate == {"seed": 3}
        assert get("train").all("config.lr = 0.3") == [only]


def test_count_reads_no_run_payloads(runs):
    index = Index.get()
    with executed(index) as statements:
        assert index.count("config.lr > 0.1") == 3
    (query,) = [s for s in statements if s.startswith("select count(")]
    assert "runs.version" not in query and "runs.canonical" not in query and "runs.config" not in query


def test_dataframe(runs):
    frame = get("train").all("status = 'finished'", order_by="config.lr").as_dataframe()
    assert list(frame["config.lr"]) == [0.01, 0.1, 0.5, 1, 2.5]
    assert list(frame["config.optimizer.name"])[:1] == ["sgd"]
    assert set(frame["status"]) == {"finished"}


@pytest.mark.parametrize(
    "where, message",
    [
        ("config.lr >", "end of"),
        ("config.lr >> 1", "expected a value"),
        ("lr > 1", "unknown field 'lr'"),
        ("config.lr > 1 and", "end of"),
        ("config.lr = adam", "quote strings"),
        ("config..lr = 1", "cannot parse"),
        ("config.shuffle > true", "booleans only compare"),
        ("(config.lr > 1", "expected ')'"),
        ("status = 1", "quoted string"),
        ("created_at > 'yesterday'", "ISO time"),
    ],
)
def test_bad_expressions_name_the_problem(runs, where, message):
    with pytest.raises(QueryError) as info:
        Index.get().search(where)
    assert message in str(info.value)


def test_cli_where(runs):
    runner = CliRunner()
    result = runner.invoke(
        cli, ["ls", "train", "--where", "config.lr > 0.1 and status = 'finished'", "--order-by", "config.lr"]
    )
    assert result.exit_code == 0, result.output
    assert [line.split()[0] for line in result.stdout.splitlines()[1:-1]] == [
        runs[0.5].uuid,
        runs[1].uuid,
        runs[2.5].uuid,
    ]
    counted = runner.invoke(cli, ["ls", "--count", "-w", "config.optimizer.name = 'sgd'"])
    assert counted.stdout.strip() == "2"
    bad = runner.invoke(cli, ["ls", "--where", "config.lr >"])
    assert bad.exit_code != 0
    assert bad.stderr.startswith("Error:") and len(bad.stderr.strip().splitlines()) == 1


MIXED = """
from typing import Any
from pydantic import BaseModel
from machinable import Interface


class Mixed(Interface):
    class Config(BaseModel):
        v: Any = None
        big: int = 0
        text: str = ""
"""


def row_of(record) -> dict:
    """A ``runs`` row (what ``Index.add_rows`` takes) from an indexed run."""
    return {k: v for k, v in vars(record).items() if k != "directories"}


def test_ordering_by_a_path_of_mixed_kinds_is_the_same_on_both_backends(project, index_backend):
    """Numbers, then strings, false, true, lists, objects (descending: the reverse),
    then null or missing in either direction; a page comes off the index when numbers
    fill it."""
    write_module(project, "mixed", MIXED)
    values = [3, "b", None, True, -1.5, "a", False, [1], {"k": 1}, 10]
    for value in values:
        get("mixed", {"v": value}).launch()
    index = Index.get()
    ordered = [r.config["v"] for r in index.search(order_by="config.v")]
    assert ordered == [-1.5, 3, 10, "a", "b", False, True, [1], {"k": 1}, None]
    descending = [r.config["v"] for r in index.search(order_by="config.v desc")]
    assert descending == list(reversed(ordered[:-1])) + [None]  # null or missing: last either way
    for limit, offset in ((2, 0), (2, 1), (3, 2), (5, 4), (4, 8)):
        page = index.search(order_by="config.v", limit=limit, offset=offset)
        assert [r.config["v"] for r in page] == ordered[offset : offset + limit]
        page = index.search(order_by="-config.v", limit=limit, offset=offset)
        assert [r.config["v"] for r in page] == descending[offset : offset + limit]
    assert [r.config["v"] for r in index.search("config.v >= 0", order_by="-config.v")] == [10, 3]
    assert [r.config.v for r in get("mixed").all("config.v < 'b'", order_by="config.v")] == ["a"]


def test_a_descending_page_walks_the_numbers_unless_a_value_sorts_before_them(project, index_backend):
    """Descending by a path the filter does not pin, a page is read off the leaves index
    (no sort of every run: no rank CASE in any statement) when no run of the search has a
    string, boolean, list or object there; when one has, it comes first."""
    write_module(project, "mixed", MIXED)
    for value in [3, None, -1.5, 10, 7]:
        get("mixed", {"v": value, "big": 1}).launch()
    get("mixed", {"v": "s", "big": 2}).launch()
    index = Index.get()
    with executed(index) as statements:
        page = index.search("config.big = 1", order_by="-config.v", limit=3)
        assert [r.config["v"] for r in page] == [10, 7, 3]
        assert not any("case" in statement for statement in statements)
        page = index.search("config.big = 1", order_by="-config.v", limit=3, offset=3)
        assert [r.config["v"] for r in page] == [-1.5, None]  # the numbers run out: the whole order
        statements.clear()
        page = index.search(order_by="-config.v", limit=3)
        assert [r.config["v"] for r in page] == ["s", 10, 7]
        assert any("case" in statement for statement in statements)


def test_a_repeated_search_reuses_its_statements_but_reads_fresh_rows(project, index_backend, monkeypatch):
    """The same search (any form of where) is planned once while the plan's probes are
    trusted; its rows are read anew each time. Searches that differ only in a value
    Python calls equal (True and 1) are not mistaken for each other."""
    from machinable.catalog import index as index_module
    from machinable.catalog import query

    write_module(project, "mixed", MIXED)
    for value in (1, True, 2):
        get("mixed", {"v": value}).launch()
    index = Index.get()
    searches = [("config.v >= 1", "-config.v"), ({"config.v": 1}, None), (Field("config.v") == True, "config.v")]  # noqa: E712
    first = [[r.uuid for r in index.search(where, order_by=order, limit=10)] for where, order in searches]

    def no_planning(*args, **kwargs):
        raise AssertionError("planned again")

    monkeypatch.setattr(index_module, "plan", no_planning)
    get("mixed", {"v": 3}).launch()
    again = [[r.config["v"] for r in index.search(where, order_by=order, limit=10)] for where, order in searches]
    assert again == [[3, 2, 1], [1], [True]]
    assert [len(uuids) for uuids in first] == [2, 1, 1]
    with pytest.raises(AssertionError, match="planned again"):
        index.search(Field("config.v") == 1, order_by="config.v", limit=10)
    monkeypatch.setattr(query, "DENSE_TTL", 0.0)
    with pytest.raises(AssertionError, match="planned again"):
        index.search("config.v >= 1", order_by="-config.v", limit=10)


PLAIN = """
from pydantic import BaseModel
from machinable import Interface


class Plain(Interface):
    class Config(BaseModel):
        w: int = 0
"""


def test_null_and_missing_values_sort_alike_on_both_backends(project, index_backend):
    """Runs holding null at a path come before runs without the path (ascending), and
    after them descending, on both backends (a missing leaf has no module hash to tie on)."""
    write_module(project, "mixed", MIXED)
    write_module(project, "plain", PLAIN)
    for value, big in ((None, 0), (2, 1), (None, 5)):
        get("mixed", {"v": value, "big": big}).launch()
    for w in (1, 2):
        get("plain", {"w": w}).launch()
    index = Index.get()

    def kinds(records):
        return [r.config.get("v", "missing") for r in records]

    ascending = index.search(order_by="config.v")
    assert kinds(ascending) == [2, None, None, "missing", "missing"]
    descending = index.search(order_by="-config.v")
    assert kinds(descending) == [2, "missing", "missing", None, None]
    assert [r.uuid for r in descending[1:]] == [r.uuid for r in reversed(ascending[1:])]
    for offset in range(5):
        assert [r.uuid for r in index.search(order_by="config.v", limit=2, offset=offset)] == [
            r.uuid for r in ascending[offset : offset + 2]
        ]


def test_a_second_order_key_breaks_ties_when_the_filter_pins_the_first(runs):
    """Filtering on the first order path lets the database walk its index; the later
    keys still decide between runs that tie on it."""
    index = Index.get()
    ordered = index.search("config.layers >= 2", order_by=["config.layers", "-config.lr"])
    assert [(r.config["layers"], r.config["lr"]) for r in ordered] == [(2, 0.1), (2, 0.05), (4, 0.5), (8, 1), (16, 2.5)]
    page = index.search("config.layers <= 4", order_by=["-config.layers", "config.lr"], limit=2, offset=1)
    assert [(r.config["layers"], r.config["lr"]) for r in page] == [(2, 0.05), (2, 0.1)]


def test_runs_that_tie_keep_one_order_whichever_way_the_search_is_answered(project, index_backend):
    """Many runs share each value (a sweep's grid): descending is ascending reversed,
    and a filter that lets the database walk the index orders them as a search that
    sorts does."""
    write_module(project, "mixed", MIXED)
    for big in range(12):
        get("mixed", {"v": big % 3, "big": big}).launch()
    get("mixed", {"v": "x", "big": 99}).launch()
    index = Index.get()
    ascending = [(r.config["v"], r.config["big"]) for r in index.search(order_by="config.v")]
    descending = [(r.config["v"], r.config["big"]) for r in index.search(order_by="-config.v")]
    assert descending == list(reversed(ascending))
    assert [v for v, _ in ascending] == [0] * 4 + [1] * 4 + [2] * 4 + ["x"]
    numbers = [pair for pair in ascending if pair[0] != "x"]
    walked = [(r.config["v"], r.config["big"]) for r in index.search("config.v >= 0", order_by="config.v")]
    assert walked == numbers
    walked = [(r.config["v"], r.config["big"]) for r in index.search("config.v >= 0", order_by="config.v desc")]
    assert walked == list(reversed(numbers))
    # a page at a time, both ways, gives the same runs in the same order
    paged = [r.config["big"] for offset in range(0, 13, 5) for r in index.search(order_by="-config.v", limit=5, offset=offset)]
    assert paged == [big for _, big in descending]


def test_long_strings_and_huge_integers_compare_exactly(project, index_backend):
    """Leaf text keeps 500 characters and numbers are doubles: comparisons those could
    not decide exactly are answered from the stored config, with the same result."""
    from machinable.catalog.leaves import MAX_TEXT

    write_module(project, "mixed", MIXED)
    prefix = "x" * MAX_TEXT
    for name, big in ((prefix + "a", 2**60), (prefix + "b", 2**60 + 1), ("short", 5), (prefix, -(2**62))):
        get("mixed", {"text": name, "big": big}).launch()
    index = Index.get()
    assert index.count(f"config.text = '{prefix}a'") == 1
    assert index.count(f"config.text > '{prefix}a'") == 1
    assert index.count(f"config.text >= '{prefix}'") == 3
    assert index.count(f"config.text < '{prefix}a'") == 2
    assert index.count(f"config.text != '{prefix}b'") == 3
    assert index.count("config.text < 'y'") == 4 and index.count("config.text > 'x'") == 3
    assert index.count(f"config.big = {2**60 + 1}") == 1
    assert index.count(f"config.big > {2**60}") == 1
    assert index.count("config.big > 4") == 3
    assert [r.config["text"] for r in index.search("config.big < 0")] == [prefix]


def test_a_search_within_a_module_sees_only_its_runs(project, index_backend):
    write_module(project, "mixed", MIXED)
    write_module(project, "train", TRAIN)
    for i in range(4):
        get("mixed", {"big": i}).launch()
    get("train", {"lr": 0.5}).launch()
    index = Index.get()
    # the same module and path in another project (known from a store, say)
    index.add_rows([{**row_of(index.find(get("mixed", {"big": 3}).uuid)), "uuid": "f" * 32, "project": "elsewhere"}])
    assert index.count("config.big >= 1") == 4
    assert len(get("mixed").all("config.big >= 1")) == 3
    assert index.count("config.big >= 1", project="elsewhere", module="mixed") == 1
    assert Index.get().count("config.big >= 1", project=project.name, module="mixed") == 3
    assert Index.get().count("config.big >= 1", project=project.name, module="train") == 0
    assert Index.get().count("config.lr = 0.5", project=project.name, module="train") == 1
    assert Index.get().count("config.lr = 0.5", project="elsewhere", module="train") == 0


def test_leaves_follow_their_run(project, index_backend):
    """Rewritten with the run's row (a changed config), deleted with it, rebuilt by reindex."""
    from conftest import table_rows

    write_module(project, "mixed", MIXED)
    run = get("mixed", {"big": 7}).launch()
    index = Index.get()
    assert index.count("config.big = 7") == 1
    row = row_of(index.find(run.uuid))
    index.add_rows([{**row, "config": {**row["config"], "big": 8, "extra": {"deep": "yes"}}}])
    assert index.count("config.big = 7") == 0 and index.count("config.big = 8") == 1
    assert index.count("config.extra.deep = 'yes'") == 1
    before = len(table_rows("leaves"))
    index.reindex(full=True)  # the directory says big = 7 again, and nothing about extra
    assert index.count("config.big = 7") == 1 and index.count("config.extra.deep = 'yes'") == 0
    assert len(table_rows("leaves")) == before - 2
    import shutil

    shutil.rmtree(run.local_directory())
    index.reindex(allow_empty=True)  # its only run is gone: say so, or reindex refuses
    assert index.count() == 0 and table_rows("leaves") == []


def test_all_is_a_lazy_list(project, index_backend):
    """all() reads the index as it is used: len() counts, indexing and slicing fetch
    those runs, iteration goes page by page; it still compares and slices like a list."""
    from machinable.interface import RunList

    write_module(project, "mixed", MIXED)
    made = sorted((get("mixed", {"big": i}).launch() for i in range(25)), key=lambda run: run.uuid)
    uuids = [run.uuid for run in made]
    index = Index.get()
    with executed(index) as statements:
        runs = get("mixed").all()
        assert statements == []  # nothing read yet
        assert len(runs) == 25 and bool(runs)
        assert [s for s in statements if "from runs" in s or "from leaves" in s] == [
            next(s for s in statements if s.startswith("select count("))
        ]  # one count, no run rows
        statements.clear()
        assert runs[0].uuid == uuids[0] and runs[-1].uuid == uuids[-1] and runs[7].uuid == uuids[7]
        assert [run.uuid for run in runs[3:6]] == uuids[3:6]
        assert [run.uuid for run in runs[::10]] == uuids[::10]
        assert isinstance(runs[3:6], RunList)
        assert runs[1].uuid in [run.uuid for run in runs]
        with pytest.raises(IndexError):
            runs[25]
        statements.clear()
        RunList.PAGE = 10
        try:
            assert [run.uuid for run in runs] == uuids
        finally:
            RunList.PAGE = 1000
        pages = [s for s in statements if s.startswith("select runs.uuid, runs.project")]
        assert len(pages) == 3  # 10 + 10 + 5: never more than a page held
    assert runs == made and runs != made[:-1]
    ordered = get("mixed").all(order_by="-config.big", limit=5, offset=2)
    assert len(ordered) == 5 and [run.config.big for run in ordered] == [22, 21, 20, 19, 18]
    assert [run.config.big for run in ordered[1:3]] == [21, 20]
    assert len(get("mixed").all(offset=30)) == 0 and get("mixed").all("config.big > 100") == []
    with pytest.raises(QueryError):
        get("mixed").all("config.big >")
    with pytest.raises(QueryError):
        get("mixed").all(limit=-1)
