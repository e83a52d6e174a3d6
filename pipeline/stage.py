"""What a stage is, as plain data the engine checks.

A stage module `stages/<name>.py` defines:

- `SPEC = StageSpec(...)`: the tables it reads (`"<stage>.<table>"`) and writes, whether the engine
  feeds it in resumable chunks, and which prompt files go into its cache key;
- `class Config(StageConfig)`: its config section, frozen and strict;
- `run(inputs: dict[str, pa.Table], cfg: Config, env: Env) -> dict[str, pa.Table]`: one table per
  name in `SPEC.writes`, plus `"rejected"` (schema `records.REJECTED`).

Optional: `external_files(cfg) -> list[Path]` for files outside the run store whose content the
output depends on (the sources stage's local data files), and `fingerprints(cfg) -> list[dict]`
for models a config names by a plain string rather than a `ModelSpec` (format's target tokenizer).
`spec_for(cfg) -> StageSpec` replaces SPEC for a stage whose inputs or folder depend on its config
(eval reads `train` only when no model is named, and keeps each model in its own folder).

A stage never touches the run folder, the CLI or another stage; the engine (`pipeline/dag.py`)
does chunking, caching, resume, manifests and progress.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict


@dataclass(frozen=True)
class StageSpec:
    name: str
    reads: tuple[str, ...] = ()  # "<stage>.<table>" inputs; the input dict is keyed the same
    writes: tuple[str, ...] = ()  # output table names (the engine adds "rejected")
    chunked: str | None = None  # input name the engine splits into resumable chunks
    prompts: tuple[str, ...] = ()  # globs under prompts/ hashed into the cache key
    cached: bool = True  # False: run every time it is asked for (push)
    folder: str | None = None  # its folder under the run, if not the stage name (eval/<model>)

    @property
    def needs(self) -> tuple[str, ...]:
        """Upstream stages, in first-read order."""
        return tuple(dict.fromkeys(r.split(".", 1)[0] for r in self.reads))


class StageConfig(BaseModel):
    """Base of every stage's config section: frozen, and an unknown key is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Fail the stage when rejected rows exceed this share of its input rows; None takes
    # `run.max_rejected_share`.
    max_rejected_share: float | None = None


class ModelSpec(BaseModel):
    """Base of generator/scorer specs: the engine hashes `fingerprint()` into cache keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def fingerprint(self) -> dict[str, Any]:
        """Identity of the weights, tokenizer and chat template (not the whole file bytes)."""
        return self.model_dump(mode="json")


class Progress(Protocol):
    def advance(self, rows: int = 1, tokens: int = 0) -> None: ...


class Env(Protocol):
    """What the engine lends a running stage."""

    seed: int  # the run seed; derive per-row seeds from it and the row id
    workdir: Path  # a folder the stage may write files into; kept across a resumed attempt
    run_config: dict[str, Any]  # the whole resolved config, for data cards and checkpoints

    def generator(self, spec: Any) -> Any:
        """The loaded generator for a spec (cached for the process)."""

    def scorer(self, spec: Any) -> Any:
        """The loaded toxicity scorer for a spec (cached for the process)."""

    def progress(self, desc: str, total: int | None, unit: str = "rows") -> Any:
        """A context manager yielding a `Progress`."""

    def log(self, message: str) -> None: ...


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
    ) -> None:
        self.seed = seed
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp("retrace"))
        self.run_config = run_config or {}
        self.show_progress = show_progress
        self._models: dict[str, Any] = {}

    def _cached(self, spec: Any, load: Any) -> Any:
        key = f"{type(spec).__name__}:{spec.model_dump_json()}"
        if key not in self._models:
            self._models[key] = load(spec)
        return self._models[key]

    def generator(self, spec: Any) -> Any:
        from pipeline.backends import load_generator

        return self._cached(spec, load_generator)

    def scorer(self, spec: Any) -> Any:
        from pipeline.scorers import load_scorer

        return self._cached(spec, load_scorer)

    @contextmanager
    def progress(self, desc: str, total: int | None, unit: str = "rows") -> Iterator[Any]:
        if not self.show_progress:
            yield _NullProgress()
            return
        from pipeline.progress import bar

        with bar(desc, total, unit) as p:
            yield p

    def log(self, message: str) -> None:
        if self.show_progress:
            from pipeline.progress import console

            console.print(f"[dim]  {message}[/]", highlight=False)
