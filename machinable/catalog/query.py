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

import dataclasses
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    Text,
    and_,
    case,
    cast,
    exists,
    false,
    func,
    literal,
    literal_column,
    not_,
    or_,
    select,
    type_coerce,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.sql import operators
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
from machinable.catalog.models import Leaf, Location, Run
from machinable.errors import QueryError

RUNS = Run.__table__
LEAVES = Leaf.__table__
LOCATIONS = Location.__table__
TEXT_COLUMNS = ("uuid", "project", "module", "status", "config_key", "predicate_key")
TIME_COLUMNS = ("created_at", "started_at", "finished_at", "failed_at", "updated_at")
JSON_COLUMNS = ("config", "predicate")
OPS = ("==", "!=", "<", "<=", ">", ">=")
MAX_FIELD_LENGTH = 255
_SEGMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$|^[0-9]+$")


class Expr:
    """A search condition; combine with ``&``, ``|`` and ``~``."""

    # ``a & b & c`` is one And of three, not a chain two deep: a condition built in a
    # loop stays flat, as the string form ``a and b and c`` does.
    def __and__(self, other: Expr) -> Expr:
        return And(_items(And, self) + _items(And, other))

    def __or__(self, other: Expr) -> Expr:
        return Or(_items(Or, self) + _items(Or, other))

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


def _items(kind: type, expr: Expr) -> tuple[Expr, ...]:
    return expr.items if type(expr) is kind else (expr,)  # type: ignore[attr-defined]


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
    if len(name) > MAX_FIELD_LENGTH:
        raise QueryError(f"field name {name[:40]!r}... is {len(name)} characters long; the limit is {MAX_FIELD_LENGTH}")
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


# The string form: a hand-written scanner and a recursive-descent parser. Every error
# names the position (0-based) it was found at; size, nesting and term count are limited
# so that no expression can exhaust the interpreter's stack or the database's.

MAX_QUERY_LENGTH = 50_000  # characters: room for 'uuid in (...)' with MAX_TERMS uuids
MAX_DEPTH = 24  # nested parentheses and 'not's: SQLite's parser stack overflows from about 30
MAX_TERMS = 250  # comparisons and 'in' values: SQLite refuses expression trees deeper than 1000
_INT64 = 2**63
_NUMBER = re.compile(r"-?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][-+]?[0-9]+)?")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*")
_OPERATORS = ("==", "!=", "<=", ">=", "<", ">", "=", "(", ")", ",", "[", "]")
_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "/": "/", "n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f"}
_KEYWORDS = {"and", "or", "not", "in", "contains", "true", "false", "null", "none"}


@dataclass(frozen=True)
class _Token:
    kind: str  # num, str, op, word
    text: str  # as written
    position: int
    value: Any = None  # the decoded string or number


def _excerpt(text: str, position: int) -> str:
    if len(text) <= 60:
        return repr(text)
    start = max(0, position - 25)
    return ("..." if start else "") + repr(text[start : position + 25]) + "..."


def _error(text: str, message: str, position: int) -> QueryError:
    return QueryError(f"{message} at position {position} of {_excerpt(text, position)}", position=position)


def _string(text: str, start: int) -> tuple[str, int]:
    """Decode the quoted string opening at ``start``; return it and the index past it."""
    quote = text[start]
    out: list[str] = []
    i = start + 1
    while i < len(text):
        char = text[i]
        if char == quote:
            return "".join(out), i + 1
        if char != "\\":
            out.append(char)
            i += 1
            continue
        escape = text[i + 1 : i + 2]
        if escape in _ESCAPES:
            out.append(_ESCAPES[escape])
            i += 2
        elif escape == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", text[i + 2 : i + 6]):
            code = int(text[i + 2 : i + 6], 16)
            if 0xD800 <= code <= 0xDFFF:
                raise _error(text, f"{text[i : i + 6]!r} is a lone surrogate, not a character", i)
            out.append(chr(code))
            i += 6
        elif escape == "":
            break
        else:
            raise _error(
                text,
                f"unknown escape {text[i : i + 2]} in a string (write \\\\ for a backslash, "
                f"\\{quote} for a quote)",
                i,
            )
    raise _error(text, f"unterminated string: no closing {quote} for the one", start)


