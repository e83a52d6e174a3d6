"""The Ray executor (`run.executor: ray`): the same stage functions, chunks and bytes, on Ray.

The engine (pipeline/dag.py) hands an executor the chunks of a stage that are not done yet (and
the stage's module: this file imports no stage, nor the engine) and writes each chunk's tables as
they come back, so chunks stay the unit of resume whichever executor computed them. Here:

- a chunked stage's pending chunks become one Ray Dataset, one block per chunk, and run through
  `map_batches` with `batch_size=None`: each stage call sees exactly one whole chunk, as under the
  local executor, so its output (rows, their order, rejects) is the same bytes. A stage whose
  config names a model (generator or scorer) runs in an `ActorPoolStrategy` pool, the model
  loaded once per actor; a stage without one runs as plain tasks;
- a stage that is not chunked (filter, rewrite, format, blend, publish) is one call, run as one
  Ray task with that stage's resources (so `rewrite` lands on a GPU node when it asks for one).

A chunk's result travels back pickled (its tables as Arrow buffers), one row per chunk, whatever
the stage returned: the engine checks it as it checks a local result. Finished chunks are written
in the order they finish.

A cluster needs retrace importable on every node (the same image or environment) and the run store
(`run.runs_dir`) on a filesystem every node sees: stages write their files there directly.
"""

from __future__ import annotations

import importlib
import logging
import pickle
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from pipeline.executor import models_in, run_chunk
from pipeline.store import whole

CHUNK = "__retrace_chunk"  # the column that tags each row with its chunk on the way in
_ERROR_LINE = re.compile(r"^(?!ray\.)[A-Za-z_][\w.]*(?:Error|Exception): .*$", re.MULTILINE)
# On the way out: one row per chunk, the stage's result pickled.
_PACKED = pa.schema([("chunk", pa.int64()), ("result", pa.large_binary())])


class RayStage(BaseModel):
    """Ray resources of one stage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    actors: int = Field(1, ge=1)  # actors of a model stage's pool; tasks at once for others
    num_cpus: float = Field(1, ge=0)  # per actor or task
    num_gpus: float = Field(0, ge=0)  # per actor or task; vLLM's tensor_parallel_size takes more


class RayConfig(BaseModel):
    """`run.ray`: which cluster, and what each stage gets on it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # None: start a Ray on this machine; "auto": join the cluster `ray start` set up here;
    # "ray://<head>:10001": a remote cluster through Ray Client.
    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)  # a Ray started here; None: every core
    num_gpus: int | None = Field(None, ge=0)
    stages: dict[str, RayStage] = {}  # per stage name; a stage not named gets RayStage()

    @field_validator("stages")
    @classmethod
    def _known_stages(
        cls, stages: dict[str, RayStage], info: ValidationInfo
    ) -> dict[str, RayStage]:
        # The stage names come with the stages the config is validated for (pipeline/config.py
        # passes them as the validation context): the executor imports no stage.
        known = (info.context or {}).get("stages")
        unknown = sorted(set(stages) - set(known)) if known is not None else []
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(known)}")
        return stages


