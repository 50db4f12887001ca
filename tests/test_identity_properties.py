"""Property tests (hypothesis) for the canonical form and the uuid (issue 6, item 4).

A logical config (which value each field holds) is generated, then written many ways:
keys in any order, ``1`` for ``1.0``, ``"0.5"`` for ``0.5``, defaults given or omitted
(also nested ones), dotted keys or nested dicts or a mix, split over a list of versions,
earlier versions overridden by later ones. Every spelling must name the same run, and
that run's canonical config must be what the design says (an oracle written here).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from machinable import Index, Project, Storage
from machinable.errors import ConfigError
from machinable.identity import canonical_json, check_finite, compute_uuid

from conftest import run_python, write_module

PROJECT = "propstudy"
MODULE = "props"

SOURCE = '''
from typing import Annotated, Optional

from pydantic import BaseModel, Field

from machinable import Interface
from machinable.identity import NotIdentifying


class Schedule(BaseModel):
    warmup: int = 10
    decay: float = 0.5


class Optimizer(BaseModel):
    name: str = "adam"
    beta: float = 0.9
    schedule: Schedule = Schedule()


class Props(Interface):
    class Config(BaseModel):
        dataset: str
        lr: float = 0.1
        momentum: float = 0.0
        steps: int = 100
        tag: str = "base"
        layers: list[int] = [64, 64]
        weights: dict[str, float] = {}
        tags: set[str] = set()
        clip: Optional[float] = None
        optimizer: Optimizer = Optimizer()
        seed: Annotated[int, NotIdentifying] = 0
        temperature: Annotated[float, NotIdentifying] = 1.0
        note: str = Field("", json_schema_extra={"identifying": False})
'''

REQUIRED = object()
ABSENT = object()

# dotted path -> (kind, default)
FIELDS: dict[str, tuple[str, Any]] = {
    "dataset": ("str", REQUIRED),
    "lr": ("float", 0.1),
    "momentum": ("float", 0.0),
    "steps": ("int", 100),
    "tag": ("str", "base"),
    "layers": ("ints", [64, 64]),
    "weights": ("fdict", {}),
    "tags": ("set", set()),
    "clip": ("optfloat", None),
    "optimizer.name": ("str", "adam"),
    "optimizer.beta": ("float", 0.9),
    "optimizer.schedule.warmup": ("int", 10),
    "optimizer.schedule.decay": ("float", 0.5),
    "seed": ("int", 0),
    "temperature": ("float", 1.0),
    "note": ("str", ""),
}
NON_IDENTIFYING = {"seed", "temperature", "note"}
IDENTIFYING = [path for path in FIELDS if path not in NON_IDENTIFYING]
FLOAT_FIELDS = [p for p, (kind, _) in FIELDS.items() if kind in ("float", "optfloat")]

finite = st.floats(allow_nan=False, allow_infinity=False)
# Config text: anything but NUL (refused: PostgreSQL cannot store it) and lone surrogates.
texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12) | st.text(
    st.characters(min_codepoint=0x10000), max_size=4
)
keys = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters=".\x00"), max_size=6)  # dots nest


def value_strategy(kind: str, default: Any) -> st.SearchStrategy[Any]:
    base = {
        "float": finite | st.integers(-(10**6), 10**6).map(float),
        "optfloat": st.none() | finite,
        "int": st.integers() | st.integers(-3, 3),
        "str": texts,
        "ints": st.lists(st.integers(-1000, 1000), max_size=5),
        "fdict": st.dictionaries(keys, finite, max_size=4),
        "set": st.sets(texts, max_size=5),
    }[kind]
    if default is REQUIRED:
        return base
    return st.one_of(st.just(default), base)


logical_configs = st.fixed_dictionaries(
    {"dataset": value_strategy("str", REQUIRED)},
    optional={path: value_strategy(kind, d) for path, (kind, d) in FIELDS.items() if path != "dataset"},
)


# The oracle: what the design says the canonical config of a logical config is.


def _float(value: Any) -> float:
    return float(value) + 0.0  # -0.0 + 0.0 is 0.0: -0.0 and 0.0 name one run


def normalize(kind: str, value: Any) -> Any:
    if kind == "float":
        return _float(value)
    if kind == "optfloat":
        return None if value is None else _float(value)
    if kind == "int":
        return int(value)
    if kind == "set":
        return sorted(value)
    if kind == "fdict":
        return {k: _float(v) for k, v in value.items()}
    return list(value) if kind == "ints" else value


def text_of(kind: str, value: Any) -> str:
    return json.dumps(normalize(kind, value), sort_keys=True)


def expected_canonical(values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, (kind, default) in FIELDS.items():
        if path in NON_IDENTIFYING or path not in values:
            continue
        if default is not REQUIRED and text_of(kind, values[path]) == text_of(kind, default):
            continue
        target = out
        *parents, last = path.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = normalize(kind, values[path])
    return out


# Spelling one logical config in many equivalent ways.


def spell_value(data: st.DataObject, kind: str, value: Any) -> Any:
    def integral(v: float) -> bool:  # -0.0 is not spelled 0: its canonical text differs
        return v.is_integer() and abs(v) < 2**53 and math.copysign(1.0, v) == (1.0 if v >= 0 else -1.0)

    if kind in ("float", "optfloat") and value is not None:
        options = [value, repr(value)]
        if integral(value):
            options.append(int(value))
        return data.draw(st.sampled_from(options))
    if kind == "int" and abs(value) < 2**53:
        return data.draw(st.sampled_from([value, float(value)]))
    if kind == "set":
        items = list(value)
        if items:
            items += data.draw(st.lists(st.sampled_from(items), max_size=2))  # duplicates collapse
        items = data.draw(st.permutations(items))
        return data.draw(st.sampled_from([list(items), tuple(items), set(items), frozenset(items)]))
    if kind == "fdict":
        order = data.draw(st.permutations(list(value)))
        return {k: spell_value(data, "float", value[k]) for k in order}
    if kind == "ints":
        return data.draw(st.sampled_from([list(value), tuple(value)]))
    return value


def nest(data: st.DataObject, path: str, value: Any) -> dict[str, Any]:
    """``a.b.c = v`` as ``{"a.b.c": v}``, ``{"a": {"b.c": v}}``, ``{"a": {"b": {"c": v}}}``..."""
    parts = path.split(".")
    cuts = sorted(data.draw(st.sets(st.integers(1, len(parts) - 1), max_size=len(parts) - 1))) if len(parts) > 1 else []
    groups = [".".join(parts[a:b]) for a, b in zip([0, *cuts], [*cuts, len(parts)], strict=True)]
    for key in reversed(groups):
        value = {key: value}
    return value


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def spell(data: st.DataObject, values: dict[str, Any]) -> list[dict[str, Any]]:
    items: list[tuple[str, Any]] = []
    for path, (kind, default) in FIELDS.items():
        if path in values:
            if default is REQUIRED or text_of(kind, values[path]) != text_of(kind, default):
                items.append((path, spell_value(data, kind, values[path])))
            elif data.draw(st.booleans()):  # a default, given explicitly
                items.append((path, spell_value(data, kind, values[path])))
        elif default is not REQUIRED and data.draw(st.booleans()):
            items.append((path, spell_value(data, kind, default)))
    for empty in ("optimizer", "optimizer.schedule"):  # nested defaults as empty dicts
        if data.draw(st.booleans()):
            items.append((empty, {}))
    items = data.draw(st.permutations(items))
    groups = data.draw(st.integers(1, 3))
    versions: list[dict[str, Any]] = [{} for _ in range(groups)]
    for path, value in items:
        slot = data.draw(st.integers(0, groups - 1))
        versions[slot] = merge(versions[slot], nest(data, path, value))
    # Earlier versions are overridden by later ones: prepend junk for some scalar fields.
    scalar = [p for p, v in items if FIELDS.get(p, ("", None))[0] in ("float", "int", "str", "ints")]
    junk: dict[str, Any] = {}
    for path in data.draw(st.lists(st.sampled_from(scalar), unique=True)) if scalar else []:
        kind = FIELDS[path][0]
        junk = merge(junk, nest(data, path, {"float": 123.25, "int": -7, "str": "junk", "ints": [9]}[kind]))
    return [junk, *versions] if junk else versions


# The interface under test, resolved from a module file in a project directory.


@pytest.fixture(scope="module")
def make(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("props") / PROJECT
    root.mkdir()
    write_module(root, MODULE, SOURCE)
    project = Project(root)
    cls = project.resolve(MODULE)
    index = Index(root / ".machinable.sqlite")
    storage = Storage(root / "storage")

    def _make(version: Any):
        return cls.make(version, project=project, storage=storage, index=index)

    yield _make
    assert not (root / "storage").exists()  # naming a run never writes anything
    assert not (root / ".machinable.sqlite").exists()


def uuid_of(canonical: dict[str, Any]) -> str:
    return compute_uuid(PROJECT, MODULE, canonical, {})


SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@settings(max_examples=250, **SETTINGS)
@given(values=logical_configs, data=st.data())
def test_every_spelling_of_one_config_names_the_same_run(make, values, data) -> None:
    expected = expected_canonical(values)
    first = make(spell(data, values))
    second = make(spell(data, values))
    assert first._canonical == expected
    assert canonical_json(first._canonical) == canonical_json(expected)  # == ignores -0.0's sign
    assert first.uuid == second.uuid == uuid_of(expected)
    assert len(first.uuid) == 32 and set(first.uuid) <= set("0123456789abcdef")
    # The canonical text is sorted, compact and ASCII-only.
    text = canonical_json(first._canonical)
    assert text.isascii() and ", " not in text and ": " not in text
    assert text == canonical_json(json.loads(text))


@settings(max_examples=200, **SETTINGS)
@given(values=logical_configs, path=st.sampled_from(IDENTIFYING), data=st.data())
def test_changing_an_identifying_value_changes_the_uuid(make, values, path, data) -> None:
    kind, default = FIELDS[path]
    old = values.get(path, default if default is not REQUIRED else "")
    new = data.draw(value_strategy(kind, REQUIRED).filter(lambda v: text_of(kind, v) != text_of(kind, old)))
    changed = {**values, path: new}
    before = make(spell(data, {**values, path: old}))
    after = make(spell(data, changed))
    assert before.uuid != after.uuid
    assert after.uuid == uuid_of(expected_canonical(changed))


@settings(max_examples=100, **SETTINGS)
@given(
    values=logical_configs,
    seed=st.integers(),
    temperature=finite,
    note=texts,
    data=st.data(),
)
def test_changing_a_non_identifying_value_keeps_the_uuid(make, values, seed, temperature, note, data) -> None:
    base = make(spell(data, values))
    other = make(spell(data, {**values, "seed": seed, "temperature": temperature, "note": note}))
    assert other.uuid == base.uuid
    assert (other.config.seed, other.config.temperature, other.config.note) == (seed, temperature, note)
    assert {"seed", "temperature", "note"}.isdisjoint(other._canonical)
    assert other._full["seed"] == seed  # kept in the full config, just not hashed


def test_set_fields_hash_the_same_in_every_process(tmp_path: Path) -> None:
    """A ``set[str]`` iterates in an order that depends on PYTHONHASHSEED."""
    root = tmp_path / PROJECT
    root.mkdir()
    write_module(root, MODULE, SOURCE)
    code = f"""
        from machinable import get
        run = get({MODULE!r}, {{"dataset": "d", "tags": ["alpha", "beta", "gamma", "delta", "eps", "zeta"]}})
        print(run.uuid, run._canonical["tags"])
    """
    outputs = {run_python(code, root, env={"PYTHONHASHSEED": str(seed)}).stdout for seed in (0, 1, 2, 3)}
    assert len(outputs) == 1, outputs
    assert "['alpha', 'beta', 'delta', 'eps', 'gamma', 'zeta']" in outputs.pop()


# Canonical JSON on arbitrary JSON values.

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | finite
    | st.text()
    | st.text(st.characters(min_codepoint=0x10000))
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=40,
)


@settings(max_examples=400, deadline=None)
@given(value=json_values, data=st.data())
def test_canonical_json_round_trips(value, data) -> None:
    text = canonical_json(value)
    assert text.isascii()
    back = json.loads(text)
    assert back == value
    assert canonical_json(back) == text
    if isinstance(value, dict):  # key order never matters
        reordered = {k: value[k] for k in data.draw(st.permutations(list(value)))}
        assert canonical_json(reordered) == text


@settings(max_examples=100, deadline=None)
@given(
    prefix=st.text(max_size=3),
    surrogate=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
    suffix=st.text(max_size=3),
    as_key=st.booleans(),
)
def test_lone_surrogates_are_refused(prefix, surrogate, suffix, as_key) -> None:
    """Not text: ``"\\ud800\\udc00"`` would hash like the astral "\U00010000" and
    could not be written to model.json, so configs and predicates refuse it."""
    bad = prefix + surrogate + suffix
    value = {bad: 1} if as_key else {"x": [bad]}
    with pytest.raises(ConfigError, match="lone surrogate"):
        check_finite(value)


config_values = st.recursive(  # what a config may hold: no NUL, no lone surrogates
    st.none() | st.booleans() | st.integers() | finite | texts,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(texts, inner, max_size=5),
    max_leaves=20,
)


def poison(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``inner`` (holding a bad float) placed somewhere inside a list or a dict."""
    in_list = st.tuples(st.lists(config_values, max_size=3), inner, st.integers(0, 3)).map(
        lambda t: t[0][: t[2]] + [t[1]] + t[0][t[2] :]
    )
    in_dict = st.tuples(st.dictionaries(texts, config_values, max_size=3), texts, inner).map(
        lambda t: {**t[0], t[1]: t[2]}
    )
    return in_list | in_dict