def _number(text: str, match: re.Match[str]) -> int | float:
    written = match.group()
    if not any(c in written for c in ".eE"):
        digits = written.lstrip("-").lstrip("0")
        # Bounded before int(): Python refuses to convert more than 4300 digits.
        if len(digits) <= 19 and -_INT64 <= int(written) < _INT64:
            return int(written)
        raise _error(
            text,
            f"the integer {written[:30]}{'...' if len(written) > 30 else ''} does not fit in 64 bits "
            f"(write it as a float, like {written.lstrip('-')[:1]}e{len(digits) - 1})",
            match.start(),
        )
    value = float(written)
    if value in (float("inf"), float("-inf")):
        raise _error(text, f"the number {written[:30]} is too large for a float", match.start())
    return value


def _tokens(text: str) -> list[_Token]:
    out: list[_Token] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char.isspace():
            i += 1
            continue
        if char in "'\"":
            value, end = _string(text, i)
            out.append(_Token("str", text[i:end], i, value))
            i = end
            continue
        number = _NUMBER.match(text, i)
        if number and not _WORD.match(text, number.end()):
            out.append(_Token("num", number.group(), i, _number(text, number)))
            i = number.end()
            continue
        operator = next((op for op in _OPERATORS if text.startswith(op, i)), None)
        if operator is not None:
            out.append(_Token("op", operator, i))
            i += len(operator)
            continue
        word = _WORD.match(text, i)
        if word:
            out.append(_Token("word", word.group(), i))
            i = word.end()
            continue
        raise _error(text, f"cannot parse {text[i : i + 20]!r}", i)
    return out


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = _tokens(text)
        self.i = 0
        self.depth = 0
        self.terms = 0

    def error(self, message: str, token: _Token | None) -> QueryError:
        return _error(self.text, message, token.position if token else len(self.text))

    def peek(self) -> _Token | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, wanted: str) -> _Token:
        token = self.peek()
        if token is None:
            raise self.error(f"expected {wanted} at the end of the expression", None)
        self.i += 1
        return token

    def word(self, value: str) -> bool:
        token = self.peek()
        if token and token.kind == "word" and token.text.lower() == value:
            self.i += 1
            return True
        return False

    def expect(self, value: str) -> None:
        token = self.take(repr(value))
        if token.text != value:
            raise self.error(f"expected {value!r} but found {token.text[:30]!r}", token)

    def parse(self) -> Expr:
        expr = self.or_expr()
        token = self.peek()
        if token is not None:
            raise self.error(f"unexpected {token.text[:30]!r} (join conditions with 'and' or 'or')", token)
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

    def nest(self, token: _Token) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"expression nested deeper than {MAX_DEPTH} levels of parentheses and 'not'", token)

    def not_expr(self) -> Expr:
        token = self.peek()
        if self.word("not"):
            self.nest(token)  # type: ignore[arg-type]
            expr: Expr = Not(self.not_expr())
            self.depth -= 1
            return expr
        if token and token.text == "(":
            self.nest(token)
            self.i += 1
            expr = self.or_expr()
            self.expect(")")
            self.depth -= 1
            return expr
        return self.comparison()

    def count(self, token: _Token) -> None:
        self.terms += 1
        if self.terms > MAX_TERMS:
            raise self.error(f"expression has more than {MAX_TERMS} comparisons and 'in' values", token)

    def comparison(self) -> Expr:
        token = self.take("a field name")
        name = token.text
        if token.kind != "word" or name.lower() in _KEYWORDS:
            raise self.error(f"expected a field name but found {name[:30]!r}", token)
        try:
            check_field(name)
        except QueryError as exc:
            raise self.error(str(exc), token) from None
        self.count(token)
        if self.word("in"):
            return Compare(name, "in", tuple(self.sequence()))
        if self.word("contains"):
            return Compare(name, "contains", self.value())
        op = self.take(f"a comparison after {name!r}")
        if op.kind != "op" or op.text not in OPS + ("=",):
            raise self.error(f"expected a comparison (=, !=, <, <=, >, >=, in, contains) after {name!r} but found {op.text[:30]!r}", op)
        return Compare(name, "==" if op.text == "=" else op.text, self.value())

    def sequence(self) -> list[Any]:
        opening = self.take("'(' after 'in'")
        closing = {"(": ")", "[": "]"}.get(opening.text)
        if closing is None:
            raise self.error(f"expected '(' after 'in' but found {opening.text[:30]!r}", opening)
        values = [self.value()]
        while (token := self.peek()) is not None and token.text == ",":
            self.i += 1
            self.count(token)
            values.append(self.value())
        self.expect(closing)
        return values

    def value(self) -> Any:
        token = self.take("a value")
        if token.kind in ("num", "str"):
            return token.value
        if token.kind == "word" and token.text.lower() in ("true", "false"):
            return token.text.lower() == "true"
        if token.kind == "word" and token.text.lower() in ("null", "none"):
            return None
        if token.kind == "word":
            raise self.error(f"{token.text[:30]!r} is not a value; quote strings ('{token.text[:30]}')", token)
        raise self.error(f"expected a value but found {token.text[:30]!r}", token)


