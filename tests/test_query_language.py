"""The string form of search expressions (issue 14): any string either parses or fails
with a QueryError naming the position; nothing else escapes, not from the parser and not
from running what it parsed against a real index. Expressions round-trip, quotes can be
escaped, and the size limits sit below what SQLite and PostgreSQL accept."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from machinable import Index, get
from machinable.catalog.query import (
    MAX_DEPTH,
    MAX_QUERY_LENGTH,
    MAX_TERMS,
    And,
    Compare,
    Field,
    Not,
    Or,
    parse,
)
from machinable.errors import QueryError

from conftest import write_module

FIELDS = ["config.lr", "config.a.b", "config.name", "config.0", "predicate.seed", "status", "module", "uuid", "created_at"]
WORDS = FIELDS + ["lr", "config", "config.", "and", "or", "not", "in", "contains", "true", "false", "null", "none", "adam"]
OPERATORS = ["=", "==", "!=", "<", "<=", ">", ">=", "(", ")", "[", "]", ","]
VALUES = ["1", "-1", "0.5", ".5", "1e3", "-2E-3", "1e999", "123456789012345678901234567890", "9223372036854775807",
          "9223372036854775808", "-9223372036854775808", "'a'", '"b"', "'it\\'s'", '"a\\"b"', "'\\u00e9'", "'\\ud800'",
          "'\\x'", "'open", '"', "'\\", "'2026-01-31T12:00'"]


def check_error(text: str, exc: QueryError) -> None:
    assert exc.position is not None, f"{text!r}: {exc} names no position"
    assert 0 <= exc.position <= len(text), (text, exc.position)
    assert f"position {exc.position}" in str(exc)


def parses_or_names_the_position(text: str) -> None:
    try:
        parse(text)
    except QueryError as exc:
        check_error(text, exc)


@settings(max_examples=500, deadline=None)
@given(st.text())
def test_any_string_parses_or_fails_naming_the_position(text: str) -> None:
    parses_or_names_the_position(text)


token = st.one_of(
    st.sampled_from(WORDS),
    st.sampled_from(OPERATORS),
    st.sampled_from(VALUES),
    st.text(alphabet=string.printable, max_size=3),
)
spacing = st.sampled_from(["", " ", "  ", "\t", "\n", "\u00a0", "\u3000"])


@st.composite
def token_soup(draw: st.DrawFn) -> str:
    tokens = draw(st.lists(token, max_size=25))
    return "".join(draw(spacing) + item for item in tokens) + draw(spacing)


@settings(max_examples=1000, deadline=None)
@given(token_soup())
def test_token_soup_parses_or_fails_naming_the_position(text: str) -> None:
    parses_or_names_the_position(text)


# Round trip: render generated expressions and parse them back.

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12),
)
fields = st.one_of(
    st.sampled_from(FIELDS),
    st.lists(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}|[0-9]{1,3}", fullmatch=True), min_size=1, max_size=3).map(
        lambda parts: "config." + ".".join(parts)
    ),
)
comparisons = st.one_of(
    st.builds(Compare, fields, st.sampled_from(["==", "!=", "<", "<=", ">", ">="]), scalars),
    st.builds(Compare, fields, st.just("in"), st.lists(scalars, min_size=1, max_size=4).map(tuple)),
    st.builds(Compare, fields, st.just("contains"), scalars),
)
expressions = st.recursive(
    comparisons,
    lambda inner: st.one_of(
        st.builds(Not, inner),
        st.lists(inner, min_size=2, max_size=4).map(lambda items: And(tuple(items))),
        st.lists(inner, min_size=2, max_size=4).map(lambda items: Or(tuple(items))),
    ),
    max_leaves=12,
)


def render_value(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    quote = "'" if "'" not in str(value) or '"' in str(value) else '"'
    return quote + str(value).replace("\\", "\\\\").replace(quote, "\\" + quote) + quote


def render(expr: object) -> str:
    if isinstance(expr, Compare):
        if expr.op == "in":
            return f"{expr.field} in ({', '.join(render_value(v) for v in expr.value)})"
        op = "contains" if expr.op == "contains" else expr.op
        return f"{expr.field} {op} {render_value(expr.value)}"
    if isinstance(expr, Not):
        return f"not ({render(expr.item)})"
    joiner = " and " if isinstance(expr, And) else " or "
    return joiner.join(f"({render(item)})" for item in expr.items)  # type: ignore[attr-defined]


def nesting(expr: object) -> int:
    if isinstance(expr, Not):
        return 1 + nesting(expr.item)
    if isinstance(expr, (And, Or)):
        return 1 + max(nesting(item) for item in expr.items)
    return 0


@settings(max_examples=200, deadline=None)
@given(expressions)
def test_rendered_expressions_parse_back_to_themselves(expr: object) -> None:
    text = render(expr)
    if nesting(expr) > MAX_DEPTH:
        return
    assert parse(text) == expr


# Parsed expressions against a real index: a result, or a QueryError; nothing else.

MIXED = """
from pydantic import BaseModel
from machinable import Interface


