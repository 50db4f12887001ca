"""The stack of active contexts (projects, storages, scopes, stores).

Contexts live in a ``ContextVar`` holding an immutable tuple, so each thread and each
asyncio task sees its own stack and nesting never leaks between them.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any, TypeVar

T = TypeVar("T")

_stack: ContextVar[tuple[Any, ...]] = ContextVar("machinable_context", default=())


class Context:
    """Base of everything that can be entered with ``with``."""

    def __enter__(self: T) -> T:
        _stack.set(_stack.get() + (self,))
        return self

    def __exit__(self, *exc: object) -> None:
        stack = _stack.get()
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is self:
                _stack.set(stack[:i] + stack[i + 1 :])
                return


def innermost(kind: type[T]) -> T | None:
    """The most recently entered active context of ``kind``, if any."""
    for item in reversed(_stack.get()):
        if isinstance(item, kind):
            return item
    return None


def active(kind: type[T]) -> list[T]:
    """Every active context of ``kind``, outermost first."""
    return [item for item in _stack.get() if isinstance(item, kind)]