def parse(text: str) -> Expr:
    """Parse the string form, e.g. ``"config.lr > 0.1 and status = 'finished'"``.

    Raises QueryError with ``.position`` (0-based) for anything that is not an expression.
    """
    if not isinstance(text, str):
        raise QueryError(f"a search expression must be a string, not {type(text).__name__}")
    if len(text) > MAX_QUERY_LENGTH:
        raise _error(text, f"search expression is {len(text)} characters long; the limit is {MAX_QUERY_LENGTH}", MAX_QUERY_LENGTH)
    if not text.strip():
        raise QueryError("empty search expression at position 0", position=0)
    return _Parser(text).parse()


def as_expr(where: Expr | str | dict[str, Any] | None) -> Expr | None:
    """The expression to search with: parsed from a string, or checked when built in Python."""
    if where is None:
        return where
    if isinstance(where, Expr):
        check_expr(where)
        return where
    if isinstance(where, str):
        return parse(where)
    if isinstance(where, dict):
        items = []
        for key, value in where.items():
            check_field(key)
            items.append(Compare(key, "==", value))
        expr = And(tuple(items)) if items else None
        if expr is not None:
            check_expr(expr)
        return expr
    raise QueryError(f"where must be an expression, a string or a dict, not {type(where).__name__}")


def _nesting(parent: Expr | None, node: Expr) -> int:
    """The levels ``node`` adds below ``parent``: the parentheses and 'not' the string
    form would need for it (an and inside an or needs none)."""
    if isinstance(node, Not):
        return 1
    if isinstance(node, Or) and isinstance(parent, (And, Not)):
        return 1
    if isinstance(node, And) and isinstance(parent, Not):
        return 1
    return 0


def check_expr(expr: Expr) -> None:
    """Hold an expression built in Python to the string form's limits (nesting, number of
    terms, 64-bit integers), walking it without recursion so no depth can overflow."""
    terms = 0
    stack: list[tuple[Any, Expr | None, int]] = [(expr, None, 0)]
    while stack:
        node, parent, depth = stack.pop()
        if not isinstance(node, Expr):
            raise QueryError(f"not a search expression: {type(node).__name__} {str(node)[:60]!r}")
        depth += _nesting(parent, node)
        if depth > MAX_DEPTH:
            raise QueryError(
                f"expression nested deeper than {MAX_DEPTH} levels (each ~, each | inside & or ~ and each & "
                "inside ~ is one, as parentheses and 'not' are in the string form)"
            )
        if isinstance(node, Compare):
            check_field(node.field)
            values = node.value if node.op == "in" and isinstance(node.value, tuple) else (node.value,)
            terms += max(1, len(values))
            if terms > MAX_TERMS:
                raise QueryError(f"expression has more than {MAX_TERMS} comparisons and 'in' values")
            for value in values:
                _check_integer(node, value)
        elif isinstance(node, (And, Or)):
            stack.extend((item, node, depth) for item in node.items)
        elif isinstance(node, Not):
            stack.append((node.item, node, depth))
        else:
            raise QueryError(f"not a search expression: {type(node).__name__}")


