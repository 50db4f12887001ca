"""Scopes: contexts that add values to the predicate of every run named inside them."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from machinable.config import deep_merge
from machinable.context import Context
from machinable.errors import ConfigError
from machinable.identity import canonical_json


class Scope(Context):
    """``with Scope({"seed": 3}):`` names distinct runs of one config, and filters ``all()``."""

    def __init__(
        self,
        predicate: Mapping[str, Any] | Sequence[Mapping[str, Any] | None] | None = None,
        **values: Any,
    ):
        # A list of mappings merges in order, later entries winning (nested ones merge).
        if predicate is None or isinstance(predicate, Mapping):
            items = [predicate or {}]
        elif isinstance(predicate, Sequence) and not isinstance(predicate, (str, bytes)):
            items = [item for item in predicate if item is not None]
        else:
            raise ConfigError(f"a Scope takes a dict or a list of dicts, not {type(predicate).__name__}")
        merged: dict[str, Any] = {}
        for item in [*items, values]:
            if not isinstance(item, Mapping):
                raise ConfigError(f"a Scope takes a dict or a list of dicts, not {item!r}")
            merged = deep_merge(merged, item)
        for key in merged:
            if not isinstance(key, str):
                raise ConfigError(f"scope keys must be strings, not {key!r}")
        # Kept in its JSON form, as runs store it, so that all() inside the scope compares
        # like with like (a tuple would never equal the stored list).
        self.predicate: dict[str, Any] = json.loads(canonical_json(merged))

    def __repr__(self) -> str:
        return f"Scope({self.predicate!r})"
