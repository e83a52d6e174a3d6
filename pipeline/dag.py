"""The engine: order stages, compute cache keys, run chunks, resume, write manifests.

A stage runs when asked for (or needed by one that is) unless its manifest's cache key matches.
The key covers what changes a stage's output and nothing else: its config section (less the
failure bound), the run seed, its inputs' content hashes, its code (every project module it
imports, directly or not), its prompt files, its external files and the identity of every model
it names. Chunked stages resume from their last finished chunk; each chunk's tables are renamed
into place before the chunk is marked done. One process holds a run at a time.

The engine is handed its stage modules (the CLI loads `stages.STAGES`); it imports no stage. A
chunk's computation, `run_chunk` (the stage's `run` on one chunk's inputs, pipeline/executor.py),
is the seam an executor replaces: `LocalExecutor` runs chunks one by one in this process; the
engine around it writes parts, markers and manifests, whatever computed them.
"""

from __future__ import annotations

import ast
import contextlib
import errno
import functools
import hashlib
import json
import numbers
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pyarrow as pa
from pydantic import BaseModel

from pipeline import digest, records, retry, store
from pipeline.config import section_dump
from pipeline.env import LocalEnv
from pipeline.errors import RetraceError
from pipeline.executor import LocalExecutor, models_in
from pipeline.progress import console
from pipeline.stage import HOOKS, StageSpec
from pipeline.taxonomy import PROMPTS_DIR, TAXONOMY_FILE
from pipeline.versions import versions

PROJECT_ROOT = Path(__file__).resolve().parents[1]
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
_VERSIONED = ("retrace", "torch", "transformers", "datasets", "pyarrow", "vllm", "detoxify")


class StageError(RetraceError):
    """A stage that cannot run or finished outside its bounds; the message says what to do."""


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


# --- code identity -------------------------------------------------------------------------------


def module_root(module: ModuleType) -> Path:
    """The folder a module's top-level package lives in (the entry of sys.path it came from)."""
    return Path(module.__file__).resolve().parents[module.__name__.count(".")]


def _module_files(dotted: str, roots: tuple[Path, ...]) -> list[Path]:
    """The files importing `dotted` runs (each package's __init__ too), under the first root that
    has its top-level package; none when it is not project code."""
    parts = dotted.split(".")
    for root in roots:
        found = []
        for depth in range(1, len(parts) + 1):
            base = root.joinpath(*parts[:depth])
            if (base / "__init__.py").is_file():
                found.append(base / "__init__.py")
            elif base.with_suffix(".py").is_file():
                found.append(base.with_suffix(".py"))
                break
            else:
                break
        if found:
            return found
    return []


def _dotted(path: Path, roots: tuple[Path, ...]) -> str:
    for root in roots:
        if path.is_relative_to(root):
            rel = path.relative_to(root).with_suffix("")
            return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
    return path.stem