def _check_integer(expr: Compare, value: Any) -> None:
    """Integers compare as 64-bit numbers in both databases, as the string form has it."""
    if isinstance(value, int) and not isinstance(value, bool) and not -_INT64 <= value < _INT64:
        # str() refuses ints of more than 4300 digits: only short ones are shown whole.
        text = str(abs(value)) if value.bit_length() < 10_000 else None
        if text is None:
            shown, hint = f"an integer of {value.bit_length()} bits", ""
        else:
            shown = ("-" if value < 0 else "") + (text if len(text) <= 30 else text[:30] + "...")
            hint = f" (write it as a float, like {text[0]}e{len(text) - 1})"
        raise QueryError(f"the integer {shown} compared with {expr.field} does not fit in 64 bits{hint}")


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
    if code == NUMBER:  # a range on number: the (path, kind, number, ...) index seeks it
        return LeafTest(name, lambda t: and_(t.c.kind == code, _apply(t.c.number, op, value)), kind=code)
    # A string leaf's number is NULL: saying so lets the database seek the index on text.
    # (Not said of a number's text: SQLite then no longer walks the index in its order.)
    return LeafTest(name, lambda t: and_(t.c.kind == code, t.c.number.is_(None), _apply(t.c.text, op, value)), kind=code)


def _balanced_and(parts: list[Any]) -> list[Any]:
    """``parts`` as conditions to AND, nested in parentheses as a balanced tree when there
    are many: SQLite refuses an expression more than 1,000 levels deep, and a flat chain
    of ANDs is one level per term (200 comparisons on one path reached it)."""
    if len(parts) <= 16:
        return parts
    middle = len(parts) // 2
    return [and_(*_balanced_and(parts[:middle])).self_group(), and_(*_balanced_and(parts[middle:])).self_group()]


def _leaf_where(table: Any, path: str, tests: list[LeafTest], scope: int | None) -> list[Any]:
    """Conditions on a leaves table: the path, the tests and, within one module, its scope."""
    where = [table.c.path == path, *_balanced_and([t.test(table) for t in tests])]
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


# A leaf test that at least this many runs pass is probed run by run in uuid order
# rather than collected first (see plan).
DENSE = 2000


# How long a dense probe's answer is reused in this process (seconds). It only picks
# between two plans that return the same rows, so a stale answer costs time, never
# correctness; reusing it saves a query on every page a server or a notebook reads.
DENSE_TTL = 30.0
_DENSE_SEEN: dict[Any, tuple[float, Any]] = {}


def remembered(store: dict[Any, tuple[float, Any]], key: Any, make: Callable[[], Any], most: int) -> Any:
    """``make()``, kept in ``store`` under ``key`` for ``DENSE_TTL`` seconds (for what is
    built on dense probes' answers: it lives as long as they do). At most ``most``
    entries: a full store is emptied."""
    now = time.monotonic()
    hit = store.get(key)
    if hit is not None and now - hit[0] < DENSE_TTL:
        return hit[1]
    value = make()
    if len(store) >= most:
        store.clear()
    store[key] = (now, value)
    return value


