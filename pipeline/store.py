"""The run store: `runs/<run>/<stage>/` with tables, files and `_manifest.json`.

Layout of one stage folder:

    <table>/part-NNNNN.parquet   every output table, one part per chunk
    files/                       files a stage wrote (the dataset folder, checkpoints)
    _manifest.json               written last: its presence means the stage completed
    .work-<key>/                 an attempt in progress; finished chunks are marked in _done/
    .work-<key>/_commit.json     the attempt is complete: what finalize moves, and its manifest

Everything is written to a temporary name and renamed, so a killed run never leaves a half file
under a final name. Finalizing a stage takes several renames (one per table); the commit record,
written (and fsynced) before the first of them, makes the whole move one step: a run that finds a
commit record finishes the move before anything else (`recover`), so a kill between two renames
loses nothing and never leaves a stage that claims outputs it does not have.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.digest import hash_files
from pipeline.errors import RetraceError

MANIFEST = "_manifest.json"
FILES = "files"
DONE = "_done"
COMMIT = "_commit.json"
LOCK = ".lock"
NOTE = "_note"  # an attempt's last progress line, for `retrace status`


class RunLocked(RetraceError):
    """Another process holds the run."""


def fsync(path: Path) -> None:
    """Flush a file's or a folder's entries to disk (a rename is durable once its folder is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root`, children before parents."""
    for folder, _, names in os.walk(root, topdown=False):
        for name in names:
            fsync(Path(folder) / name)
        fsync(Path(folder))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync(path.parent)


def atomic_write_table(path: Path, table: pa.Table | pa.RecordBatchReader) -> None:
    """Write a table, or a reader's batches as they come (one row group each, so a stage's
    output need never be held whole), under a temporary name renamed into place at the end; a
    failure while writing leaves nothing under either name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if isinstance(table, pa.RecordBatchReader):
            with pq.ParquetWriter(tmp, table.schema, compression="zstd") as writer:
                for batch in table:
                    writer.write_batch(batch)
        else:
            pq.write_table(table, tmp, compression="zstd")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(tmp)
    os.replace(tmp, path)


def _holder_of(text: str) -> dict[str, Any] | None:
    try:
        held = json.loads(text)
    except json.JSONDecodeError:
        return None
    return held if isinstance(held, dict) else None


def describe_holder(held: dict[str, Any]) -> str:
    """`pid N (`command`, since T)`, and the stage it runs once it has named one."""
    who = f"pid {held.get('pid')} (`{held.get('command', '')}`, since {held.get('since', '?')})"
    return f"{who}, running {held['stage']}" if held.get("stage") else who


def whole(value: Any) -> Any:
    """A stage output as one table: a reader's batches read (for a caller that needs them all,
    or a result that must travel pickled); anything else as it is."""
    return value.read_all() if isinstance(value, pa.RecordBatchReader) else value


def parts(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.parquet"))


def chunk_name(index: int) -> str:
    """A chunk's name: its done marker's, and its parts' after `part-`."""
    return f"{index:05d}"


def part_path(work: Path, table: str, index: int) -> Path:
    """Where chunk `index` of `table` is written in an attempt folder."""
    return work / table / f"part-{chunk_name(index)}.parquet"


def read_parts(folder: Path) -> pa.Table:
    files = parts(folder)
    if not files:
        raise FileNotFoundError(f"no table parts in {folder}")
    return pa.concat_tables([pq.read_table(f) for f in files])


def iter_chunks(folder: Path, chunk_size: int) -> Iterator[pa.Table]:
    """Exactly `chunk_size` rows at a time (the last chunk may be shorter), memory ~ one chunk."""
    pending: list[pa.RecordBatch] = []
    held = 0
    schema = None
    for f in parts(folder):
        pf = pq.ParquetFile(f)
        schema = pf.schema_arrow
        for batch in pf.iter_batches(batch_size=chunk_size):
            pending.append(batch)
            held += batch.num_rows
            while held >= chunk_size:
                table = pa.Table.from_batches(pending, schema=schema)
                yield table.slice(0, chunk_size).combine_chunks()
                rest = table.slice(chunk_size)
                pending, held = rest.to_batches(), rest.num_rows
    if held:
        yield pa.Table.from_batches(pending, schema=schema).combine_chunks()


def count_rows(folder: Path) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in parts(folder))


class RunStore:
    """One run's folder. Only the engine uses this; stages never see it."""

    def __init__(self, root: Path, folders: dict[str, str] | None = None) -> None:
        self.root = Path(root)
        self.folders = dict(folders or {})  # stage -> folder under root, where not its name
        self._held: Any = None  # the open lock file while this process holds the run
        self._holder: dict[str, Any] = {}

    def stage_dir(self, stage: str) -> Path:
        return self.root / self.folders.get(stage, stage)

    def table_dir(self, stage: str, table: str) -> Path:
        return self.stage_dir(stage) / table

    def files_dir(self, stage: str) -> Path:
        return self.stage_dir(stage) / FILES

    def work_dir(self, stage: str, key: str) -> Path:
        return self.stage_dir(stage) / f".work-{key[:16]}"

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the whole run for this process: one run, one writer.

        Two processes on one run name would interleave stages built from different configs
        (a card whose embedded config does not match its rows), so the second is refused. The
        lock file names its holder (and, once `announce`d, the stage it runs) for that refusal
        and for `retrace status`.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                held = _holder_of(handle.read())
                who = describe_holder(held) if held else "another process"
                raise RunLocked(
                    f"run {self.root} is in use by {who}; wait for it to finish, or give "
                    "this run another run.name"
                ) from None
            self._held = handle
            self._holder = {
                "pid": os.getpid(),
                "command": " ".join(sys.argv),
                "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            self._write_holder()
            try:
                yield
            finally:
                self._held = None
                handle.truncate(0)

    def announce(self, stage: str, work: Path) -> None:
        """Name the stage this process is running (and its attempt folder) in the lock file."""
        if self._held is not None:
            self._holder.update(stage=stage, work=work.name)
            self._write_holder()

    def _write_holder(self) -> None:
        self._held.truncate(0)  # the file is opened for appending: writes land at its end
        self._held.write(json.dumps(self._holder))
        self._held.flush()

    def holder(self) -> dict[str, Any] | None:
        """Who holds the run, when a live process does: its pid, command, start time and the
        stage it runs; None for a free run (or one whose holder died without releasing it)."""
        try:
            held = _holder_of((self.root / LOCK).read_text())
        except OSError:
            return None
        if held is None or held.get("pid") == os.getpid():
            return None
        try:
            os.kill(int(held["pid"]), 0)
        except ProcessLookupError:
            return None  # killed: the lock went with it, its text stayed
        except PermissionError:
            pass  # alive, another user's
        except (KeyError, TypeError, ValueError):
            return None
        return held

    def note(self, work: Path) -> str | None:
        """The last progress line an attempt logged (`LocalEnv.log`), if it logged any."""
        try:
            return (work / NOTE).read_text().strip() or None
        except (OSError, UnicodeDecodeError):
            return None

    def manifest(self, stage: str) -> dict[str, Any] | None:
        """The stage's manifest; None while it has none, or one a kill or a full disk left torn
        (empty, unparseable): that stage counts as not finished and runs again."""
        path = self.stage_dir(stage) / MANIFEST
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("key"), str):
            return None
        return manifest

    def read(self, stage: str, table: str) -> pa.Table:
        return read_parts(self.table_dir(stage, table))

    # --- attempts --------------------------------------------------------------------------

    def pending_commit(self, stage: str) -> Path | None:
        """The work folder of a committed attempt whose move was interrupted, if any."""
        folder = self.stage_dir(stage)
        found = sorted(folder.glob(f".work-*/{COMMIT}")) if folder.is_dir() else []
        return found[0].parent if found else None

    def recover(self) -> list[str]:
        """Finish every interrupted finalize in the run; returns the stages it finished.

        Call with the run locked, before reading any manifest.
        """
        finished = []
        stages = (
            sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []
        )
        for stage in stages:
            if (work := self.pending_commit(stage)) is not None:
                self._replay(stage, work)
                finished.append(stage)
        return finished

    def open_attempt(self, stage: str, key: str, tables: list[str], fresh: bool) -> Path:
        """The work folder for an attempt under `key`, keeping only chunks that are complete.

        A chunk counts as done when its marker exists and every table has its part (parts are
        written before the marker); anything else is discarded, so a resumed attempt never
        trips over what a killed one left. `fresh` discards the folder outright (--force).
        """
        work = self.work_dir(stage, key)
        if fresh and work.exists():
            shutil.rmtree(work)
        done = work / DONE
        done.mkdir(parents=True, exist_ok=True)
        for marker in list(done.iterdir()):
            if not all((work / t / f"part-{marker.name}.parquet").is_file() for t in tables):
                marker.unlink()
        kept = {m.name for m in done.iterdir()}
        for table in tables:
            for part in parts(work / table):
                if part.stem.removeprefix("part-") not in kept:
                    part.unlink()
            for stale in (work / table).glob(".*.tmp-*"):  # a part a kill cut off mid-write
                stale.unlink()
        return work

    def finalize(self, stage: str, work: Path, tables: list[str], manifest: dict[str, Any]) -> None:
        """Move a finished attempt into place, as one step: commit, then move, then manifest."""
        fsync_tree(work)
        present = [name for name in [*tables, FILES] if (work / name).exists()]
        record = {
            "moves": present,
            "drops": [name for name in [*tables, FILES] if name not in present],
            "manifest": manifest,
        }
        atomic_write_bytes(work / COMMIT, json.dumps(record, sort_keys=True).encode())
        self._replay(stage, work)

    def _replay(self, stage: str, work: Path) -> None:
        """Carry out a commit record; safe to repeat after a kill at any point."""
        record = json.loads((work / COMMIT).read_text())
        out = self.stage_dir(stage)
        # The old manifest goes first: a kill from here on leaves the stage without one (and
        # the commit record, so the next run finishes the move), never claiming mixed outputs.
        (out / MANIFEST).unlink(missing_ok=True)
        for name in record["drops"]:
            if (out / name).exists():
                shutil.rmtree(out / name)
        for name in record["moves"]:
            if (work / name).exists():  # not yet moved: what is under the final name is old
                if (out / name).exists():
                    shutil.rmtree(out / name)
                os.replace(work / name, out / name)
        fsync(out)
        manifest = json.dumps(record["manifest"], indent=2, sort_keys=True).encode()
        atomic_write_bytes(out / MANIFEST, manifest)
        shutil.rmtree(work)
        for stale in out.glob(".work-*"):  # attempts under other keys can never resume now
            shutil.rmtree(stale, ignore_errors=True)
        for stale in out.glob(".*.tmp-*"):  # a write a kill interrupted
            stale.unlink()


def hash_outputs(base: Path, tables: list[str]) -> dict[str, dict[str, Any]]:
    """Content hash and row count of each table under `base`, and of its files folder."""
    result: dict[str, dict[str, Any]] = {}
    for table in tables:
        folder = base / table
        sha = hash_files(parts(folder), remember=False)  # just written: nothing to remember
        result[table] = {"sha256": sha, "rows": count_rows(folder)}
    files = base / FILES
    if files.is_dir():
        all_files = sorted(p for p in files.rglob("*") if p.is_file())
        sha = hash_files(all_files, root=files, remember=False)
        result[FILES] = {"sha256": sha, "rows": len(all_files)}
    return result