class RayExecutor:
    """Computes a stage's pending chunks on Ray; `map` is what the engine iterates."""

    def __init__(self, cfg: RayConfig) -> None:
        self.cfg = cfg

    def _connect(self, show_progress: bool) -> None:
        import ray
        import ray.data

        if not ray.is_initialized():
            ray.init(
                address=self.cfg.address,
                num_cpus=self.cfg.num_cpus,
                num_gpus=self.cfg.num_gpus,
                include_dashboard=False,
                logging_level=logging.WARNING,
            )
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = show_progress  # Ray Data's own bars, on a terminal
        logging.getLogger("ray.data").setLevel(logging.WARNING)

    def map(
        self,
        name: str,
        module: ModuleType,
        section: BaseModel,
        env: Any,
        pending: Iterable[tuple[int, dict[str, Any]]],
    ) -> Iterator[tuple[int, Any]]:
        """(index, result) for each pending (index, inputs), in the order chunks finish."""
        from pipeline.progress import console

        todo = list(pending)
        if not todo:
            return
        self._connect(show_progress=console.is_terminal)
        resources = self.cfg.stages.get(name, RayStage())
        job = _Job(module.__name__, section, env.seed, Path(env.workdir), env.run_config)
        chunked = module.SPEC.chunked
        import ray

        try:
            if chunked is None or any(inputs[chunked].num_rows == 0 for _, inputs in todo):
                # One call (a stage that is not chunked, or the single empty chunk of an empty
                # input).
                yield from self._tasks(job, todo, resources)
            else:
                yield from self._dataset(job, chunked, todo, resources)
        except ray.exceptions.RayError as err:
            # Ray's message is the whole remote traceback; the stage's own error is its last
            # non-Ray "SomeError: message" line.
            found = [m.group(0) for m in _ERROR_LINE.finditer(str(err))]
            raise RuntimeError(
                f"stage {name} failed on Ray: {found[-1] if found else type(err).__name__}"
                " (RETRACE_DEBUG=1 shows the worker's traceback)"
            ) from err

    @staticmethod
    def _tasks(job: _Job, todo: list, resources: RayStage) -> Iterator[tuple[int, dict]]:
        import ray

        remote = ray.remote(_run_whole).options(
            num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, max_retries=0
        )
        refs = [(index, remote.remote(job, inputs)) for index, inputs in todo]
        for index, ref in refs:
            yield index, ray.get(ref)

    @staticmethod
    def _dataset(job: _Job, chunked: str, todo: list, resources: RayStage) -> Iterator:
        import ray
        import ray.data

        shared = ray.put({k: v for k, v in todo[0][1].items() if k != chunked})
        blocks = [
            inputs[chunked].append_column(CHUNK, pa.array([index] * inputs[chunked].num_rows))
            for index, inputs in todo
        ]
        common: dict[str, Any] = {
            "batch_size": None,  # a block, i.e. one whole chunk, per call
            "batch_format": "pyarrow",
            "num_cpus": resources.num_cpus,
            "num_gpus": resources.num_gpus,
        }
        if _uses_models(job.section):
            common["compute"] = ray.data.ActorPoolStrategy(size=resources.actors)
            fn: Any = _ChunkActor
            common["fn_constructor_args"] = (job, chunked, [shared])
        else:
            common["concurrency"] = resources.actors
            fn = _run_chunks
            common["fn_args"] = (job, chunked, [shared])
        dataset = ray.data.from_arrow(blocks).map_batches(fn, **common)
        seen: set[int] = set()
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                if row["chunk"] in seen:
                    raise RuntimeError(
                        f"{job.module}: chunk {row['chunk']} was computed twice on Ray (a chunk "
                        "split across batches); report this with your Ray version"
                    )
                seen.add(row["chunk"])
                yield row["chunk"], pickle.loads(row["result"])


class _Job:
    """What a Ray worker needs to run a stage: its module by name, its config and env fields."""

    def __init__(
        self, module: str, section: BaseModel, seed: int, workdir: Path, run_config: dict
    ) -> None:
        self.module, self.section, self.seed = module, section, seed
        self.workdir, self.run_config = workdir, run_config

    def env(self) -> Any:
        from pipeline.env import LocalEnv

        return LocalEnv(seed=self.seed, workdir=self.workdir, run_config=self.run_config)

    def stage(self) -> ModuleType:
        return importlib.import_module(self.module)


def _uses_models(section: BaseModel) -> bool:
    return any(True for _ in models_in(section))


def _run_whole(job: _Job, inputs: dict[str, Any]) -> Any:
    return _picklable(job.stage().run(inputs, job.section, job.env()))


def _picklable(result: Any) -> Any:
    """A result with every streamed table (a reader) read whole: it travels back pickled."""
    return {k: whole(v) for k, v in result.items()} if isinstance(result, dict) else result


def _run_chunks(
    batch: pa.Table, job: _Job, chunked: str, shared: list, env: Any = None, stage: Any = None
) -> pa.Table:
    """Run the stage on each chunk in `batch` (one, as blocks are chunks); pack the outputs."""
    import ray

    inputs = ray.get(shared[0])
    env, stage = env or job.env(), stage or job.stage()
    rows: list[dict[str, Any]] = []
    tags = batch.column(CHUNK)
    for index in dict.fromkeys(tags.to_pylist()):
        chunk = batch.filter(pc.equal(tags, index)).drop_columns([CHUNK])
        result = run_chunk(
            job.module.rsplit(".", 1)[-1],
            index,
            stage,
            {**inputs, chunked: chunk},
            job.section,
            env,
        )
        rows.append({"chunk": index, "result": pickle.dumps(_picklable(result), protocol=5)})
    return pa.Table.from_pylist(rows, schema=_PACKED)


class _ChunkActor:
    """A model stage's worker: one env (so one model load) for every chunk it is given."""

    def __init__(self, job: _Job, chunked: str, shared: list) -> None:
        self.job, self.chunked, self.shared = job, chunked, shared
        self.env, self.stage = job.env(), job.stage()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _run_chunks(batch, self.job, self.chunked, self.shared, self.env, self.stage)
