"""The run store: `runs/<run>/<stage>/` with tables, files and `_manifest.json`.

Layout of one stage folder:

    <table>/part-NNNNN.parquet   every output table, one part per chunk
    files/                       files a stage wrote (the dataset folder, checkpoints)
    _manifest.json               written last: its presence means the stage completed
    .work-<key>/                 an attempt in progress; finished chunks are marked in _done/

Everything is written to a temporary name and renamed, so a killed run never leaves a half file
under a final name.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "_manifest.json"
FILES = "files"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_table(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def hash_files(paths: list[Path], root: Path | None = None) -> str:
    """Content hash of files in the given order (names relative to root count too)."""
    h = hashlib.sha256()
    for p in paths:
        if root is not None:
            h.update(str(p.relative_to(root)).encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def parts(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.parquet"))


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

    def stage_dir(self, stage: str) -> Path:
        return self.root / self.folders.get(stage, stage)

    def table_dir(self, stage: str, table: str) -> Path:
        return self.stage_dir(stage) / table

    def files_dir(self, stage: str) -> Path:
        return self.stage_dir(stage) / FILES

    def work_dir(self, stage: str, key: str) -> Path:
        return self.stage_dir(stage) / f".work-{key[:16]}"

    @contextmanager
    def lock(self, stage: str) -> Iterator[None]:
        """Hold the stage for this process: two runs of one stage would finalise over each other."""
        folder = self.stage_dir(stage)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RuntimeError(
                    f"another retrace process is running stage {stage} in {self.root}; wait for "
                    "it to finish, or give this run another run.name"
                ) from None
            yield

    def manifest(self, stage: str) -> dict[str, Any] | None:
        path = self.stage_dir(stage) / MANIFEST
        if not path.is_file():
            return None
        return json.loads(path.read_text())

    def read(self, stage: str, table: str) -> pa.Table:
        return read_parts(self.table_dir(stage, table))

    def finalize(self, stage: str, work: Path, tables: list[str], manifest: dict[str, Any]) -> None:
        """Move a finished attempt into place and write its manifest last.

        The old manifest goes first, so a crash in between leaves the stage missing, never
        claiming outputs it does not have.
        """
        out = self.stage_dir(stage)
        (out / MANIFEST).unlink(missing_ok=True)
        for name in [*tables, FILES]:
            target = out / name
            if target.exists():
                shutil.rmtree(target)
            if (work / name).exists():
                os.replace(work / name, target)
        atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
        shutil.rmtree(work, ignore_errors=True)
        for stale in out.glob(".work-*"):  # attempts under other keys can never resume now
            shutil.rmtree(stale, ignore_errors=True)


def hash_outputs(base: Path, tables: list[str]) -> dict[str, dict[str, Any]]:
    """Content hash and row count of each table under `base`, and of its files folder."""
    result: dict[str, dict[str, Any]] = {}
    for table in tables:
        folder = base / table
        result[table] = {"sha256": hash_files(parts(folder)), "rows": count_rows(folder)}
    files = base / FILES
    if files.is_dir():
        all_files = sorted(p for p in files.rglob("*") if p.is_file())
        result[FILES] = {"sha256": hash_files(all_files, root=files), "rows": len(all_files)}
    return result
