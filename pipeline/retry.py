"""Rows rejected for a reason that may pass, run again by the next run.

A stage names such reasons in `SPEC.retried` (sample: `server_unavailable`, a server that was down
or busy through every retry). Those rows are not the data's fault, so a rerun runs them again
instead of keeping them rejected until `--force` redoes every row:

- a finished stage whose manifest counts such rows is not cached: the engine `reopen`s it (a fresh
  attempt under the same key holding its parts, each chunk marked done);
- in any attempt, a done chunk whose rejected part holds such rows yields just those rows
  (`rows`), and their outputs are `merge`d into the chunk's parts: the other rows stay as they
  were, the retried rows follow them, and their old rejections go.

A row that fails again is rejected again and waits for the next run. The work is one chunk's rows
at a time, so a kill loses at most that (a killed reopen starts over from the finished stage).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import store
from pipeline.stage import StageSpec


def waiting(spec: StageSpec, manifest: dict[str, Any]) -> int:
    """How many rows of a finished stage wait to be retried."""
    by_reason = manifest.get("rejected_by_reason", {})
    return sum(by_reason.get(reason, 0) for reason in spec.retried)


def reopen(stage_dir: Path, work: Path, tables: list[str], stats: dict[str, Any]) -> None:
    """Fill a fresh attempt with a finished stage's parts (hard links: a part is replaced, never
    written in place), each chunk marked done."""
    for table in tables:
        (work / table).mkdir(parents=True, exist_ok=True)
        for part in store.parts(stage_dir / table):
            os.link(part, work / table / part.name)
    if (stage_dir / store.FILES).is_dir():  # copied: a stage may write into its files
        shutil.copytree(stage_dir / store.FILES, work / store.FILES, dirs_exist_ok=True)
    chunks = [part.stem.removeprefix("part-") for part in store.parts(stage_dir / "rejected")]
    for i, chunk in enumerate(chunks):
        # A finished stage keeps only its summed stats: the first marker carries them all, so
        # the manifest's sum over markers stays what it was.
        marker = json.dumps(stats if i == 0 else {}).encode()
        store.atomic_write_bytes(work / store.DONE / chunk, marker)


def rows(spec: StageSpec, work: Path, index: int, chunk: pa.Table | None) -> pa.Table | None:
    """The rows of a done chunk to run again: those its rejected part holds for a retried
    reason (None when there are none)."""
    if not spec.retried or chunk is None or "id" not in chunk.column_names:
        return None
    ids = _retried_ids(spec, pq.read_table(store.part_path(work, "rejected", index)))
    if not ids:
        return None
    again = chunk.filter(pc.is_in(pc.cast(chunk["id"], pa.string()), value_set=ids))
    return again if again.num_rows else None


def merge(
    spec: StageSpec,
    work: Path,
    index: int,
    again: pa.Table,
    outputs: dict[str, Any],
    stats: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A chunk's tables and stats once the outputs of its rows `again` have joined them."""
    merged = dict(outputs)
    for table in [t for t in outputs if t != "stats"]:
        old = pq.read_table(store.part_path(work, table, index))
        if table == "rejected":  # the retried rows' old rejections go; a new one may come
            ids = pc.is_in(old["id"], value_set=pc.cast(again["id"], pa.string()))
            old = old.filter(pc.invert(pc.and_(ids, _retried(spec, old))))
        new = store.whole(outputs[table])
        merged[table] = pa.concat_tables([old.cast(new.schema), new])
    marker = json.loads((work / store.DONE / store.chunk_name(index)).read_text() or "{}")
    total = {k: marker.get(k, 0) + stats.get(k, 0) for k in {*marker, *stats}}
    return merged, dict(sorted(total.items()))


def _retried(spec: StageSpec, rejected: pa.Table) -> pa.ChunkedArray:
    """Which rejected rows were rejected for a reason the stage retries."""
    return pc.is_in(rejected["reason"], value_set=pa.array(spec.retried, pa.string()))


def _retried_ids(spec: StageSpec, rejected: pa.Table) -> pa.Array:
    return pc.unique(rejected.filter(_retried(spec, rejected))["id"])
