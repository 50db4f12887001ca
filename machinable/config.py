"""Configs: what the user passes to ``get()``, merged, validated and made recordable.

A version is a dict or a list of dicts merged in order; dotted keys nest
(``{"a.b": 1}`` is ``{"a": {"b": 1}}``). Unknown keys are refused, nesting is bounded,
and the result must be finite JSON, because it is recorded in ``model.json``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import to_jsonable_python

from machinable.errors import ConfigError
from machinable.identity import check_finite


def validate_config(
    config_cls: type[BaseModel], version: Any, module: str
) -> tuple[BaseModel, dict[str, Any], list[dict[str, Any]]]:
    """Merge what the user passed (a dict or a list of dicts, dotted keys nested) and
    validate it: the config, its full JSON form, and the versions as recorded."""
    versions = normalize_version(version, module)
    check_depth(versions, module)
    merged: dict[str, Any] = {}
    for item in versions:
        merged = deep_merge(merged, expand_dotted(item))
    unknown = unknown_keys(config_cls, merged)
    if unknown:
        known = ", ".join(config_cls.model_fields) or "none"
        raise ConfigError(
            f"unknown config key(s) for module {module!r}: {', '.join(unknown)} "
            f"(known: {known})",
            module=module,
        )
    try:
        config = config_cls.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(f"invalid config for module {module!r}: {_describe(exc)}", module=module) from exc
    dropped = dropped_keys(config, merged)
    if dropped:
        raise ConfigError(
            f"unknown config key(s) for module {module!r}: {', '.join(dropped)}", module=module
        )
    try:
        full = config.model_dump(mode="json")
        # What the user passed is recorded in model.json too: as JSON (numpy values
        # as their Python values), checked here rather than failing in launch().
        recorded = to_jsonable_python(versions, fallback=_version_value)
    except (ValueError, TypeError) as exc:  # pydantic's serialization errors, bad UTF-8
        raise ConfigError(
            f"config for module {module!r} is not JSON-serializable: {exc}", module=module
        ) from exc
    try:
        check_finite(full)
        check_finite(recorded, "version")
    except ConfigError as exc:
        raise ConfigError(f"invalid config for module {module!r}: {exc}", module=module) from exc
    return config, full, recorded


def normalize_version(version: Any, module: str) -> list[dict[str, Any]]:
    if version is None:
        return []
    items = [version] if isinstance(version, Mapping) else version
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise ConfigError(
            f"config for module {module!r} must be a dict (or a list of dicts), not {type(version).__name__}",
            module=module,
        )
    out = []
    for item in items:
        if item is None:  # as in machinable 5.x: [base, None] is [base]
            continue
        if not isinstance(item, Mapping):
            raise ConfigError(
                f"config for module {module!r} must be a dict, not {type(item).__name__}: {item!r}",
                module=module,
            )
        for key in item:
            if not isinstance(key, str):
                raise ConfigError(f"config keys must be strings, not {key!r}", module=module)
        out.append(dict(item))
    return out


def _version_value(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


MAX_CONFIG_DEPTH = 100


def check_depth(versions: list[dict[str, Any]], module: str) -> None:
    """Refuse configs nested deeper than ``MAX_CONFIG_DEPTH`` (walked without recursion)."""
    stack: list[tuple[Any, int]] = [(item, 1) for item in versions]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(
                f"config for module {module!r} is nested more than {MAX_CONFIG_DEPTH} levels deep",
                module=module,
            )
        if isinstance(value, Mapping):
            for key, item in value.items():
                stack.append((item, depth + 1 + (key.count(".") if isinstance(key, str) else 0)))
        elif isinstance(value, (list, tuple, set, frozenset)):
            stack.extend((item, depth + 1) for item in value)


def expand_dotted(data: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` becomes ``{"a": {"b": 1}}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            value = expand_dotted(value)
        parts = key.split(".")
        target = out
        for part in parts[:-1]:
            existing = target.get(part)
            if not isinstance(existing, dict):
                existing = {}
                target[part] = existing
            target = existing
        last = parts[-1]
        if isinstance(value, dict) and isinstance(target.get(last), dict):
            target[last] = deep_merge(target[last], value)
        else:
            target[last] = value
    return out


def deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


_KEYS: dict[type[BaseModel], tuple[Any, Any, bool, dict[str, Any], dict[str, str]]] = {}


def _keys(model: type[BaseModel]) -> tuple[bool, dict[str, Any], dict[str, str]]:
    """``(lenient, {name or alias: field}, {name or alias: name})`` of a model, kept per
    class (a ``model_rebuild()`` makes new fields, and is noticed)."""
    fields_now, config_now = model.model_fields, model.model_config
    found = _KEYS.get(model)
    if found is None or found[0] is not fields_now or found[1] is not config_now:
        fields: dict[str, Any] = {}
        names: dict[str, str] = {}
        for name, info in fields_now.items():
            fields[name] = info
            names[name] = name
            if info.alias:
                fields[info.alias] = info
                names[info.alias] = name
        lenient = config_now.get("extra") in ("allow", "ignore")
        found = (fields_now, config_now, lenient, fields, names)
        if len(_KEYS) < 10_000:
            _KEYS[model] = found
    return found[2], found[3], found[4]


def unknown_keys(model: type[BaseModel], data: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names in ``data`` that ``model`` has no field for (unless it allows extras)."""
    # A model that allows or ignores extras says so itself; its nested models still count.
    lenient, fields, _ = _keys(model)
    bad: list[str] = []
    for key, value in data.items():
        info = fields.get(key)
        if info is None:
            if not lenient:
                bad.append(prefix + key)
            continue
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and isinstance(value, Mapping):
            bad.extend(unknown_keys(annotation, value, f"{prefix}{key}."))
    return bad


def dropped_keys(value: Any, data: Any, path: str = "") -> list[str]:
    """Keys of ``data`` that validation into ``value`` ignored, wherever models nest.

    Catches what ``unknown_keys`` cannot see from annotations: models inside
    ``Optional``, unions, lists and dicts.
    """
    if isinstance(value, BaseModel):
        if not isinstance(data, Mapping):
            return []
        lenient, _, names = _keys(type(value))
        bad: list[str] = []
        for key, item in data.items():
            where = f"{path}.{key}" if path else str(key)
            if key not in names:
                if not lenient:
                    bad.append(where)
            else:
                bad.extend(dropped_keys(getattr(value, names[key]), item, where))
        return bad
    if isinstance(value, (list, tuple)) and isinstance(data, (list, tuple)) and len(value) == len(data):
        pairs = enumerate(zip(value, data, strict=True))
        return [k for i, (v, d) in pairs for k in dropped_keys(v, d, f"{path}[{i}]")]
    if isinstance(value, Mapping) and isinstance(data, Mapping):
        items = [(key, d) for key, d in data.items() if key in value]
        return [k for key, d in items for k in dropped_keys(value[key], d, f"{path}.{key}")]
    return []


def revalidate(config_cls: type[BaseModel], stored: Any, module: str) -> tuple[BaseModel | None, str | None]:
    """A stored config validated again by the module's Config as it is now:
    ``(config, None)``, or ``(None, why it no longer fits)``."""
    try:
        return config_cls.model_validate(stored), None
    except ValidationError as exc:
        return None, f"invalid config for module {module!r}: {_describe(exc)}"


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ())) or "config"
        parts.append(f"{where}: {error.get('msg')} (got {error.get('input')!r})")
    return "; ".join(parts)
