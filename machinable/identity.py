"""Content-addressed identity: canonical configs, predicates and uuids.

A run is named by ``(project, module, canonical config, predicate)``. The canonical
config is the validated config in JSON mode with every field that equals its default
dropped (recursively) and non-identifying fields dropped, serialized as sorted,
compact, ASCII-escaped JSON. The uuid is a hash of those parts alone.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

from machinable.errors import ConfigError

FORMAT_VERSION = 1
UUID_LENGTH = 32


class _NotIdentifying:
    """Marker for ``Annotated[T, NotIdentifying]``: the field does not name the run."""

    def __repr__(self) -> str:
        return "NotIdentifying"


NotIdentifying = _NotIdentifying()


def canonical_json(value: Any) -> str:
    """Sorted, compact, ASCII-only JSON; NaN and infinities are refused."""
    try:
        return json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        )
    except ValueError as exc:
        raise ConfigError(f"cannot hash a value that is NaN or infinite: {exc}") from exc
    except TypeError as exc:
        raise ConfigError(f"config value is not JSON-serializable: {exc}") from exc


def digest(text: str, length: int = UUID_LENGTH) -> str:
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:length]


def is_identifying(field: FieldInfo) -> bool:
    if any(m is NotIdentifying for m in field.metadata):
        return False
    extra = field.json_schema_extra
    return not (isinstance(extra, dict) and extra.get("identifying") is False)


def _jsonable(value: Any) -> Any:
    return to_jsonable_python(_ordered(value))


def _ordered(value: Any) -> Any:
    """Sets as sorted lists: their iteration order changes with PYTHONHASHSEED."""
    if isinstance(value, (set, frozenset)):
        items = [_jsonable(item) for item in value]
        try:
            return sorted(items)
        except TypeError:  # mixed types: order by their canonical JSON instead
            return sorted(items, key=canonical_json)
    if isinstance(value, (list, tuple)):
        return [_ordered(item) for item in value]
    if isinstance(value, dict):
        return {key: _ordered(item) for key, item in value.items()}
    if isinstance(value, float) and value == 0.0:
        return 0.0  # -0.0 == 0.0: one run, and the form PostgreSQL's jsonb keeps
    return value


_SCALARS = (str, int, float, bool, type(None))
_NO_DEFAULT = object()
# Per config class: (its fields dict, [(name, field, plain default)]) for its identifying
# fields. A plain default is a finite scalar default (no factory), compared directly.
_PLANS: dict[type[BaseModel], tuple[Any, list[tuple[str, FieldInfo, Any]]]] = {}


def _plan(cls: type[BaseModel]) -> list[tuple[str, FieldInfo, Any]]:
    fields = cls.model_fields
    found = _PLANS.get(cls)
    if found is not None and found[0] is fields:  # a model_rebuild() makes a new dict
        return found[1]
    plan = []
    for name, field in fields.items():
        if not is_identifying(field):
            continue
        default = _NO_DEFAULT
        if not field.is_required() and field.default_factory is None and type(field.default) in _SCALARS:
            if not (type(field.default) is float and not math.isfinite(field.default)):
                default = field.default
        plan.append((name, field, default))
    if len(_PLANS) < 10_000:
        _PLANS[cls] = (fields, plan)
    return plan


_FIELDS: dict[type[BaseModel], tuple[Any, list[tuple[str, FieldInfo, bool]]]] = {}


def _fields(cls: type[BaseModel]) -> list[tuple[str, FieldInfo, bool]]:
    """``(name, field, identifying)`` of a config class's fields (kept per class)."""
    fields = cls.model_fields
    found = _FIELDS.get(cls)
    if found is None or found[0] is not fields:
        found = (fields, [(name, field, is_identifying(field)) for name, field in fields.items()])
        if len(_FIELDS) < 10_000:
            _FIELDS[cls] = found
    return found[1]


