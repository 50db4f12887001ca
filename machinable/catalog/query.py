"""Search expressions over the index: a Python form and a string form for the CLI.

    Field("config.lr") > 0.1
    (Field("status") == "finished") & Field("config.optimizer.name").isin(["adam", "sgd"])
    parse("config.lr > 0.1 and status = 'finished'")

Config and predicate values are compared by JSON type, identically on SQLite and
PostgreSQL: a number compares only with numbers (numerically, so ``1 == 1.0``), a
string only with strings (byte order), a boolean only with booleans. ``!=`` matches
runs that have a value and a different one. ``== None`` matches a missing or null
value.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import and_, case, exists, false, func, literal, literal_column, not_, or_, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.sql.elements import ColumnElement

from machinable.catalog.engine import json_serializer
from machinable.catalog.leaves import (
    ARRAY,
    FALSE,
    MAX_EXACT,
    MAX_TEXT,
    NULL,
    NUMBER,
    OBJECT,
    STRING,
    TRUE,
    leaf_path,
)
from machinable.catalog.models import Leaf, Run
from machinable.errors import QueryError

RUNS = Run.__table__
LEAVES = Leaf.__table__
TEXT_COLUMNS = ("uuid", "project", "module", "status", "config_key", "predicate_key")
TIME_COLUMNS = ("created_at", "started_at", "finished_at", "failed_at", "updated_at")
JSON_COLUMNS = ("config", "predicate")
OPS = ("==", "!=", "<", "<=", ">", ">=")
_SEGMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$|^[0-9]+$")


class Expr:
    """A search condition; combine with ``&``, ``|`` and ``~``."""

    def __and__(self, other: Expr) -> Expr:
        return And((self, other))

    def __or__(self, other: Expr) -> Expr:
        return Or((self, other))

    def __invert__(self) -> Expr:
        return Not(self)


@dataclass(frozen=True)
class Compare(Expr):
    field: str
    op: str
    value: Any


@dataclass(frozen=True)
class And(Expr):
    items: tuple[Expr, ...]


@dataclass(frozen=True)
class Or(Expr):
    items: tuple[Expr, ...]


@dataclass(frozen=True)
class Not(Expr):
    item: Expr


class Field:
    """A searchable field: a column name or a dotted ``config.`` / ``predicate.`` path."""

    def __init__(self, name: str):
        check_field(name)
        self.name = name

    def __eq__(self, value: Any) -> Compare:  # type: ignore[override]
        return Compare(self.name, "==", value)

    def __ne__(self, value: Any) -> Compare:  # type: ignore[override]
        return Compare(self.name, "!=", value)

    def __lt__(self, value: Any) -> Compare:
        return Compare(self.name, "<", value)

    def __le__(self, value: Any) -> Compare:
        return Compare(self.name, "<=", value)

    def __gt__(self, value: Any) -> Compare:
        return Compare(self.name, ">", value)

    def __ge__(self, value: Any) -> Compare:
        return Compare(self.name, ">=", value)

    def isin(self, values: list[Any] | tuple[Any, ...]) -> Compare:
        return Compare(self.name, "in", tuple(values))

    def contains(self, value: Any) -> Compare:
        return Compare(self.name, "contains", value)

    __hash__ = None  # type: ignore[assignment]


def check_field(name: str) -> tuple[str, tuple[str, ...]]:
    """Split a field into (column, json path), or raise QueryError naming it."""
    if not isinstance(name, str):
        raise QueryError(f"a field name must be a string, not {name!r}")
    head, _, rest = name.partition(".")
    if head in JSON_COLUMNS:
        path = tuple(rest.split(".")) if rest else ()
        if not path or not all(_SEGMENT.match(part) for part in path):
            raise QueryError(
                f"invalid field {name!r}: write a dotted path of identifiers, like {head}.lr"
            )
        return head, path
    if rest or head not in TEXT_COLUMNS + TIME_COLUMNS:
        known = ", ".join(TEXT_COLUMNS + TIME_COLUMNS)
        raise QueryError(f"unknown field {name!r}; use config.<path>, predicate.<path>, or one of {known}")
    return head, ()


# The string form.

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<num>-?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?)
      | (?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
      | (?P<op>==|!=|<=|>=|<|>|=|\(|\)|,|\[|\])
      | (?P<word>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)
    )""",
    re.X,
)
_KEYWORDS = {"and", "or", "not", "in", "contains", "true", "false", "null", "none"}


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    position = 0
    text = text.rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if not match or match.end() == position:
            raise QueryError(f"cannot parse {text[position:].strip()[:30]!r} in {text!r}")
        kind = match.lastgroup or ""
        out.append((kind, match.group(kind)))
        position = match.end()
    return out


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = _tokens(text)
        self.i = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        token = self.peek()
        if token is None:
            raise QueryError(f"unexpected end of {self.text!r}")
        self.i += 1
        return token

    def word(self, value: str) -> bool:
        token = self.peek()
        if token and token[0] == "word" and token[1].lower() == value:
            self.i += 1
            return True
        return False

    def expect(self, value: str) -> None:
        if self.peek() is None:
            raise QueryError(f"expected {value!r} before the end of {self.text!r}")
        kind, text = self.take()
        if text != value:
            raise QueryError(f"expected {value!r} but found {text!r} in {self.text!r}")

    def parse(self) -> Expr:
        expr = self.or_expr()
        if self.peek() is not None:
            raise QueryError(f"unexpected {self.peek()[1]!r} in {self.text!r}")  # type: ignore[index]
        return expr

    def or_expr(self) -> Expr:
        items = [self.and_expr()]
        while self.word("or"):
            items.append(self.and_expr())
        return items[0] if len(items) == 1 else Or(tuple(items))

    def and_expr(self) -> Expr:
        items = [self.not_expr()]
        while self.word("and"):
            items.append(self.not_expr())
        return items[0] if len(items) == 1 else And(tuple(items))

    def not_expr(self) -> Expr:
        if self.word("not"):
            return Not(self.not_expr())
        token = self.peek()
        if token and token[1] == "(":
            self.take()
            expr = self.or_expr()
            self.expect(")")
            return expr
        return self.comparison()

    def comparison(self) -> Expr:
        kind, name = self.take()
        if kind != "word" or name.lower() in _KEYWORDS:
            raise QueryError(f"expected a field name but found {name!r} in {self.text!r}")
        check_field(name)
        if self.word("in"):
            return Compare(name, "in", tuple(self.sequence()))
        if self.word("contains"):
            return Compare(name, "contains", self.value())
        kind, op = self.take()
        if kind != "op" or op not in OPS + ("=",):
            raise QueryError(f"expected a comparison after {name!r} but found {op!r} in {self.text!r}")
        return Compare(name, "==" if op == "=" else op, self.value())

    def sequence(self) -> list[Any]:
        kind, opening = self.take()
        closing = {"(": ")", "[": "]"}.get(opening)
        if closing is None:
            raise QueryError(f"expected '(' after 'in' in {self.text!r}")
        values = [self.value()]
        while self.peek() and self.peek()[1] == ",":  # type: ignore[index]
            self.take()
            values.append(self.value())
        self.expect(closing)
        return values

    def value(self) -> Any:
        kind, text = self.take()
        if kind == "num":
            return float(text) if any(c in text for c in ".eE") else int(text)
        if kind == "str":
            return json.loads('"' + text[1:-1].replace('"', '\\"').replace("\\'", "'") + '"')
        if kind == "word" and text.lower() in ("true", "false"):
            return text.lower() == "true"
        if kind == "word" and text.lower() in ("null", "none"):
            return None
        if kind == "word":
            raise QueryError(f"{text!r} is not a value; quote strings ('{text}') in {self.text!r}")
        raise QueryError(f"expected a value but found {text!r} in {self.text!r}")


