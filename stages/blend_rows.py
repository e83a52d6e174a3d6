"""blend's inputs as published rows: the formatted kinds checked against the contract, and
utility pairs (sources.utility) and anchor answers (filter.responses) formatted as SFT `utility`
rows. Empty utility or anchor rows are rejected `empty_text`."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import records
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


def _messages(role: str, contents: list[str]) -> pa.Array:
    n = len(contents)
    values = pa.StructArray.from_arrays(
        [pa.array([role] * n, pa.string()), pa.array(contents, pa.string())],
        fields=list(records.MESSAGE),
    )
    return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), values)


def _utility_rows(
    table: pa.Table, meta: pa.Array | None, component: str
) -> tuple[pa.Table, list[dict]]:
    """sources.utility or filter.responses rows as SFT `utility` rows; empty ones rejected."""
    rows = {c: table.column(c).to_pylist() for c in ("id", "prompt", "response")}
    keep, prompts, answers, ids, rejected = [], [], [], [], []
    for i, (prompt, answer) in enumerate(zip(rows["prompt"], rows["response"], strict=True)):
        if not (prompt or "").strip() or not (answer or "").strip():
            row = {c: table.column(c)[i].as_py() for c in table.column_names}
            rejected.append(records.reject(row, "blend", "empty_text", f"{component} row"))
            continue
        # Sources neutralise their text; a generated anchor answer may still spell a control
        # token, which must never reach a record (DESIGN §4).
        prompt, answer = neutralise(prompt)[0], neutralise(answer)[0]
        keep.append(i)
        prompts.append(prompt)
        answers.append(answer)
        ids.append(records.row_id("utility", prompt, answer))
    n, take = len(keep), pa.array(keep, pa.int64())
    if meta is None:
        meta = pa.StructArray.from_arrays(
            [pa.nulls(n, f.type) for f in records.META], fields=list(records.META)
        )
    else:
        meta = meta.take(take)
    segment = pa.StructArray.from_arrays(
        [pa.array(answers, pa.string()), pa.array(["text"] * n), pa.array([True] * n)],
        fields=list(records.SEGMENT),
    )
    columns = {
        "id": pa.array(ids, pa.string()),
        "kind": pa.array(["utility"] * n, pa.string()),
        "policy": pa.ListArray.from_arrays(
            pa.array([0] * (n + 1), pa.int32()), pa.array([], pa.string())
        ),
        "source": table.column("source").take(take),
        "source_id": table.column("source_id").take(take),
        "license": table.column("license").take(take),
        "prompt": _messages("user", prompts),
        "completion": _messages("assistant", answers),
        "segments": pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), segment),
        "visible": pa.array(answers, pa.string()),
        "meta": meta,
    }
    return pa.Table.from_pydict(columns, schema=records.SFT), rejected


def components(inputs: dict[str, pa.Table]) -> tuple[dict[str, pa.Table], list[dict]]:
    tables = {
        k: conform(inputs[f"format.{k}"], records.SFT, f"format.{k}") for k in records.RECIPE_KINDS
    }
    tables["preference"] = conform(
        inputs["format.preference"], records.PREFERENCE, "format.preference"
    )
    utility = conform(inputs["sources.utility"], records.UTILITY, "sources.utility")
    anchor = conform(inputs["filter.responses"], records.SAMPLES, "filter.responses")
    tables["utility"], rejected = _utility_rows(utility, None, "utility")
    tables["anchor"], more = _utility_rows(anchor, anchor.column("meta").combine_chunks(), "anchor")
    return tables, rejected + more
