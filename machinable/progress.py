"""Progress bars for long operations: shown on a terminal, silent otherwise."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

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