def parse(text: str) -> Expr:
    """Parse the string form, e.g. ``"config.lr > 0.1 and status = 'finished'"``."""
    if not isinstance(text, str) or not text.strip():
        raise QueryError("empty search expression")
    return _Parser(text).parse()


def as_expr(where: Expr | str | dict[str, Any] | None) -> Expr | None:
    if where is None or isinstance(where, Expr):
        return where
    if isinstance(where, str):
        return parse(where)
    if isinstance(where, dict):
        items = []
        for key, value in where.items():
            check_field(key)
            items.append(Compare(key, "==", value))
        return And(tuple(items)) if items else None
    raise QueryError(f"where must be an expression, a string or a dict, not {type(where).__name__}")


# Compilation to SQL.
#
# A comparison on a config or predicate path becomes a test on the ``leaves`` rows of
# that path (see catalog/leaves.py): ``runs.uuid IN (SELECT run_uuid FROM leaves WHERE
# path = ... AND <test>)``, which both databases answer by seeking an index. Tests on
# one path joined by ``and`` share one subquery (a run has one leaf per path). What
# leaves cannot decide exactly (values in lists, objects compared whole, ``contains``,
# strings longer than MAX_TEXT, integers beyond 2**53) is answered from the JSON columns.


@dataclass(frozen=True)
class LeafTest:
    """A comparison decided by the leaf row of one path.

    ``test(table)`` is the condition on a leaves table or alias. ``absent``: the run
    matches when it has *no* leaf passing the test (``= null``: missing or null).
    ``kind`` is NUMBER or STRING when the test only passes leaves of that kind and
    compares their ``number`` or ``text`` (what an order by the same path can follow).
    """

    path: str
    test: Any
    absent: bool = False
    kind: str | None = None