def dense_probe(conn: Any, at_least: int = DENSE) -> Callable[[Any], bool]:
    """``plan``'s ``dense`` on ``conn``: do at least ``at_least`` leaves pass a test?
    Reads at most that many index entries, once per ``DENSE_TTL`` for the same test on
    the same database."""

    def count(probe: Any) -> bool:
        capped = probe.limit(at_least).subquery()
        return int(conn.execute(select(func.count()).select_from(capped)).scalar() or 0) >= at_least

    def dense(probe: Any) -> bool:
        key = probe._generate_cache_key()  # structure and bound values, without compiling
        if key is None:
            return count(probe)
        seen = (str(conn.engine.url), at_least, key.key, tuple(repr(b.effective_value) for b in key.bindparams))
        return bool(remembered(_DENSE_SEEN, seen, lambda: count(probe), 1024))

    return dense


# A page in uuid order filtered on one path is read off the leaves (every passing uuid,
# sorted) while at most this many pass: that sort costs less than probing runs one
# by one in uuid order, which reads (runs / passing) x limit of them.
SORT_PASSING = 10_000


def leaf_uuid_page(expr: Expr | None, conditions: list[Any], spec: Any, scope: int | None) -> tuple[Any, Plan] | None:
    """For a search in uuid order whose filter is tests on one config path alone (within
    one module, or with no column conditions): the leaves that pass (to count) and the
    plan of their uuids in order (to page). None when the search is not of that shape."""
    if expr is None or (conditions and scope is None):
        return None
    specs = _order_specs(spec)
    if specs and specs != [("uuid", False)]:
        return None
    groups, rest = _split(_conjuncts(expr))
    if rest or len(groups) != 1:
        return None
    ((path, tests),) = groups.items()
    passing = _leaf_subquery(path, tests, scope)
    return passing, Plan(LEAVES, [passing.whereclause], [LEAVES.c.run_uuid.asc()])


def count_statement(expr: Expr | None, conditions: list[Any], dialect: str, scope: int | None = None) -> Any:
    """``SELECT count(*)`` of the runs that ``conditions`` (SQL on ``runs``) and ``expr`` match.

    Within one module (``scope``), or with no column conditions, the leaves alone count."""
    statement = leaf_count(expr, scope) if not conditions or scope is not None else None
    if statement is not None:
        return statement
    where = list(conditions)
    if expr is not None:
        where.append(compile_expr(expr, dialect, scope))
    statement = select(func.count()).select_from(RUNS)
    return statement.where(*where) if where else statement


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
    # order expressions that are never NULL in this plan's rows beyond what the schema
    # says (a pinned leaf's number or text): a keyset page can bound them as ranges
    not_null: list[Any] = dataclasses.field(default_factory=list)


def json_rows(dialect: str, *values: Any) -> Any:
    """An aggregate of ``values`` over a subquery's rows, as the text of a JSON array of
    arrays (read with the enclosing row: no round trip of its own; parse with
    ``json.loads``). NULL for no rows on PostgreSQL, ``[]`` on SQLite."""
    if dialect == "postgresql":  # json would arrive decoded: ask for its text
        return cast(func.json_agg(func.json_build_array(*values)), Text)
    return type_coerce(func.json_group_array(func.json_array(*values)), Text)


def directories_column(dialect: str) -> Any:
    """The directories of the run of the enclosing row, ``[[id, directory], ...]`` as
    JSON text (``id`` orders them as the index recorded them)."""
    found = select(json_rows(dialect, LOCATIONS.c.id, LOCATIONS.c.directory)).where(LOCATIONS.c.run_uuid == RUNS.c.uuid)
    return found.scalar_subquery().label("run_directories")


def order_keys(compiled: Plan) -> list[tuple[Any, bool]]:
    """(expression, descending) of each of the plan's ORDER BY clauses."""
    return [(clause.element, clause.modifier is operators.desc_op) for clause in compiled.order]


