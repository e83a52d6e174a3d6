"""blend's inputs as published rows: the formatted kinds checked against the contract, and
utility pairs (sources.utility) and anchor answers (filter.responses) formatted as SFT `utility`
rows (when taken, a batch at a time: only their ids are held). Empty utility or anchor rows are
rejected `empty_text`. `Rows` gives any component's rows by number without copying a table."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import kinds, records
from pipeline.errors import RetraceError
from pipeline.taxonomy import neutralise


class BlendError(RetraceError, RuntimeError):
    """An input table blend cannot use; the message names it and what to do."""


def conform(table: pa.Table, schema: pa.Schema, name: str) -> pa.Table:
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise BlendError(
            f"blend: input {name} lacks columns {missing}; rerun the stage that writes it "
            f"(retrace stage {name.split('.')[0]} --force)"
        )
    try:
        table = table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise BlendError(f"blend: input {name} does not match records' schema: {err}") from None
    if "segments" in schema.names:
        flat = pc.list_flatten(table.column("segments"))
        roles = pc.struct_field(flat, "role").unique().to_pylist()
        unknown = sorted(set(roles) - set(records.SEGMENT_ROLES), key=str)
        if unknown:
            raise BlendError(
                f"blend: input {name} has segment roles {unknown} outside the contract's "
                f"{records.SEGMENT_ROLES}; fix the stage that writes it"
            )
    return table


def gather(parts: Sequence[Any], which: np.ndarray, local: np.ndarray, schema: pa.Schema):
    """Row `local[i]` of `parts[which[i]]` for every i, in that order, as one record batch.

    Each part (a record batch, or anything with `take`) is taken from once: Arrow's take over a
    chunked table first concatenates all its chunks, a whole copy for every call.
    """
    if len(which) == 0:
        return pa.RecordBatch.from_pylist([], schema=schema)
    if which[0] == which[-1] and np.all(which == which[0]):
        return _take(parts[int(which[0])], local)
    order = np.argsort(which, kind="stable")
    present, starts = np.unique(which[order], return_index=True)
    ends = np.r_[starts[1:], len(order)]
    spans = zip(present, starts, ends, strict=True)
    pieces = [_take(parts[int(p)], local[order[s:e]]) for p, s, e in spans]
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return pa.concat_batches(pieces).take(pa.array(inverse))


def _take(part: Any, rows: np.ndarray) -> pa.RecordBatch:
    return part.take(pa.array(rows, pa.int64()))


class Rows:
    """One component's rows by number, taken a few thousand at a time, never copied whole."""

    def __init__(self, table: pa.Table) -> None:
        self.schema, self.num_rows = table.schema, table.num_rows
        self.ids, self.sources = table.column("id"), table.column("source")
        self._batches = table.to_batches()
        self._bounds = np.cumsum([0] + [b.num_rows for b in self._batches])

    def source_counts(self) -> dict[str, int]:
        counts = pc.value_counts(self.sources).to_pylist() if self.num_rows else []
        return {c["values"]: c["counts"] for c in counts}

    def take(self, rows: np.ndarray) -> pa.RecordBatch:
        rows = np.asarray(rows, dtype=np.int64)
        part = np.searchsorted(self._bounds, rows, side="right") - 1
        return gather(self._batches, part, rows - self._bounds[part], self.schema)


