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
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import and_, exists, false, func, literal, literal_column, not_, or_, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.sql.elements import ColumnElement

from machinable.catalog.engine import json_serializer
from machinable.catalog.models import Run
from machinable.errors import QueryError

RUNS = Run.__table__
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


def compile_expr(expr: Expr, dialect: str) -> ColumnElement[bool]:
    if isinstance(expr, And):
        return and_(*(compile_expr(item, dialect) for item in expr.items))
    if isinstance(expr, Or):
        return or_(*(compile_expr(item, dialect) for item in expr.items))
    if isinstance(expr, Not):
        return not_(compile_expr(expr.item, dialect))
    if isinstance(expr, Compare):
        return _compare(expr, dialect)
    raise QueryError(f"not a search expression: {expr!r}")


def _compare(expr: Compare, dialect: str) -> ColumnElement[bool]:
    column, path = check_field(expr.field)
    if expr.op == "in":
        if not expr.value:
            return false()
        return or_(*(_compare(Compare(expr.field, "==", v), dialect) for v in expr.value))
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


def order_clause(spec: str | list[str] | None, dialect: str) -> list[Any]:
    """``"config.lr"``, ``"-created_at"`` or ``"config.lr desc"``; uuid breaks ties."""
    specs = [spec] if isinstance(spec, str) else list(spec or [])
    clauses: list[Any] = []
    for item in specs:
        text = item.strip()
        descending = text.startswith("-")
        text = text.lstrip("-").strip()
        parts = text.split()
        if len(parts) == 2 and parts[1].lower() in ("asc", "desc"):
            descending = parts[1].lower() == "desc"
            text = parts[0]
        elif len(parts) != 1:
            raise QueryError(f"cannot order by {item!r}; write e.g. 'config.lr desc' or '-created_at'")
        column, path = check_field(text)
        if path:
            expr = json_value(RUNS.c[column], path, dialect)
        else:
            expr = RUNS.c[column]
        clauses.append(expr.desc() if descending else expr.asc())
    clauses.append(RUNS.c.uuid.asc())
    return clauses


__all__ = ["Field", "Expr", "parse", "as_expr", "compile_expr", "order_clause"]