def leaf_test(expr: Compare) -> LeafTest | None:
    """The leaf form of a comparison, or None when the JSON columns must answer it."""
    column, path = check_field(expr.field)
    name = leaf_path(column, path) if path else None
    if name is None:
        return None
    if expr.op == "in" and expr.value:
        tests = [leaf_test(Compare(expr.field, "==", value)) for value in expr.value]
        if any(t is None or t.absent for t in tests):
            return None
        return LeafTest(name, lambda t: or_(*(item.test(t) for item in tests)))  # type: ignore[union-attr]
    if expr.op not in OPS:
        return None
    value, op = expr.value, expr.op
    kind = _kind(value)
    if kind == "structure":
        return None
    if kind == "number" and abs(value) >= MAX_EXACT:
        return None
    if kind == "string" and len(value) >= MAX_TEXT:
        return None
    if kind == "null":
        if op == "==":
            return LeafTest(name, lambda t: t.c.kind != NULL, absent=True)
        if op == "!=":
            return LeafTest(name, lambda t: t.c.kind != NULL)
        return None  # an error, raised by the JSON form
    if kind == "bool":
        if op == "==":
            return LeafTest(name, lambda t, k=TRUE if value else FALSE: t.c.kind == k)
        if op == "!=":  # any other value, null included (as the JSON form has it)
            return LeafTest(name, lambda t, k=TRUE if value else FALSE: t.c.kind != k)
        return None
    code, attr = (NUMBER, "number") if kind == "number" else (STRING, "text")
    if op == "!=":
        return LeafTest(name, lambda t: and_(t.c.kind != NULL, not_(and_(t.c.kind == code, t.c[attr] == value))))
    # The other value column is NULL for this kind: saying so lets the database seek the
    # (path, kind, number, text, ...) index on the column compared.
    other = "text" if attr == "number" else "number"
    return LeafTest(
        name, lambda t: and_(t.c.kind == code, t.c[other].is_(None), _apply(t.c[attr], op, value)), kind=code
    )


def _leaf_where(table: Any, path: str, tests: list[LeafTest], scope: int | None) -> list[Any]:
    """Conditions on a leaves table: the path, the tests and, within one module, its scope."""
    where = [table.c.path == path, *(t.test(table) for t in tests)]
    if scope is not None:
        where.append(table.c.scope == scope)
    return where


def _leaf_subquery(path: str, tests: list[LeafTest], scope: int | None) -> Any:
    return select(LEAVES.c.run_uuid).where(*_leaf_where(LEAVES, path, tests, scope))


def _in_leaves(path: str, tests: list[LeafTest], scope: int | None) -> ColumnElement[bool]:
    return RUNS.c.uuid.in_(_leaf_subquery(path, tests, scope))


def _conjuncts(expr: Expr) -> list[Expr]:
    if isinstance(expr, And):
        return [part for item in expr.items for part in _conjuncts(item)]
    return [expr]


def _split(items: list[Expr]) -> tuple[dict[str, list[LeafTest]], list[Expr]]:
    """Positive leaf tests grouped by path, and the rest."""
    groups: dict[str, list[LeafTest]] = {}
    rest: list[Expr] = []
    for item in items:
        test = leaf_test(item) if isinstance(item, Compare) else None
        if test is not None and not test.absent:
            groups.setdefault(test.path, []).append(test)
        else:
            rest.append(item)
    return groups, rest


