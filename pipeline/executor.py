"""What every executor shares: `run_chunk`, the one computation of a chunk, and `LocalExecutor`.

The engine (pipeline/dag.py) hands an executor the pending chunks of a stage and writes each result
as it comes back; an executor only computes (`LocalExecutor` here, one by one in this process;
`pipeline/executor_ray.py` on Ray). This module imports no other executor and not the engine, so
an executor can import it without a circle.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from types import ModuleType
from typing import Any

from pydantic import BaseModel

from pipeline.stage import ModelSpec


def run_chunk(
    stage: str, index: int, module: ModuleType, inputs: dict[str, Any], section: Any, env: Any
) -> Any:
    """One chunk's computation, what every executor runs; a failure names stage and chunk."""
    try:
        return module.run(inputs, section, env)
    except Exception as err:
        err.add_note(f"in stage {stage}, chunk {index}")
        raise


class LocalExecutor:
    """Computes a stage's chunks one after another in this process, each when it is asked for
    (so memory holds one chunk, and a kill loses at most the chunk in progress)."""

    def map(
        self,
        stage: str,
        module: ModuleType,
        section: Any,
        env: Any,
        chunks: Iterable[tuple[int, dict[str, Any]]],
    ) -> Iterator[tuple[int, Any]]:
        """(index, result) for each (index, inputs) of `chunks`; another executor may yield
        them in any order."""
        for index, inputs in chunks:
            yield index, run_chunk(stage, index, module, inputs, section, env)


def models_in(value: Any) -> Iterator[ModelSpec]:
    """Every ModelSpec in a config section (nested models, lists and tuples too)."""
    if isinstance(value, ModelSpec):
        yield value
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from models_in(getattr(value, name))
    elif isinstance(value, list | tuple):
        for item in value:
            yield from models_in(item)