def page_select(
    compiled: Plan, columns: list[Any], limit: Any, offset: Any, where: list[Any] = (), uuid: Any = RUNS.c.uuid  # type: ignore[assignment]
) -> Any:
    """``columns`` (of ``runs``) of one page of ``compiled``, in its order, followed by the
    page's sort keys: one statement. A subquery picks the page's uuids and sort keys (off
    the indexes where the database can, stopping at the limit, however many rows tie);
    the outer query reads the rows of that page alone and sorts its few rows by the
    keys. ``where``: further conditions on the page (a cursor's); ``uuid``: the run's
    uuid in the plan's FROM (the leaves' ``run_uuid`` when the plan reads leaves only)."""
    keys = order_keys(compiled)
    page = (
        select(uuid.label("page_uuid"), *(key.label(f"_k{i}") for i, (key, _) in enumerate(keys)))
        .select_from(compiled.source)
        .where(*compiled.where, *where)
        .order_by(*compiled.order)
        .offset(offset)
    )
    if limit is not None:
        page = page.limit(limit)
    page = page.subquery("page")
    sort = [page.c[f"_k{i}"] for i in range(len(keys))]
    return (
        select(*columns, *sort)
        .select_from(page.join(RUNS, RUNS.c.uuid == page.c.page_uuid))
        .order_by(*(key.desc() if descending else key.asc() for key, (_, descending) in zip(sort, keys, strict=True)))
    )