def compile_expr(expr: Expr, dialect: str, scope: int | None = None) -> ColumnElement[bool]:
    """The SQL condition on ``runs`` for ``expr``. ``scope``: every run searched has this
    ``scope_key`` (the search is within one project and module), so leaf lookups narrow to it."""
    if isinstance(expr, And):
        groups, rest = _split(_conjuncts(expr))
        parts = [_in_leaves(path, tests, scope) for path, tests in groups.items()]
        return and_(*parts, *(compile_expr(item, dialect, scope) for item in rest))
    if isinstance(expr, Or):
        return or_(*(compile_expr(item, dialect, scope) for item in expr.items))
    if isinstance(expr, Not):
        return not_(compile_expr(expr.item, dialect, scope))
    if isinstance(expr, Compare):
        _check_operator(expr)
        test = leaf_test(expr)
        if test is not None:
            inside = _in_leaves(test.path, [test], scope)
            return not_(inside) if test.absent else inside
        return _compare(expr, dialect)
    raise QueryError(f"not a search expression: {expr!r}")


def _check_operator(expr: Compare) -> None:
    if expr.op not in OPS + ("contains", "in"):
        raise QueryError(f"unknown operator {expr.op!r}")


def leaf_count(expr: Expr | None, scope: int | None = None) -> Any:
    """``SELECT count(*)`` over the leaves alone, when ``expr`` is only tests on one path.

    A run has one leaf per path and every leaf has its run, so counting leaves counts
    runs; with ``scope``, the runs of one project and module.
    """
    if expr is None:
        return None
    groups, rest = _split(_conjuncts(expr))
    if rest or len(groups) != 1:
        return None
    ((path, tests),) = groups.items()
    return select(func.count()).select_from(LEAVES).where(*_leaf_where(LEAVES, path, tests, scope))


@dataclass
class Plan:
    """A search's FROM clause, WHERE conditions and ORDER BY, with ordering paths joined."""

    source: Any
    where: list[Any]
    order: list[Any]


_RANK = {NUMBER: 0, STRING: 1, FALSE: 2, TRUE: 3, ARRAY: 4, OBJECT: 5}


def plan(
    expr: Expr | None,
    conditions: list[Any],
    spec: str | list[str] | None,
    dialect: str,
    dense: Callable[[Any], bool] | None = None,
    scope: int | None = None,
    numbers_only: bool = False,
) -> Plan:
    """Compile a search: ``conditions`` (already SQL) and ``expr`` filter, ``spec`` orders.

    A leaf test is applied as ``uuid IN (leaves that pass)`` (the database starts from
    the leaves index: best when few runs pass) unless ``dense(count statement)`` says
    many pass and the search is in uuid order: then as a correlated ``EXISTS`` that
    probes each run's leaf in the order the page is read, stopping at the limit.

    Ordering by a path joins its leaf row. When the filter pins that path to numbers or
    strings (``config.lr > 0.1``), the join is inner and carries the filter, so the
    database walks the (path, kind, number) index in order and stops at the limit.
    Otherwise values sort numbers first, then strings, false, true, lists, objects, and
    runs where the path is missing or null last (first when descending).
    ``numbers_only``: keep only runs with a number at the first (ascending) order path:
    the start of that order, walked along the index (see ``first_order_numbers``).
    """
    items = _conjuncts(expr) if expr is not None else []
    groups, rest = _split(items)
    source: Any = RUNS
    order: list[Any] = []
    joined: set[str] = set()
    for position, (field, descending) in enumerate(_order_specs(spec)):
        column, path = check_field(field)
        name = leaf_path(column, path) if path else None
        if not path:
            key = RUNS.c[column]
            order.append(key.desc() if descending else key.asc())
            continue
        if name is None or name in joined:  # not a leaf path: order by the JSON value
            key = json_value(RUNS.c[column], path, dialect)
            order.append(key.desc() if descending else key.asc())
            continue
        joined.add(name)
        alias = LEAVES.alias(f"order_{position}")
        on = [alias.c.run_uuid == RUNS.c.uuid, *_leaf_where(alias, name, [], scope)]
        tests = groups.get(name, [])
        pinned = next((t.kind for t in tests if t.kind is not None), None)
        if numbers_only and position == 0 and pinned is None:
            tests = tests + [LeafTest(name, lambda t: and_(t.c.kind == NUMBER, t.c.text.is_(None)), kind=NUMBER)]
            pinned = NUMBER
            groups[name] = tests
        if pinned is not None:
            groups.pop(name)
            source = source.join(alias, and_(*on, *(t.test(alias) for t in tests)))
            key = alias.c.number if pinned == NUMBER else alias.c.text
            order.append(key.desc() if descending else key.asc())
            if position == 0:
                # The index's own order, and a total one: later keys never apply.
                order.append(alias.c.run_uuid.asc())
                return _finish(conditions, groups, rest, dialect, dense, scope, joined, source, order)
            continue
        source = source.outerjoin(alias, and_(*on))
        rank = case(_RANK, value=alias.c.kind, else_=6)
        for key in (rank, alias.c.number, alias.c.text):
            order.append(key.desc() if descending else key.asc())
    order.append(RUNS.c.uuid.asc())
    return _finish(conditions, groups, rest, dialect, dense, scope, joined, source, order)


