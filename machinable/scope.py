"""Scopes: contexts that add values to the predicate of every run named inside them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from machinable.context import Context
from machinable.errors import ConfigError
from machinable.identity import canonical_json


class Scope(Context):
    """``with Scope({"seed": 3}):`` names distinct runs of one config, and filters ``all()``."""

    def __init__(self, predicate: Mapping[str, Any] | None = None, **values: Any):
        merged = {**dict(predicate or {}), **values}
        for key in merged:
            if not isinstance(key, str):
                raise ConfigError(f"scope keys must be strings, not {key!r}")
        # Kept in its JSON form, as runs store it, so that all() inside the scope compares
        # like with like (a tuple would never equal the stored list).
        self.predicate: dict[str, Any] = json.loads(canonical_json(merged))

    def __repr__(self) -> str:
        return f"Scope({self.predicate!r})"
