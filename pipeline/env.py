"""The plain `Env` a stage runs with: models loaded on first use and kept, progress on request.

Kept apart from `pipeline/stage.py` (the interface) so that loading models, which needs the
generator backends and the scorers, is not part of every stage's import closure.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.backends import load_generator
from pipeline.progress import bar, console
from pipeline.scorers import load_scorer


class _NullProgress:
    def advance(self, rows: int = 1, tokens: int = 0) -> None:
        pass


class LocalEnv:
    """A plain Env: models loaded on first use and kept, progress shown only when asked for.

    The engine passes one with rich progress; tests and benchmarks build their own.
    """

    def __init__(
        self,
        seed: int = 0,
        workdir: Path | None = None,
        run_config: dict[str, Any] | None = None,
        show_progress: bool = False,
        note: Path | None = None,
    ) -> None:
        self.seed = seed
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp("retrace"))
        self.run_config = run_config or {}
        self.show_progress = show_progress
        self.note = note  # where the engine keeps the last line logged, for `retrace status`
        self._models: dict[str, Any] = {}

    def _cached(self, spec: Any, load: Callable[[Any], Any]) -> Any:
        key = f"{type(spec).__name__}:{spec.model_dump_json()}"
        if key not in self._models:
            self._models[key] = load(spec)
        return self._models[key]

    def generator(self, spec: Any) -> Any:
        return self._cached(spec, load_generator)

    def scorer(self, spec: Any) -> Any:
        return self._cached(spec, load_scorer)

    @contextmanager
    def progress(self, desc: str, total: int | None, unit: str = "rows") -> Iterator[Any]:
        if not self.show_progress:
            yield _NullProgress()
            return
        with bar(desc, total, unit) as p:
            yield p

    def log(self, message: str) -> None:
        if self.note is not None:  # advisory: renamed into place, not fsynced
            tmp = self.note.with_name(f".{self.note.name}.tmp-{os.getpid()}")
            tmp.write_text(message)
            os.replace(tmp, self.note)
        if self.show_progress:
            console.print(f"[dim]  {message}[/]", highlight=False)