class UtilityRows(Rows):
    """sources.utility or filter.responses rows as SFT `utility` rows, formatted when taken: only
    each kept row's id and position in its source are held, not a second copy of its texts.
    Empty rows are rejected `empty_text` (in `rejected`)."""

    def __init__(self, table: pa.Table, component: str, chunk_rows: int) -> None:
        self.schema, self._source, self._anchor = records.SFT, Rows(table), component == "anchor"
        keep, ids, self.rejected, self._counts = [], [], [], Counter()
        for lo in range(0, table.num_rows, chunk_rows):
            batch = table.slice(lo, chunk_rows)
            columns = (batch.column(c).to_pylist() for c in ("prompt", "response", "source"))
            for i, (prompt, answer, source) in enumerate(zip(*columns, strict=True)):
                if not (prompt or "").strip() or not (answer or "").strip():
                    row = batch.slice(i, 1).to_pylist()[0]
                    self.rejected.append(
                        records.reject(row, "blend", "empty_text", f"{component} row")
                    )
                    continue
                keep.append(lo + i)
                ids.append(records.row_id("utility", neutralise(prompt)[0], neutralise(answer)[0]))
                self._counts[source] += 1
        self._keep = np.array(keep, dtype=np.int64)
        self.ids, self.num_rows = pa.array(ids, pa.string()), len(keep)

    def source_counts(self) -> dict[str, int]:
        return dict(self._counts)

    def take(self, rows: np.ndarray) -> pa.RecordBatch:
        rows = np.asarray(rows, dtype=np.int64)
        source = self._source.take(self._keep[rows])
        ids = self.ids.take(pa.array(rows, pa.int64()))
        return _utility_batch(source, ids, self._anchor)


def _neutralised(texts: pa.Array) -> pa.Array:
    """`texts` with control tokens defused (docs/data-contract.md#control-tokens): sources
    neutralise their text, but a generated anchor answer may still spell one. Only a text with "["
    or "<" can hold a token, so only those go through Python."""
    maybe = pc.or_(pc.match_substring(texts, "["), pc.match_substring(texts, "<"))
    rows = np.flatnonzero(pc.fill_null(maybe, False).to_numpy(zero_copy_only=False))
    if not len(rows):
        return texts
    values = texts.to_pylist()
    for i in rows:
        values[i] = neutralise(values[i])[0]
    return pa.array(values, pa.string())


def _messages(role: str, contents: pa.Array) -> pa.Array:
    n = len(contents)
    values = pa.StructArray.from_arrays(
        [pa.array([role] * n, pa.string()), contents], fields=list(records.MESSAGE)
    )
    return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), values)


def _utility_batch(source: pa.RecordBatch, ids: pa.Array, anchor: bool) -> pa.RecordBatch:
    """Source rows (non-empty) as SFT `utility` rows; the answer's one array serves completion,
    segment and visible text."""
    n = source.num_rows
    prompts = _neutralised(source.column("prompt"))
    answers = _neutralised(source.column("response"))
    if anchor:
        meta = source.column("meta")
    else:
        meta = pa.StructArray.from_arrays(
            [pa.nulls(n, f.type) for f in records.META], fields=list(records.META)
        )
    segment = pa.StructArray.from_arrays(
        [answers, pa.array(["text"] * n), pa.array([True] * n)], fields=list(records.SEGMENT)
    )
    columns = {
        "id": ids,
        "kind": pa.array(["utility"] * n, pa.string()),
        "policy": pa.ListArray.from_arrays(
            pa.array([0] * (n + 1), pa.int32()), pa.array([], pa.string())
        ),
        "source": source.column("source"),
        "source_id": source.column("source_id"),
        "license": source.column("license"),
        "prompt": _messages("user", prompts),
        "completion": _messages("assistant", answers),
        "segments": pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), segment),
        "visible": answers,
        "meta": meta,
    }
    return pa.RecordBatch.from_pydict(columns, schema=records.SFT)


# The tables blend builds `utility` rows from (kinds.KINDS `sources`), with their schemas.
FORMATTED = {"sources.utility": records.UTILITY, "filter.responses": records.SAMPLES}


def components(inputs: dict[str, pa.Table], chunk_rows: int) -> tuple[dict[str, Rows], list[dict]]:
    """Every component's rows (kinds.COMPONENTS), and the rows blend formats itself rejected as
    empty."""
    rows: dict[str, Rows] = {}
    rejected: list[dict] = []
    for kind in kinds.KINDS:
        for component, name in kind.built_from:
            if kind.builder == "blend":
                made = UtilityRows(
                    conform(inputs[name], FORMATTED[name], name), component, chunk_rows
                )
                rejected += made.rejected
                rows[component] = made
            else:
                rows[component] = Rows(
                    conform(inputs[name], records.config_schema(kind.name), name)
                )
    return rows, rejected
