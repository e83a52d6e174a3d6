"""Progress for long steps (rows, rate, tokens/s, ETA) on stderr; quiet when not a terminal."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# Data on stdout, messages on stderr (huggingface_hub cli/_output.py does the same).
console = Console(stderr=True)


class _Bar:
    def __init__(self, progress: Progress, task: int) -> None:
        self._progress, self._task = progress, task
        self._start, self._tokens = time.monotonic(), 0

    def advance(self, rows: int = 1, tokens: int = 0) -> None:
        self._tokens += tokens
        rate = self._tokens / max(time.monotonic() - self._start, 1e-9)
        extra = f"{rate:,.1f} tok/s" if self._tokens else ""
        self._progress.update(self._task, advance=rows, extra=extra)


@contextmanager
def bar(desc: str, total: int | None, unit: str = "rows") -> Iterator[_Bar]:
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TextColumn("{task.fields[extra]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
        yield _Bar(progress, progress.add_task(desc, total=total, extra=""))