def _finish(
    conditions: list[Any],
    groups: dict[str, list[LeafTest]],
    rest: list[Expr],
    dialect: str,
    dense: Callable[[Any], bool] | None,
    scope: int | None,
    joined: set[str],
    source: Any,
    order: list[Any],
) -> Plan:
    where = list(conditions)
    for path, tests in groups.items():
        probe = _leaf_subquery(path, tests, scope)
        if not joined and dense is not None and dense(probe):
            where.append(
                exists(probe.with_only_columns(literal_column("1")).where(LEAVES.c.run_uuid == RUNS.c.uuid))
            )
        else:
            where.append(RUNS.c.uuid.in_(probe))
    where += [compile_expr(item, dialect, scope) for item in rest]
    return Plan(source, where, order)


def first_order_numbers(expr: Expr | None, spec: str | list[str] | None) -> bool:
    """Does the order start with an ascending leaf path the filter does not pin?

    Numbers sort first there, so a page that numbers fill is the same page as
    ``plan(..., numbers_only=True)`` gives, which the database reads off the index.
    """
    specs = _order_specs(spec)
    if not specs or specs[0][1]:
        return False
    column, path = check_field(specs[0][0])
    name = leaf_path(column, path) if path else None
    if name is None:
        return False
    groups, _ = _split(_conjuncts(expr)) if expr is not None else ({}, [])
    return not any(t.kind is not None for t in groups.get(name, []))


def _order_specs(spec: str | list[str] | None) -> list[tuple[str, bool]]:
    specs = [spec] if isinstance(spec, str) else list(spec or [])
    out = []
    for item in specs:
        if not isinstance(item, str):
            raise QueryError(f"cannot order by {item!r}; write e.g. 'config.lr desc' or '-created_at'")
        text = item.strip()
        descending = text.startswith("-")
        text = text.lstrip("-").strip()
        parts = text.split()
        if len(parts) == 2 and parts[1].lower() in ("asc", "desc"):
            descending = parts[1].lower() == "desc"
            text = parts[0]
        elif len(parts) != 1:
            raise QueryError(f"cannot order by {item!r}; write e.g. 'config.lr desc' or '-created_at'")
        out.append((text, descending))
    return out


def _compare(expr: Compare, dialect: str) -> ColumnElement[bool]:
    column, path = check_field(expr.field)
    if expr.op == "in":
        if not expr.value:
            return false()
        return or_(*(compile_expr(Compare(expr.field, "==", v), dialect) for v in expr.value))
    if expr.op not in OPS + ("contains",):
        raise QueryError(f"unknown operator {expr.op!r}")
    if path:
        return _compare_json(RUNS.c[column], path, expr.op, expr.value, dialect, expr.field)
    col = RUNS.c[column]
    value = expr.value
    if column in TIME_COLUMNS:
        value = _as_time(value, expr.field)
    elif expr.op == "contains":
        if not isinstance(value, str):
            raise QueryError(f"{expr.field} contains needs a string")
        return func.instr(col, value) > 0 if dialect == "sqlite" else func.strpos(col, value) > 0
    elif value is not None and not isinstance(value, str):
        raise QueryError(f"{expr.field} is text; compare it with a quoted string, not {value!r}")
    if value is None:
        if expr.op == "==":
            return col.is_(None)
        if expr.op == "!=":
            return col.is_not(None)
        raise QueryError(f"{expr.field} {expr.op} null is not a comparison")
    return _apply(col if dialect == "sqlite" or column in TIME_COLUMNS else col.collate("C"), expr.op, value)


def _apply(left: Any, op: str, right: Any) -> ColumnElement[bool]:
    if op == "==":
        return left == right
    if op == "!=":
        return left != right
    if op == "<":
        return left < right
    if op == "<=":
        return left <= right
    if op == ">":
        return left > right
    return left >= right