_RANK = {NUMBER: 0, STRING: 1, FALSE: 2, TRUE: 3, ARRAY: 4, OBJECT: 5}
# the module hash a run without a leaf at an order path ties with: after every real one
NO_SCOPE = 2**63 - 1


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
    Otherwise values sort numbers first, then strings, false, true, lists, objects
    (descending: the reverse), and runs where the path is missing or null come last in
    either direction. ``numbers_only``: keep only runs with a number at the first order
    path, walked along the index (see ``first_order_numbers``).

    Ties: when the first order key is a config or predicate path, runs that tie on every
    key are put in the order of their leaf's index entry, in the first key's direction:
    by module (the leaf's ``scope``), then uuid. A walk along that index then needs no
    sort, however many runs share a value (a sweep's grid shares each value with
    hundreds); ordered descending, the result is exactly the ascending one reversed.
    Otherwise ties go by uuid, ascending.
    """
    items = _conjuncts(expr) if expr is not None else []
    groups, rest = _split(items)
    source: Any = RUNS
    order: list[Any] = []
    joined: set[str] = set()
    not_null: list[Any] = []
    specs = _order_specs(spec)
    ties: list[Any] = [RUNS.c.uuid.asc()]
    for position, (field, descending) in enumerate(specs):
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
        if position == 0:  # ties follow this leaf's index entries (see above)
            # a run without the path has no leaf, so no module hash: it ties after every
            # run that has one (the backends place NULLs differently)
            scope_tie = func.coalesce(alias.c.scope, NO_SCOPE)
            ties = [scope_tie.desc(), RUNS.c.uuid.desc()] if descending else [scope_tie.asc(), RUNS.c.uuid.asc()]
        tests = groups.get(name, [])
        pinned = next((t.kind for t in tests if t.kind is not None), None)
        if numbers_only and position == 0 and pinned is None:
            tests = tests + [LeafTest(name, lambda t: t.c.kind == NUMBER, kind=NUMBER)]
            pinned = NUMBER
            groups[name] = tests
        if pinned is not None:
            groups.pop(name)
            if pinned in (NUMBER, STRING):
                not_null.append(alias.c.number if pinned == NUMBER else alias.c.text)
            source = source.join(alias, and_(*on, *(t.test(alias) for t in tests)))
            # number, then text: one of them is NULL for every leaf of the pinned kind,
            # and naming both keeps the order the index's own
            for key in (alias.c.number, alias.c.text):
                order.append(key.desc() if descending else key.asc())
            if position == 0 and len(specs) == 1:
                # The index's own order, and a total one (no later keys to apply).
                tie = (alias.c.scope, alias.c.run_uuid)
                order += [key.desc() if descending else key.asc() for key in tie]
                return _finish(conditions, groups, rest, dialect, dense, scope, joined, source, order, not_null, walk=True)
            continue
        source = source.outerjoin(alias, and_(*on))
        # null or missing: after every value, whichever the direction
        rank = case(_RANK, value=alias.c.kind, else_=-1 if descending else 6)
        for key in (rank, alias.c.number, alias.c.text):
            order.append(key.desc() if descending else key.asc())
    order += ties
    return _finish(conditions, groups, rest, dialect, dense, scope, joined, source, order, not_null)


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
    not_null: list[Any],
    walk: bool = False,
) -> Plan:
    """``walk``: the order follows the leaves index of the first order path, so a page
    reads a run at a time in order and stops at the limit; a filter many runs pass is
    then best probed per run (EXISTS), as in uuid order."""
    where = list(conditions)
    for path, tests in groups.items():
        probe = _leaf_subquery(path, tests, scope)
        if (walk or not joined) and dense is not None and dense(probe):
            where.append(
                exists(probe.with_only_columns(literal_column("1")).where(LEAVES.c.run_uuid == RUNS.c.uuid))
            )
        else:
            where.append(RUNS.c.uuid.in_(probe))
    where += [compile_expr(item, dialect, scope) for item in rest]
    return Plan(source, where, order, not_null)


def first_order_numbers(expr: Expr | None, spec: str | list[str] | None) -> bool:
    """Does the order start with a leaf path the filter does not pin?

    Ascending, numbers sort first there, so a page that numbers fill is the same page
    as ``plan(..., numbers_only=True)`` gives, which the database reads off the index.
    Descending, the same holds when no run of the search has a string, boolean, list or
    object there (``values_before_numbers`` finds one if there is).
    """
    specs = _order_specs(spec)
    if not specs:
        return False
    column, path = check_field(specs[0][0])
    name = leaf_path(column, path) if path else None
    if name is None:
        return False
    groups, _ = _split(_conjuncts(expr)) if expr is not None else ({}, [])
    return not any(t.kind is not None for t in groups.get(name, []))


def values_before_numbers(
    expr: Expr | None, conditions: list[Any], spec: str | list[str] | None, dialect: str, scope: int | None = None
) -> Any | None:
    """For an order that ``first_order_numbers`` starts with numbers (None for any other),
    None when it is ascending (nothing sorts before numbers); descending, a statement that returns a row
    when a run of the search holds a string, boolean, list or object at the order path
    (those sort before numbers then). It starts from those values in the leaves index:
    a path that holds only numbers answers at once."""
    if not first_order_numbers(expr, spec):
        return None
    specs = _order_specs(spec)
    if not specs[0][1]:
        return None
    column, path = check_field(specs[0][0])
    name = leaf_path(column, path)
    others = LEAVES.alias("others")
    kinds = [STRING, FALSE, TRUE, ARRAY, OBJECT]
    # The search's column conditions and its tests of single paths, as probes of each such
    # run (EXISTS), never as the list to start from. Other parts of the filter are left
    # out: a run that passes these may not pass the whole filter, which only sends the
    # page to the whole order (correct, slower); and they can be nested as deep as
    # SQLite allows already (one EXISTS more is too deep).
    kept = [item for item in _conjuncts(expr) if not _split([item])[1]] if expr is not None else []
    simple = (kept[0] if len(kept) == 1 else And(tuple(kept))) if kept else None
    compiled = plan(simple, conditions, None, dialect, lambda probe: True, scope)
    # The run's conditions as a probe of each such leaf's run: a join let SQLite start
    # from the runs of a column condition (all 100,000 for status = 'finished').
    passes = exists(
        select(literal_column("1")).select_from(compiled.source).where(RUNS.c.uuid == others.c.run_uuid, *compiled.where)
    )
    return (
        select(literal_column("1"))
        .select_from(others)
        .where(*_leaf_where(others, name, [], scope), others.c.kind.in_(kinds), passes)  # type: ignore[arg-type]
        .limit(1)
    )


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


__all__ = ["Field", "Expr", "parse", "as_expr", "compile_expr", "plan", "leaf_count", "count_statement", "dense_probe"]
