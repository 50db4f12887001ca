"""Progress bars for long operations: shown on a terminal, silent otherwise."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from fsspec.callbacks import Callback, NoOpCallback

T = TypeVar("T")


def enabled(requested: bool | None = None) -> bool:
    """Show progress? ``requested`` wins; else only when stderr is a terminal."""
    if requested is not None:
        return requested
    if os.environ.get("MACHINABLE_QUIET"):
        return False
    return sys.stderr.isatty()


def track(items: Iterable[T], *, total: int | None, description: str, show: bool | None = None) -> Iterator[T]:
    """Iterate ``items``, drawing a rich progress bar on stderr when enabled."""
    if not enabled(show) or (total is not None and total < 200):
        yield from items
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)


class _RichCallback(Callback):
    """An fsspec callback that drives one task of a rich progress bar."""

    def __init__(self, progress: Any, task: Any) -> None:
        super().__init__()
        self._progress = progress
        self._task = task

    def call(self, *args: Any, **kwargs: Any) -> None:
        self._progress.update(self._task, total=self.size, completed=self.value)


@contextlib.contextmanager
def transfer_callback(enabled: bool, description: str) -> Iterator[Callback]:
    """Yield a callback showing a progress bar when enabled and stderr is a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield NoOpCallback()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        yield _RichCallback(bar, bar.add_task(description, total=None))