bad_floats = st.sampled_from([math.nan, math.inf, -math.inf, float("-nan")])
poisoned = st.recursive(bad_floats, poison, max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(value=poisoned)
def test_nan_and_infinity_anywhere_are_refused(value) -> None:
    with pytest.raises(ConfigError, match="NaN or infinite"):
        canonical_json(value)
    with pytest.raises(ConfigError, match=r"is (nan|inf|-inf); NaN and infinities"):
        check_finite(value)


@settings(max_examples=100, **SETTINGS)
@given(
    values=logical_configs,
    path=st.sampled_from([*FLOAT_FIELDS, "weights"]),
    bad=st.sampled_from([math.nan, math.inf, -math.inf, "nan", "inf", "-Infinity", "NaN"]),
    data=st.data(),
)
def test_nan_and_infinity_in_any_float_field_are_refused(make, values, path, bad, data) -> None:
    values = dict(values)
    if path == "weights":
        values.pop("weights", None)
        version = spell(data, values) + [{"weights": {data.draw(keys): bad}}]
    else:
        values.pop(path, None)
        version = spell(data, values) + [nest(data, path, bad)]
    with pytest.raises(ConfigError) as caught:
        make(version)
    message = str(caught.value)
    assert "nan" in message.lower() or "inf" in message.lower()
    assert "props" in message or "NaN and infinities" in message


@settings(max_examples=200, deadline=None)
@given(
    a=st.tuples(texts, texts, st.dictionaries(keys, json_scalars.filter(lambda v: v == v), max_size=3),
                st.dictionaries(keys, st.integers(), max_size=2)),
    b=st.tuples(texts, texts, st.dictionaries(keys, json_scalars.filter(lambda v: v == v), max_size=3),
                st.dictionaries(keys, st.integers(), max_size=2)),
)
def test_distinct_identities_get_distinct_uuids(a, b) -> None:
    """Project, module, config and predicate are encoded without ambiguity."""
    same = canonical_json(list(a)) == canonical_json(list(b))
    assert (compute_uuid(*a) == compute_uuid(*b)) == same
    # Moving text between the project and the module makes another run.
    project, module = a[0], a[1]
    if module:
        assert compute_uuid(project + module[0], module[1:], a[2], a[3]) != compute_uuid(*a)