def _as_time(value: Any, field: str) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError as exc:
            raise QueryError(f"{field} needs an ISO time like '2026-01-31T12:00', not {value!r}") from exc
        return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
    raise QueryError(f"{field} needs an ISO time string or a datetime, not {value!r}")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (dict, list, tuple)):
        return "structure"
    raise QueryError(f"cannot compare with {value!r}: use a number, a string, true/false or null")


def _sql_string(text: str) -> Any:
    # Paths are inlined, not bound, so that a search index on the same expression
    # (Index.add_search_index) matches it; check_field only lets identifiers through.
    return literal_column("'" + text.replace("'", "''") + "'")


def json_value(column: Any, path: tuple[str, ...], dialect: str, as_text: bool = False) -> Any:
    """The SQL expression for a value inside a JSON column (what search indexes cover)."""
    if dialect == "sqlite":
        json_path = "$" + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in path)
        return func.json_extract(column, _sql_string(json_path))
    parts = [_sql_string(p) for p in path]
    if as_text:
        return func.jsonb_extract_path_text(column, *parts)
    return func.jsonb_extract_path(column, *parts)


def _compare_json(column: Any, path: tuple[str, ...], op: str, value: Any, dialect: str, field: str) -> ColumnElement[bool]:
    kind = _kind(value)
    extracted = json_value(column, path, dialect)
    if dialect == "sqlite":
        json_path = "$" + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in path)
        typ = func.json_type(column, _sql_string(json_path))
        kinds = {"number": typ.in_(["integer", "real"]), "string": typ == "text"}
        text_value = extracted
    else:
        typ = func.jsonb_typeof(extracted)
        kinds = {"number": typ == "number", "string": typ == "string"}
        text_value = json_value(column, path, dialect, as_text=True).collate("C")
    if kind == "structure":
        # Whole objects and lists compare by value: stored JSON has sorted keys and
        # compact separators on SQLite (see engine.json_serializer); jsonb compares
        # structurally on PostgreSQL.
        if op not in ("==", "!="):
            raise QueryError(f"{field} {op} ...: objects and lists only compare with = and !=")
        if dialect == "sqlite":
            structured = typ.in_(["object", "array"])
            equal = and_(structured, extracted == json_serializer(value))
        else:
            equal = and_(typ.in_(["object", "array"]), extracted == literal(value, JSONB))
        return equal if op == "==" else and_(typ.is_not(None), not_(equal))
    if op == "contains":
        if kind != "string" and kind != "number":
            raise QueryError(f"{field} contains needs a string or a number")
        if dialect == "sqlite":
            json_path = "$" + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in path)
            member = func.json_each(column, json_path).table_valued("value").alias("member")
            in_array = and_(typ == "array", exists(select(1).select_from(member).where(member.c.value == value)))
            substring = and_(typ == "text", func.instr(extracted, str(value)) > 0) if kind == "string" else false()
        else:
            in_array = and_(
                typ == "array", extracted.op("@>")(literal([value], JSONB))
            )
            substring = (
                and_(typ == "string", func.strpos(text_value, str(value)) > 0) if kind == "string" else false()
            )
        return or_(in_array, substring)
    if kind == "null":
        if op == "==":
            return or_(extracted.is_(None), typ == "null")
        if op == "!=":
            return and_(extracted.is_not(None), typ != "null")
        raise QueryError(f"{field} {op} null is not a comparison")
    if kind == "bool":
        if op not in ("==", "!="):
            raise QueryError(f"{field} {op} {str(value).lower()}: booleans only compare with = and !=")
        if dialect == "sqlite":
            matches = typ == ("true" if value else "false")
            present = typ.in_(["true", "false"])
        else:
            matches = and_(typ == "boolean", extracted == literal(bool(value), JSONB))
            present = typ == "boolean"
        return matches if op == "==" else and_(typ.is_not(None), not_(and_(present, matches)))
    if dialect == "sqlite":
        left = extracted if kind == "number" else text_value
    else:
        left = extracted if kind == "number" else text_value
        if kind == "number":
            value = literal(value, JSONB)
    if op == "!=":
        return and_(typ.is_not(None), typ != "null", not_(and_(kinds[kind], left == value)))
    return and_(kinds[kind], _apply(left, op, value))


__all__ = ["Field", "Expr", "parse", "as_expr", "compile_expr", "plan", "leaf_count"]
