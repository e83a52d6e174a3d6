"""The engine: order stages, compute cache keys, run chunks, resume, write manifests.

A stage runs when asked for (or needed by one that is) unless its manifest's cache key matches.
The key covers what changes a stage's output and nothing else: its config section (less the
failure bound), the run seed, its inputs' content hashes, its code, its prompt files, its external
files and the identity of every model it names. Chunked stages resume from their last finished
chunk; each chunk's tables are renamed into place before the chunk is marked done.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import platform
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import pyarrow as pa
from pydantic import BaseModel

from pipeline import records, store
from pipeline.config import section_dump
from pipeline.progress import console
from pipeline.stage import LocalEnv, ModelSpec, StageSpec
from pipeline.taxonomy import PROMPTS_DIR, TAXONOMY_FILE

# DAG order (DESIGN §3). `retrace run` stops at publish: push needs a network and a repo id,
# train a GPU-sized budget, eval a trained model; each runs when named.
STAGES = (
    "sources",
    "sample",
    "filter",
    "inject",
    "rewrite",
    "format",
    "blend",
    "publish",
    "push",
    "train",
    "eval",
)
DATASET_STAGES = STAGES[: STAGES.index("publish") + 1]

_CONTRACT_FILES = (Path(records.__file__), TAXONOMY_FILE)
_VERSIONED = ("retrace", "torch", "transformers", "datasets", "pyarrow", "vllm", "detoxify")


class StageError(Exception):
    """A stage that cannot run or finished outside its bounds; the message says what to do."""


def load_stages(names: tuple[str, ...] = STAGES) -> dict[str, ModuleType]:
    return {name: importlib.import_module(f"stages.{name}") for name in names}


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for pkg in _VERSIONED:
        try:
            found[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return found


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _models(value: Any) -> Iterator[ModelSpec]:
    if isinstance(value, ModelSpec):
        yield value
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _models(getattr(value, name))
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _models(item)


class Pipeline:
    """A validated config, its stage modules and its run store."""

    def __init__(self, cfg: BaseModel, stages: Mapping[str, ModuleType]) -> None:
        self.cfg = cfg
        self.stages = dict(stages)
        self.run_cfg = cfg.run
        folders = {n: self.spec(n).folder for n in self.stages if self.spec(n).folder}
        self.store = store.RunStore(Path(cfg.run.runs_dir) / cfg.run.name, folders)
        self.resolved = section_dump(cfg)

    # --- graph -----------------------------------------------------------------------------

    def spec(self, name: str) -> StageSpec:
        if name not in self.stages:
            raise StageError(f"unknown stage {name!r}; stages: {', '.join(self.stages)}")
        spec_for = getattr(self.stages[name], "spec_for", None)
        return spec_for(self.section(name)) if spec_for else self.stages[name].SPEC

    def closure(self, targets: list[str]) -> list[str]:
        """The targets and everything they need, in DAG order."""
        needed: set[str] = set()
        todo = list(targets)
        while todo:
            name = todo.pop()
            if name not in needed:
                needed.add(name)
                todo.extend(self.spec(name).needs)
        return [s for s in self.stages if s in needed]

    def descendants(self, name: str) -> set[str]:
        found = {name}
        for stage in self.stages:  # DAG order: a stage's needs come before it
            if found.intersection(self.spec(stage).needs):
                found.add(stage)
        return found

    # --- cache keys ------------------------------------------------------------------------

    def _code_files(self, name: str) -> list[Path]:
        module = Path(self.stages[name].__file__)
        helpers = sorted(module.parent.glob(f"{module.stem}_*.py"))
        return [module, *helpers, *_CONTRACT_FILES]

    def _prompt_files(self, spec: StageSpec) -> list[Path]:
        return sorted({p for g in spec.prompts for p in PROMPTS_DIR.glob(g) if p.is_file()})

    def input_hashes(self, name: str) -> dict[str, str] | None:
        """Content hash of each input, or None while an upstream stage has no output."""
        hashes = {}
        for read in self.spec(name).reads:
            upstream, table = read.split(".", 1)
            manifest = self.store.manifest(upstream)
            if manifest is None or table not in manifest["outputs"]:
                return None
            hashes[read] = manifest["outputs"][table]["sha256"]
        return hashes

    def chunk_size(self, name: str) -> int:
        return getattr(self.section(name), "chunk_size", None) or self.run_cfg.chunk_size

    def section(self, name: str) -> BaseModel:
        return getattr(self.cfg, name)

    def key(self, name: str) -> tuple[str, dict[str, Any]] | None:
        inputs = self.input_hashes(name)
        if inputs is None:
            return None
        spec, section = self.spec(name), self.section(name)
        module = self.stages[name]
        external = getattr(module, "external_files", lambda cfg: [])(section)
        parts = {
            "stage": name,
            "config": section.model_dump(mode="json", exclude={"max_rejected_share"}),
            "seed": self.run_cfg.seed,
            "chunk_size": self.chunk_size(name) if spec.chunked else None,
            "inputs": inputs,
            "code": store.hash_files(self._code_files(name)),
            "prompts": store.hash_files(self._prompt_files(spec), root=PROMPTS_DIR),
            "external": store.hash_files([Path(p) for p in external]),
            "models": [m.fingerprint() for m in _models(section)]
            + list(getattr(module, "fingerprints", lambda cfg: [])(section)),
        }
        return _sha(parts), parts

    def status(self, name: str) -> str:
        """fresh | stale | missing | partial (a resumable attempt) for one stage."""
        return self.statuses([name])[name]

    def statuses(self, targets: list[str]) -> dict[str, str]:
        """The state of the targets and what they need, each key computed once, in DAG order."""
        found: dict[str, str] = {}
        for name in self.closure(targets):
            manifest = self.store.manifest(name)
            computed = self.key(name)
            if manifest is not None:
                upstream_fresh = all(found[n] == "fresh" for n in self.spec(name).needs)
                fresh = computed is not None and manifest["key"] == computed[0] and upstream_fresh
                found[name] = "fresh" if fresh else "stale"
            elif computed and (self.store.work_dir(name, computed[0]) / "_done").is_dir():
                found[name] = "partial"
            else:
                found[name] = "missing"
        return found

    # --- running ---------------------------------------------------------------------------

    def run(self, targets: list[str], force: set[str] = frozenset()) -> dict[str, str]:
        """Run targets and what they need; returns what happened to each stage."""
        forced: set[str] = set()
        for name in force:
            forced |= self.descendants(name)
        outcome = {}
        for name in self.closure(targets):
            computed = self.key(name)
            if computed is None:  # cannot happen in DAG order unless an upstream failed
                raise StageError(f"{name}: an input stage has no output; run its stages first")
            key, parts = computed
            manifest = self.store.manifest(name)
            cached = self.spec(name).cached and manifest is not None and manifest["key"] == key
            if cached and name not in forced:
                console.print(f"[dim]{name}: cached ({manifest['seconds']:.1f} s when built)[/]")
                outcome[name] = "cached"
                continue
            self._run_stage(name, key, parts)
            outcome[name] = "ran"
        return outcome

    def _inputs(self, spec: StageSpec) -> dict[str, Any]:
        loaded: dict[str, Any] = {}
        for read in spec.reads:
            upstream, table = read.split(".", 1)
            if read == spec.chunked:
                continue
            if table == store.FILES:
                loaded[read] = self.store.files_dir(upstream)
            else:
                loaded[read] = self.store.read(upstream, table)
        return loaded

    def _chunks(self, spec: StageSpec, size: int) -> Iterator[pa.Table | None]:
        if spec.chunked is None:
            yield None
            return
        upstream, table = spec.chunked.split(".", 1)
        folder = self.store.table_dir(upstream, table)
        empty = True
        for chunk in store.iter_chunks(folder, size):
            empty = False
            yield chunk
        if empty:  # still call the stage once, so it returns empty tables with their schemas
            yield self.store.read(upstream, table).slice(0, 0)

    def _run_stage(self, name: str, key: str, parts: dict[str, Any]) -> None:
        with self.store.lock(name):
            self._run_locked(name, key, parts)

    def _run_locked(self, name: str, key: str, parts: dict[str, Any]) -> None:
        spec, section, module = self.spec(name), self.section(name), self.stages[name]
        tables = [*spec.writes, "rejected"]
        work = self.store.work_dir(name, key)
        done_dir = work / "_done"
        done_dir.mkdir(parents=True, exist_ok=True)
        env = LocalEnv(
            seed=self.run_cfg.seed,
            workdir=work / store.FILES,
            run_config=self.resolved,
            show_progress=True,
        )
        env.workdir.mkdir(exist_ok=True)
        started = time.monotonic()
        inputs = self._inputs(spec)
        size = self.chunk_size(name)
        resumed = len(list(done_dir.iterdir()))
        if resumed:
            console.print(f"{name}: resuming after {resumed} finished chunk(s)")
        else:
            console.print(f"{name}: running")
        rows_in = Counter({r: t.num_rows for r, t in inputs.items() if isinstance(t, pa.Table)})
        for index, chunk in enumerate(self._chunks(spec, size)):
            if chunk is not None:
                rows_in[spec.chunked] += chunk.num_rows
            marker = done_dir / f"{index:05d}"
            if marker.exists():
                continue
            chunk_inputs = inputs if chunk is None else {**inputs, spec.chunked: chunk}
            outputs = module.run(chunk_inputs, section, env)
            self._check_outputs(name, tables, outputs)
            for table in tables:
                path = work / table / f"part-{index:05d}.parquet"
                store.atomic_write_table(path, outputs[table])
            marker.touch()
            if chunk is not None and not console.is_terminal:  # a log line instead of the bar
                elapsed = time.monotonic() - started
                done = rows_in[spec.chunked]
                console.print(f"  {name}: chunk {index} done, {done} rows in {elapsed:.0f} s")
        if not any(env.workdir.iterdir()):
            env.workdir.rmdir()  # the stage wrote no files
        outputs = store.hash_outputs(work, tables)
        if not spec.reads:  # a source stage: what it loaded is what it kept plus what it rejected
            rows_in["loaded"] = sum(o["rows"] for t, o in outputs.items() if t != store.FILES)
        self._check_rejected(name, section, work, sum(rows_in.values()), outputs)
        reasons = Counter(store.read_parts(work / "rejected").column("reason").to_pylist())
        manifest = {
            "stage": name,
            "key": key,
            "key_parts": parts,
            "config": section.model_dump(mode="json"),
            "seed": self.run_cfg.seed,
            "rows_in": dict(rows_in),
            "rows_out": {t: o["rows"] for t, o in outputs.items() if t != "rejected"},
            "rejected": outputs["rejected"]["rows"],
            "rejected_by_reason": dict(sorted(reasons.items())),
            "outputs": outputs,
            "seconds": round(time.monotonic() - started, 3),
            "versions": versions(),
        }
        self.store.finalize(name, work, tables, manifest)
        counts = ", ".join(f"{t} {o['rows']}" for t, o in outputs.items() if t != store.FILES)
        console.print(f"[green]{name}: done[/] in {manifest['seconds']:.1f} s ({counts})")
        if store.FILES in outputs:  # where the stage's files live now, not its work folder
            console.print(f"  {name}: files in {self.store.files_dir(name)}")

    @staticmethod
    def _check_outputs(name: str, tables: list[str], outputs: Any) -> None:
        if not isinstance(outputs, dict) or set(outputs) != set(tables):
            got = sorted(outputs) if isinstance(outputs, dict) else type(outputs).__name__
            raise StageError(f"stage {name} returned {got}; its SPEC promises {sorted(tables)}")
        for table, value in outputs.items():
            if not isinstance(value, pa.Table):
                raise StageError(f"stage {name}: output {table!r} is not a pyarrow Table")

    def _check_rejected(
        self, name: str, section: BaseModel, work: Path, rows_in: int, outputs: dict
    ) -> None:
        bound = section.max_rejected_share
        bound = self.run_cfg.max_rejected_share if bound is None else bound
        rejected = outputs["rejected"]["rows"]
        if rows_in and rejected / rows_in > bound:
            reasons = Counter(store.read_parts(work / "rejected").column("reason").to_pylist())
            top = ", ".join(f"{r} {n}" for r, n in reasons.most_common(3))
            raise StageError(
                f"stage {name} rejected {rejected} of {rows_in} input rows "
                f"({rejected / rows_in:.0%}, bound {bound:.0%}; top reasons: {top}); "
                f"inspect {work / 'rejected'} and fix the input, or raise "
                f"{name}.max_rejected_share"
            )