@functools.cache
def _imported(path: Path, package: str, mtime_ns: int) -> tuple[str, ...]:
    """Every module name an import statement in the file names (those inside functions too)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            names += [base, *(f"{base}.{alias.name}" for alias in node.names)]
    return tuple(names)


def import_closure(files: Iterable[Path], roots: tuple[Path, ...]) -> list[Path]:
    """Every project file these files import, directly or through others (themselves included).

    Read from the source, not from what is loaded, so a module a stage imports lazily counts too.
    The __init__ files of the files' own packages count by content, but what they import does not
    (a package that imports all its stages must not tie each stage to the others).
    """
    todo = [Path(f).resolve() for f in files]
    seen = {p.resolve() for f in todo for p in _module_files(_dotted(f, roots), roots)} - set(todo)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        module = _dotted(path, roots)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for name in _imported(path, package, path.stat().st_mtime_ns):
            todo.extend(p.resolve() for p in _module_files(name, roots))
    return sorted(seen)


# --- executors ---------------------------------------------------------------------------------


# `run.executor` -> a function of the `run:` section that builds the executor (another executor
# reads its own settings from there).
EXECUTORS: dict[str, Callable[[Any], Any]] = {"local": lambda run: LocalExecutor()}


def _ray_executor(run: Any) -> Any:
    from pipeline.executor_ray import RayExecutor  # ray is an extra: imported only when asked

    return RayExecutor(run.ray)


EXECUTORS["ray"] = _ray_executor


# --- the pipeline ------------------------------------------------------------------------------


class Pipeline:
    """A validated config, its stage modules and its run store."""

    def __init__(self, cfg: BaseModel, stages: Mapping[str, ModuleType]) -> None:
        self.cfg = cfg
        self.stages = dict(stages)
        self.run_cfg = cfg.run
        folders = {n: self.spec(n).folder for n in self.stages if self.spec(n).folder}
        self.store = store.RunStore(Path(cfg.run.runs_dir) / cfg.run.name, folders)
        self.resolved = section_dump(cfg)
        self.executor = EXECUTORS[cfg.run.executor](cfg.run)
        for name in self.stages:
            self._check_contract(name)

    def _check_contract(self, name: str) -> None:
        module, spec = self.stages[name], self.stages[name].SPEC
        if spec.name != name:
            raise StageError(f"stages.{name}: its SPEC is named {spec.name!r}; name it {name!r}")
        for hook in HOOKS:
            declared, defined = hook in spec.hooks, callable(getattr(module, hook, None))
            if declared and not defined:
                raise StageError(f"stage {name}: SPEC.hooks names {hook} but the module has none")
            if defined and not declared:
                raise StageError(
                    f"stage {name} defines {hook} without naming it in SPEC.hooks; add it there"
                )

    # --- graph -----------------------------------------------------------------------------

    def spec(self, name: str) -> StageSpec:
        if name not in self.stages:
            raise StageError(f"unknown stage {name!r}; stages: {', '.join(self.stages)}")
        module = self.stages[name]
        if "spec_for" in module.SPEC.hooks:
            return module.spec_for(self.section(name))
        return module.SPEC

    def closure(self, targets: Iterable[str]) -> list[str]:
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

    def code_files(self, name: str) -> list[Path]:
        """The project files the stage's code is made of: its import closure, the modules of
        the model specs its config holds, and the taxonomy every stage reads."""
        module = self.stages[name]
        specs = {sys.modules[type(m).__module__] for m in models_in(self.section(name))}
        roots = tuple(dict.fromkeys([module_root(module), PROJECT_ROOT]))
        files = [Path(module.__file__), *(Path(m.__file__) for m in specs)]
        return [*import_closure(files, roots), TAXONOMY_FILE]

    def _prompt_files(self, spec: StageSpec) -> list[Path]:
        return sorted({p for g in spec.prompts for p in PROMPTS_DIR.glob(g) if p.is_file()})

    def _hook(self, name: str, hook: str) -> list[Any]:
        if hook not in self.spec(name).hooks:
            return []
        return list(getattr(self.stages[name], hook)(self.section(name)))

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
        code = sorted(self.code_files(name))
        parts = {
            "stage": name,
            "config": section.model_dump(mode="json", exclude={"max_rejected_share"}),
            "seed": self.run_cfg.seed,
            "chunk_size": self.chunk_size(name) if spec.chunked else None,
            "inputs": inputs,
            # By content, in path order: the same code hashes the same in any checkout.
            "code": _sha(digest.file_digests(code)),
            "prompts": digest.hash_files(self._prompt_files(spec), root=PROMPTS_DIR),
            "external": digest.hash_files([Path(p) for p in self._hook(name, "external_files")]),
            "models": [m.fingerprint() for m in models_in(section)]
            + self._hook(name, "fingerprints"),
        }
        if "embedded_config" in spec.hooks:  # only then: every other stage keeps its key
            parts["embedded_config"] = self.stages[name].embedded_config(self.resolved)
        return _sha(parts), parts

    def statuses(self, targets: list[str]) -> dict[str, str]:
        """fresh | stale | missing | partial (a resumable attempt) | running (another process is
        running it now) for the targets and what they need, each key computed once, in DAG
        order."""
        found: dict[str, str] = {}
        holder = self.store.holder()
        for name in self.closure(targets):
            manifest = self.store.manifest(name)
            computed = self.key(name)
            work = self.store.work_dir(name, computed[0]) if computed else None
            if holder is not None and holder.get("stage") == name:
                found[name] = "running"
            elif self.store.pending_commit(name) is not None:
                found[name] = "partial"  # the next run finishes moving it into place
            elif manifest is not None:
                upstream_fresh = all(found[n] == "fresh" for n in self.spec(name).needs)
                fresh = computed is not None and manifest["key"] == computed[0] and upstream_fresh
                found[name] = "fresh" if fresh else "stale"
                if fresh and retry.waiting(self.spec(name), manifest):
                    found[name] = "partial"  # rows a server failed on wait for the next run
            elif work is not None and _resumable(work):
                found[name] = "partial"
            else:
                found[name] = "missing"
        return found

    def progress(self, name: str, state: str) -> str | None:
        """What is known of a running or partial stage's attempt: its finished chunks and the
        last line it logged (a training's latest step, say)."""
        if state == "running":
            held = self.store.holder() or {}
            work = self.store.stage_dir(name) / held.get("work", "")
            who = f"by {store.describe_holder(held)}"
        elif state == "partial":
            computed = self.key(name)
            if computed is None:
                return None
            work, who = self.store.work_dir(name, computed[0]), "resumable"
        else:
            return None
        chunks = len(list((work / store.DONE).glob("*"))) if (work / store.DONE).is_dir() else 0
        said = [who] + ([f"{chunks} chunk(s) done"] if chunks else [])
        if (note := self.store.note(work)) is not None:
            said.append(f"last: {note}")
        return "; ".join(said)

    # --- running ---------------------------------------------------------------------------

    def run(self, targets: list[str], force: Iterable[str] = ()) -> dict[str, str]:
        """Run targets and what they need; returns what happened to each stage."""
        order = self.closure(targets)
        forced: set[str] = set()
        for name in force:
            if name not in order:
                self.spec(name)  # an unknown name fails naming the stages
                raise StageError(
                    f"--force {name}: not a stage this run reaches ({', '.join(order)}); "
                    f"name one of those, or run up to {name}"
                )
            forced |= self.descendants(name)
        outcome = {}
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(self.store.lock())
            except OSError as err:
                # A finished run on read-only media (or in a folder this user may not write):
                # a run with nothing to write needs no lock.
                if err.errno not in _READ_ONLY or not self._nothing_to_write(order, forced):
                    raise
                console.print(f"[dim]{self.store.root} is read-only; every stage is cached[/]")
            for stage in self.store.recover():
                console.print(f"[dim]{stage}: finished moving an interrupted attempt into place[/]")
            for name in order:
                computed = self.key(name)
                if computed is None:  # cannot happen in DAG order unless an upstream failed
                    raise StageError(f"{name}: an input stage has no output; run its stages first")
                key, parts = computed
                manifest = self.store.manifest(name)
                cached = self.spec(name).cached and manifest is not None and manifest["key"] == key
                waiting = retry.waiting(self.spec(name), manifest) if cached else 0
                if cached and name not in forced and not waiting:
                    console.print(
                        f"[dim]{name}: cached ({manifest['seconds']:.1f} s when built)[/]"
                    )
                    outcome[name] = "cached"
                    continue
                self._check_inputs_have_rows(name)
                # A finished stage with rows to retry reopens; --force redoes every row.
                reopen = manifest if cached and name not in forced else None
                self.store.announce(name, self.store.work_dir(name, key))
                try:
                    self._run_stage(name, key, parts, fresh=name in forced, reopen=reopen)
                except Exception as err:  # writing parts, hashing, finalizing: name the stage
                    notes = getattr(err, "__notes__", ())
                    if not isinstance(err, StageError) and not any("in stage" in n for n in notes):
                        err.add_note(f"in stage {name}")
                    raise
                outcome[name] = "ran"
        return outcome

    def _nothing_to_write(self, order: list[str], forced: set[str]) -> bool:
        """Every stage of `order` cached and fresh, none forced, no move left to finish."""
        states = self.statuses(order)
        return not forced and all(states[n] == "fresh" and self.spec(n).cached for n in order)

    def _check_inputs_have_rows(self, name: str) -> None:
        for read in self.spec(name).must_have_rows:
            upstream, table = read.split(".", 1)
            manifest = self.store.manifest(upstream)
            if manifest["outputs"][table]["rows"]:
                continue
            rejected = manifest["rejected"]
            top = ", ".join(
                f"{r} {n}" for r, n in Counter(manifest["rejected_by_reason"]).most_common(3)
            )
            why = (
                f"{upstream} rejected {rejected} row(s): {top}" if rejected else "nothing rejected"
            )
            raise StageError(
                f"stage {name} cannot start: its input {read} is empty ({why}); inspect "
                f"{self.store.table_dir(upstream, 'rejected')}, then loosen the {upstream} "
                "settings or give it more input"
            )

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
        yield from store.iter_chunks(self.store.table_dir(upstream, table), size)

    def _run_stage(
        self, name: str, key: str, parts: dict[str, Any], fresh: bool, reopen: dict | None = None
    ) -> None:
        spec, section, module = self.spec(name), self.section(name), self.stages[name]
        tables = [*spec.writes, "rejected"]
        work = self.store.open_attempt(name, key, tables, fresh=fresh or reopen is not None)
        if reopen is not None:  # a finished stage, to retry its rows rejected for SPEC.retried
            retry.reopen(self.store.stage_dir(name), work, tables, reopen["stats"])
            console.print(
                f"{name}: retrying {retry.waiting(spec, reopen)} row(s) rejected as "
                f"{' or '.join(spec.retried)} last time"
            )
        done_dir = work / store.DONE
        env = LocalEnv(
            seed=self.run_cfg.seed,
            workdir=work / store.FILES,
            run_config=self.resolved,
            show_progress=True,
            note=work / store.NOTE,
        )
        env.workdir.mkdir(exist_ok=True)
        started = time.monotonic()
        inputs = self._inputs(spec)
        size = self.chunk_size(name)
        resumed = len(list(done_dir.iterdir()))
        if reopen is None:
            console.print(
                f"{name}: resuming after {resumed} finished chunk(s)"
                if resumed
                else f"{name}: running"
            )
        rows_in = Counter({r: t.num_rows for r, t in inputs.items() if isinstance(t, pa.Table)})

        again: dict[int, pa.Table] = {}  # done chunk -> its rows to retry

        def pending() -> Iterator[tuple[int, dict[str, Any]]]:
            for index, chunk in enumerate(self._chunks(spec, size)):
                if chunk is not None:
                    rows_in[spec.chunked] += chunk.num_rows
                if not (done_dir / store.chunk_name(index)).exists():
                    yield index, inputs if chunk is None else {**inputs, spec.chunked: chunk}
                elif (rows := retry.rows(spec, work, index, chunk)) is not None:
                    again[index] = rows
                    yield index, {**inputs, spec.chunked: rows}

        schemas = {**spec.writes, "rejected": records.REJECTED}
        for index, outputs in self.executor.map(name, module, section, env, pending()):
            stats = self._check_outputs(name, spec, outputs)
            if index in again:
                outputs, stats = retry.merge(spec, work, index, again.pop(index), outputs, stats)
            for table in tables:
                path = store.part_path(work, table, index)
                value = _checked(name, table, outputs[table], schemas[table])
                store.atomic_write_table(path, value)
            store.atomic_write_bytes(done_dir / store.chunk_name(index), json.dumps(stats).encode())
            if spec.chunked and not console.is_terminal:  # a log line instead of the bar
                elapsed = time.monotonic() - started
                console.print(f"  {name}: chunk {index} done in {elapsed:.0f} s")
        self._finish(name, key, parts, work, tables, rows_in, started)

    def _finish(self, name, key, parts, work, tables, rows_in, started) -> None:
        spec, section = self.spec(name), self.section(name)
        stats: Counter = Counter()
        for marker in sorted((work / store.DONE).iterdir()):
            stats.update(json.loads(marker.read_text() or "{}"))
        files = work / store.FILES
        if files.is_dir() and not any(files.iterdir()):
            files.rmdir()  # the stage wrote no files
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
            "stats": dict(sorted(stats.items())),
            "outputs": outputs,
            "seconds": round(time.monotonic() - started, 3),
            "versions": versions(_VERSIONED),
        }
        self.store.finalize(name, work, tables, manifest)
        counts = ", ".join(f"{t} {o['rows']}" for t, o in outputs.items() if t != store.FILES)
        console.print(f"[green]{name}: done[/] in {manifest['seconds']:.1f} s ({counts})")
        if waiting := retry.waiting(spec, manifest):
            console.print(
                f"[yellow]{name}: {waiting} row(s) rejected as {' or '.join(spec.retried)}; "
                "the next run retries them[/]"
            )
        if store.FILES in outputs:  # where the stage's files live now, not its work folder
            console.print(f"  {name}: files in {self.store.files_dir(name)}")

    @staticmethod
    def _check_outputs(name: str, spec: StageSpec, outputs: Any) -> dict[str, Any]:
        """The chunk's stats, once its tables are exactly what SPEC promises."""
        expected = {**spec.writes, "rejected": records.REJECTED}
        got = set(outputs) - {"stats"} if isinstance(outputs, dict) else None
        if got != set(expected):
            shown = sorted(got) if got is not None else type(outputs).__name__
            raise StageError(f"stage {name} returned {shown}; its SPEC promises {sorted(expected)}")
        for table, schema in expected.items():
            value = outputs[table]
            if not isinstance(value, pa.Table | pa.RecordBatchReader):
                raise StageError(
                    f"stage {name}: output {table!r} is not a pyarrow Table or RecordBatchReader"
                )
            _check_schema(name, table, value.schema, schema)
        stats = outputs.get("stats", {})
        if not isinstance(stats, dict) or not all(
            isinstance(k, str) and isinstance(v, numbers.Number) for k, v in stats.items()
        ):
            raise StageError(f"stage {name}: its stats must map names to numbers, got {stats!r}")
        return stats

    def _check_rejected(
        self, name: str, section: BaseModel, work: Path, rows_in: int, outputs: dict
    ) -> None:
        bound = section.max_rejected_share
        bound = self.run_cfg.max_rejected_share if bound is None else bound
        rejected = outputs["rejected"]["rows"]
        if rows_in and rejected / rows_in > bound:
            reasons = Counter(store.read_parts(work / "rejected").column("reason").to_pylist())
            top = ", ".join(f"{r} {n}" for r, n in reasons.most_common(3))
            spec = self.spec(name)
            again = [r for r in spec.retried if reasons[r]]
            todo = (
                f"rerun once the cause has passed (rows rejected as {' or '.join(again)} are "
                "retried)"
                if again
                else f"inspect {work / 'rejected'} and fix the input"
            )
            raise StageError(
                f"stage {name} rejected {rejected} of {rows_in} input rows "
                f"({rejected / rows_in:.0%}, bound {bound:.0%}; top reasons: {top}); "
                f"{todo}, or raise {name}.max_rejected_share"
            )