class Mixed(Interface):
    class Config(BaseModel):
        lr: float | str | bool | None | list[int] = 0.1
        name: str = "adam"
        a: dict = {}

    def __call__(self):
        pass
"""


@pytest.fixture
def small_index(project: Path) -> Index:
    write_module(project, "mixed", MIXED)
    for config in ({}, {"lr": "fast"}, {"lr": True}, {"lr": None}, {"lr": [1, 2]}, {"a": {"b": 3}}, {"name": "sgd"}):
        get("mixed", config).launch()
    return Index.get()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(token_soup(), expressions.map(render)))
def test_parsed_expressions_run_or_fail_as_query_errors(small_index: Index, text: str) -> None:
    try:
        expr = parse(text)
    except QueryError as exc:
        check_error(text, exc)
        return
    try:
        small_index.search(expr)
        small_index.count(text, module="mixed")
    except QueryError:
        pass  # a type mismatch (status = 1, booleans with <): named by the compiler


# The limits: what the parser accepts, both backends run.


def _shapes(terms: int, depth: int) -> list[str]:
    atom = "config.name contains 'a'"
    half = depth // 2  # these shapes nest two levels per unit
    return [
        " and ".join(["config.lr != 1"] * terms),
        " and ".join(["config.lr > 1"] * terms),
        " or ".join([atom] * terms),
        "config.lr in (" + ", ".join(str(i) for i in range(terms)) + ")",
        "uuid in (" + ", ".join(f"'{i:032x}'" for i in range(terms)) + ")",
        "not " * depth + atom,
        f"({atom} and ({atom} or " * half + atom + "))" * half,
        f"not ({atom} and " * half + atom + ")" * half,
    ]


def test_the_limits_are_accepted_by_the_database_and_one_more_is_refused(project: Path) -> None:
    write_module(project, "mixed", MIXED)
    get("mixed", {"lr": "fast"}).launch()
    index = Index.get()
    for where in _shapes(MAX_TERMS, MAX_DEPTH):
        assert len(where) <= MAX_QUERY_LENGTH
        # SQLite and PostgreSQL run the largest accepted expressions, as a count, a page
        # in some order and a whole search (each compiles them differently)
        index.count(where)
        index.search(where, order_by="-config.lr", limit=10)
        index.search(where)
    for where in _shapes(MAX_TERMS + 1, MAX_DEPTH + 2):
        with pytest.raises(QueryError, match="more than|deeper than") as info:
            parse(where)
        check_error(where, info.value)


def test_quotes_escapes_and_numbers() -> None:
    assert parse('config.s = "a\\"b"') == Compare("config.s", "==", 'a"b')
    assert parse("config.s = 'it\\'s'") == Compare("config.s", "==", "it's")
    assert parse("config.s = 'back\\\\slash'") == Compare("config.s", "==", "back\\slash")
    assert parse("config.s = '\\u00e9\\n'") == Compare("config.s", "==", "é\n")
    assert parse("config.n = -9223372036854775808") == Compare("config.n", "==", -(2**63))
    for text, message, position in [
        ('config.lr = "a\\"b', "unterminated string", 12),
        ("config.s = 'a\\qb'", "unknown escape \\q", 13),
        ("config.s = '\\ud800'", "lone surrogate", 12),
        ("config.n = 9223372036854775808", "64 bits", 11),
        ("config.n = " + "9" * 5000, "64 bits", 11),
        ("config.n = 1e400", "too large", 11),
        ("config.lr > ", "end of", 12),
        ("config.lr = 1 config.lr = 2", "unexpected", 14),
        ("config.lr ~ 1", "cannot parse", 10),
        ("", "empty", 0),
        ("x" * (MAX_QUERY_LENGTH + 1), "limit", MAX_QUERY_LENGTH),
    ]:
        with pytest.raises(QueryError) as info:
            parse(text)
        assert message in str(info.value), (text, str(info.value))
        assert info.value.position == position, (text, str(info.value))


# Expressions built in Python (Field, &, |, ~, a dict) are held to the same limits at
# the same boundary: one QueryError, never an OverflowError or a RecursionError.


def _wheres(where: object) -> list:
    """Every way the Python API takes a where: Index.search, Index.count, Interface.all."""
    index = Index.get()
    return [
        lambda: index.search(where),
        lambda: index.count(where),
        lambda: list(get("mixed").all(where)),
    ]


def test_a_python_integer_beyond_64_bits_is_a_query_error(project: Path) -> None:
    write_module(project, "mixed", MIXED)
    run = get("mixed", {"lr": 1}).launch()
    for where in (
        Field("config.lr") == 10**30,
        Field("config.lr") < -(10**30),
        Field("config.lr").isin([1, 2**63]),
        (Field("config.name") == "adam") & (Field("config.lr") >= 10**5000),
        {"config.lr": 10**30},
    ):
        for call in _wheres(where):
            with pytest.raises(QueryError, match=r"config\.lr does not fit in 64 bits") as info:
                call()
            assert isinstance(info.value, QueryError)
    # The largest integers that fit are searched, on both backends.
    assert [r.uuid for r in get("mixed").all(Field("config.lr") < 2**63 - 1)] == [run.uuid]
    assert [r.uuid for r in get("mixed").all(Field("config.lr") > -(2**63))] == [run.uuid]


def test_python_expressions_nested_too_deeply_are_a_query_error(project: Path) -> None:
    write_module(project, "mixed", MIXED)
    run = get("mixed", {"name": "sgd"}).launch()
    atom = Field("config.name") == "sgd"
    negated = atom
    for _ in range(5000):
        negated = ~negated
    alternating = atom
    for _ in range(3000):
        alternating = (alternating | (Field("config.lr") == 2)) & atom
    for where, message in (
        (negated, "nested deeper than"),
        (alternating, "nested deeper than"),
        (And((atom,) * (MAX_TERMS + 1)), "more than"),
        (Field("uuid").isin([f"{i:032x}" for i in range(MAX_TERMS + 1)]), "more than"),
    ):
        for call in _wheres(where):
            with pytest.raises(QueryError, match=message):
                call()
    # Up to the limits they run: a loop of & stays one flat And, MAX_DEPTH ~ are accepted.
    chained = atom
    for i in range(MAX_TERMS - 1):
        chained = chained & (Field("config.lr" if i % 2 else "config.name") != i + 0.5)
    assert isinstance(chained, And) and len(chained.items) == MAX_TERMS
    assert [r.uuid for r in get("mixed").all(chained)] == [run.uuid]
    deepest = atom
    for _ in range(MAX_DEPTH):
        deepest = ~deepest
    assert [r.uuid for r in get("mixed").all(deepest)] == [run.uuid]  # an even number of ~
    with pytest.raises(QueryError, match="nested deeper than"):
        get("mixed").all(~deepest)
