"""What a stage is, as plain data the engine checks.

A stage module `stages/<name>.py` defines:

- `SPEC = StageSpec(...)`: the tables it reads (`"<stage>.<table>"`) and writes (each with its
  schema from `pipeline/records.py`), whether the engine feeds it in resumable chunks, which
  prompt files go into its cache key, and its optional hooks;
- `class Config(StageConfig)`: its config section, frozen and strict;
- `run(inputs: dict[str, pa.Table], cfg: Config, env: Env) -> dict[str, Any]`: one table per
  name in `SPEC.writes`, plus `"rejected"` (schema `records.REJECTED`), plus optionally
  `"stats"`: a flat dict of stage-wide counts (numbers) the engine sums over chunks into the
  manifest. A table may be a `pa.RecordBatchReader` instead: the engine writes its batches as
  they are read (each checked against the schema), so a large output is never held whole.

Hooks, named in `SPEC.hooks` (the engine fails on a name the module does not define):
`external_files(cfg) -> list[Path]` for files outside the run store whose content the output
depends on (the sources stage's local data files), and `fingerprints(cfg) -> list[dict]` for
models a config names by a plain string rather than a `ModelSpec` (format's target tokenizer).
`spec_for(cfg) -> StageSpec` replaces SPEC for a stage whose inputs or folder depend on its config
(train with `train.data` reads no run stage; eval reads `train` only when no model is named, and
keeps each model in its own folder). `embedded_config(run_config) -> dict`, given the whole
resolved config rather than the stage's section, is the part of it the stage writes into its
output (publish's card embeds the run config): it goes into the cache key, so a changed value
there makes the output stale.

A stage never touches the run folder, the CLI or another stage; the engine (`pipeline/dag.py`)
does chunking, caching, resume, manifests and progress. This module is only the interface: it
imports nothing of the project, so a stage's cache key (its import closure) does not grow by
importing it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

# spec_for(cfg) -> StageSpec: a stage whose inputs depend on its config (train with train.data).
# embedded_config(run_config) -> dict: the part of the whole config its output embeds (the card).
HOOKS = ("external_files", "fingerprints", "spec_for", "embedded_config")


@dataclass(frozen=True)
class StageSpec:
    name: str
    reads: tuple[str, ...] = ()  # "<stage>.<table>" inputs; the input dict is keyed the same
    # Output table -> its schema (the engine adds "rejected", records.REJECTED); a table whose
    # schema differs fails the stage naming the column.
    writes: Mapping[str, pa.Schema] = field(default_factory=dict)
    chunked: str | None = None  # input name the engine splits into resumable chunks
    # Inputs that must hold rows: when one is empty the stage stops before it starts, naming the
    # table and why upstream rejected its rows. The chunked input is always required.
    required: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()  # globs under prompts/ hashed into the cache key
    hooks: tuple[str, ...] = ()  # optional functions of the module, out of HOOKS
    cached: bool = True  # False: run every time it is asked for (push)
    # Reject reasons that may pass (a server that was down): a later run, even of a finished
    # stage, runs the rows rejected for them again and keeps the rest (pipeline/retry.py).
    retried: tuple[str, ...] = ()
    folder: str | None = None  # its folder under the run, if not the stage name (eval/<model>)

    def __post_init__(self) -> None:
        if not isinstance(self.writes, Mapping):
            raise TypeError(
                f"stage {self.name}: SPEC.writes maps each table to its schema, e.g. "
                "writes={'samples': records.SAMPLES}"
            )
        unknown = [h for h in self.hooks if h not in HOOKS]
        if unknown:
            raise ValueError(f"stage {self.name}: unknown hook(s) {unknown}; known: {HOOKS}")
        if self.retried and self.chunked is None:
            raise ValueError(f"stage {self.name}: SPEC.retried needs a chunked input")
        stray = [r for r in (*self.required, self.chunked) if r and r not in self.reads]
        if stray:
            raise ValueError(f"stage {self.name}: {stray} must be among its reads {self.reads}")

    @property
    def needs(self) -> tuple[str, ...]:
        """Upstream stages, in first-read order."""
        return tuple(dict.fromkeys(r.split(".", 1)[0] for r in self.reads))

    @property
    def must_have_rows(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*([self.chunked] if self.chunked else []), *self.required]))


class StageConfig(BaseModel):
    """Base of every stage's config section: frozen, and an unknown key is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Fail the stage when rejected rows exceed this share of its input rows; None takes
    # `run.max_rejected_share`.
    max_rejected_share: float | None = Field(None, ge=0, le=1)


class ModelSpec(BaseModel):
    """Base of generator/scorer specs: the engine hashes `fingerprint()` into cache keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def fingerprint(self) -> dict[str, Any]:
        """Identity of the weights, tokenizer and chat template."""
        return self.model_dump(mode="json")


class Progress(Protocol):
    def advance(self, rows: int = 1, tokens: int = 0) -> None: ...


class Env(Protocol):
    """What the engine lends a running stage (`pipeline.env.LocalEnv` is the plain one)."""

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