def _resumable(work: Path) -> bool:
    """An attempt with something to resume from: finished chunks, or files (a checkpoint)."""
    files = work / store.FILES
    return any((work / store.DONE).glob("*")) or (files.is_dir() and any(files.iterdir()))


def _check_schema(name: str, table: str, got: pa.Schema, want: pa.Schema) -> None:
    if problem := _schema_problem(got, want):
        raise StageError(
            f"stage {name}: output {table}: {problem}; build it with "
            "records.table(rows, <its schema in pipeline/records.py>)"
        )


def _checked(name: str, table: str, value: Any, want: pa.Schema) -> Any:
    """An output as it is written: a reader's batches each checked against the declared schema
    on the way (a reader built from batches does not check them against its own)."""
    if not isinstance(value, pa.RecordBatchReader):
        return value

    def batches() -> Iterator[pa.RecordBatch]:
        for batch in value:
            _check_schema(name, table, batch.schema, want)
            yield batch

    return pa.RecordBatchReader.from_batches(value.schema, batches())


def _schema_problem(got: pa.Schema, want: pa.Schema) -> str | None:
    """What differs between a table's schema and the declared one, naming the column."""
    for f in want:
        if f.name not in got.names:
            return f"column {f.name!r} is missing"
    for f in got:
        if f.name not in want.names:
            return f"column {f.name!r} is not in its schema"
    for f in want:
        other = got.field(f.name)
        if not other.type.equals(f.type):
            return f"column {f.name!r} is {other.type}, its schema says {f.type}"
        if other.nullable != f.nullable:
            return f"column {f.name!r} has nullable={other.nullable}, its schema {f.nullable}"
    if got.names != want.names:
        return f"columns are in the order {got.names}; its schema has {want.names}"
    return None