def canonical_config(config: BaseModel) -> dict[str, Any]:
    """The identifying, non-default part of a validated config, as JSON values."""
    out: dict[str, Any] = {}
    for name, field, plain in _plan(type(config)):
        value = getattr(config, name)
        if plain is not _NO_DEFAULT and type(value) is type(plain) and field.default is plain:
            # A scalar of its default's type: equal values are equal canonical JSON
            # (-0.0 == 0.0 as _ordered makes it; NaN equals nothing, check_finite refuses it).
            if value == plain:
                continue
            out[name] = 0.0 if type(value) is float and value == 0.0 else value
            continue
        if isinstance(value, BaseModel):
            nested = canonical_config(value)
            if nested:
                out[name] = nested
            elif not field.is_required():
                default = field.get_default(call_default_factory=True, validated_data={})
                if isinstance(default, BaseModel) and canonical_config(default):
                    out[name] = nested
            continue
        encoded = _jsonable(value)
        if not field.is_required():
            default = field.get_default(call_default_factory=True, validated_data={})
            try:
                if canonical_json(_jsonable(default)) == canonical_json(encoded):
                    continue
            except ConfigError:
                pass
        out[name] = encoded
    check_finite(out)
    return out


def non_identifying_values(config: BaseModel, prefix: str = "") -> list[str]:
    """Dotted names of non-identifying fields that hold a value other than their default.

    Runs that differ only in these share one uuid unless a predicate separates them.
    """
    found: list[str] = []
    for name, field, identifying in _fields(type(config)):
        value = getattr(config, name)
        if not identifying:
            if field.is_required():
                found.append(prefix + name)
                continue
            default = field.get_default(call_default_factory=True, validated_data={})
            try:
                same = canonical_json(_jsonable(default)) == canonical_json(_jsonable(value))
            except ConfigError:
                same = False
            if not same:
                found.append(prefix + name)
        elif isinstance(value, BaseModel):
            found.extend(non_identifying_values(value, f"{prefix}{name}."))
    return found


def _plain_text(value: str) -> bool:
    """ASCII without NUL: text that ``_check_text`` accepts, told without encoding it."""
    return value.isascii() and "\x00" not in value


def check_finite(value: Any, path: str = "config") -> None:
    """Refuse NaN, infinities and unstorable text (lone surrogates, NUL), naming where."""
    if type(value) is dict:
        # The common case, a mapping of plain values, without a call per value (or
        # building each value's path before anything is wrong).
        for k, v in value.items():
            if isinstance(k, str) and not _plain_text(k):
                _check_text(k, f"{path} key {k!r}")
            kind = type(v)
            if kind is int or kind is bool or v is None:
                continue
            if kind is float:
                if not math.isfinite(v):
                    check_finite(v, f"{path}.{k}")
            elif kind is not str or not _plain_text(v):
                check_finite(v, f"{path}.{k}")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{path} is {value!r}; NaN and infinities cannot be part of a run")
    elif isinstance(value, str):
        _check_text(value, path)
    elif isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str):
                _check_text(k, f"{path} key {k!r}")
            check_finite(v, f"{path}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_finite(v, f"{path}[{i}]")


def _check_text(value: str, path: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(
            f"{path} holds a lone surrogate ({value[exc.start]!r}); it is not Unicode text "
            "and cannot be stored in a run's model.json"
        ) from None
    if "\x00" in value:  # PostgreSQL refuses NUL in text and JSON: the run could not be indexed
        raise ConfigError(f"{path} holds a NUL character ('\\x00'), which an index cannot store")


def compute_uuid(project: str, module: str, canonical: dict[str, Any], predicate: dict[str, Any]) -> str:
    return digest(
        canonical_json(
            {
                "format": FORMAT_VERSION,
                "project": project,
                "module": module,
                "config": canonical,
                "predicate": predicate,
            }
        )
    )


def config_key(canonical: dict[str, Any]) -> str:
    return digest(canonical_json(canonical))


def predicate_key(predicate: dict[str, Any]) -> str:
    return digest(canonical_json(predicate))
